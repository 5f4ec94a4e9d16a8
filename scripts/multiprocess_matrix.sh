#!/usr/bin/env bash
# Every training recipe under every CPU-provable launcher with 2 processes, on tiny generated models: the runs behind
# the support table in docs/scaling.md. One line per run in $OUT/summary.txt (launcher, recipe, exit code, seconds),
# its log next to it. The recipes whose steps are deterministic (no sampling) also run in 1 process with the same
# global batch (4 = 1 x 4 = 2 x 2, dropout 0); $OUT/curves.txt has, per 2-process run, the largest difference of its
# per-step losses and gradient norms from that run's. Under ZeRO-3 each recipe is also killed (kill -9) after its
# first complete checkpoint and rerun with the same command; curves.txt compares the resumed curve with the
# uninterrupted one. About 13 minutes on 2 CPU cores (the first DeepSpeed run compiles its shm op, 1-3 min).
#   bash scripts/multiprocess_matrix.sh [OUT] [launcher ...]     # default: cpu deepspeed_zero2 deepspeed_zero3 (fsdp2: refused on a CPU, docs/scaling.md)
#   RECIPES="sft_lora dpo" bash scripts/multiprocess_matrix.sh ...   # some recipes only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/multiprocess-matrix}; shift || true
LAUNCHERS=${*:-cpu deepspeed_zero2 deepspeed_zero3}
mkdir -p "$OUT"; : > "$OUT/summary.txt"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The models: a 2-layer LLaMA with random weights and SmolLM2's tokenizer (the policy), and a reward model trained
# from it for 2 steps by the reward-model recipe itself (1 process)
python - "$OUT/tiny-llama" <<'PY'
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from chatgpt_recipes.modeling.loading import fetch_offline_model
from chatgpt_recipes.data.templates import save_stage_info
tokenizer = AutoTokenizer.from_pretrained(fetch_offline_model("smollm2-135m-instruct"))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
save_stage_info(sys.argv[1], "sft", "alpaca")
PY
TINY=$OUT/tiny-llama; RM=$OUT/tiny-rm
accelerate launch --cpu --num_processes 1 recipes/reward_model.py --model_name_or_path "$TINY" --max_train_samples 24 \
    --eval_split_size 12 --max_length 384 --max_steps 2 --centering_samples 4 --save_strategy no --bf16 false \
    --report_to none --output_dir "$RM" > "$OUT/tiny-rm.log" 2>&1 || { echo "reward model failed: $OUT/tiny-rm.log"; exit 1; }

# Per recipe: its tiny arguments, and the per-process batch of the 2-process runs where the curve is compared
declare -A ARGS=(
  [sft_lora]="recipes/sft_lora.py --model_name_or_path $TINY --max_train_samples 48 --eval_split_size 4 --max_length 256 --max_steps 3 --lora_dropout 0 --learning_rate 1e-3 --warmup_steps 0 --sample_max_new_tokens 2 --save_strategy no"
  [sft_qlora]="recipes/sft_lora.py --load_in_4bit true --model_name_or_path $TINY --max_train_samples 48 --eval_split_size 4 --max_length 256 --max_steps 3 --lora_dropout 0 --learning_rate 1e-3 --warmup_steps 0 --sample_max_new_tokens 2 --save_strategy no"
  [sft_full]="recipes/sft_lora.py --use_peft false --model_name_or_path $TINY --max_train_samples 48 --eval_split_size 4 --max_length 256 --max_steps 3 --learning_rate 1e-3 --warmup_steps 0 --sample_max_new_tokens 2 --save_strategy no"
  [reward_model]="recipes/reward_model.py --model_name_or_path $TINY --max_train_samples 24 --eval_split_size 12 --max_length 384 --max_steps 3 --lora_dropout 0 --learning_rate 1e-3 --warmup_steps 0 --centering_samples 4 --save_strategy no"
  [dpo]="recipes/dpo.py --model_name_or_path $TINY --max_steps 3 --max_train_samples 30 --eval_split_size 6 --max_length 128 --lora_dropout 0 --learning_rate 1e-3 --warmup_steps 0 --save_strategy no"
  [rloo]="recipes/rloo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_steps 3 --max_train_prompts 8 --eval_prompts 2 --max_completion_length 6 --save_strategy no"
  [ppo]="recipes/ppo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_train_prompts 12 --eval_prompts 2 --total_episodes 24 --response_length 6 --num_ppo_epochs 1 --save_steps 1"
  [ppo_ptx]="recipes/ppo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_train_prompts 12 --eval_prompts 2 --total_episodes 24 --response_length 6 --num_ppo_epochs 1 --ptx_coef 0.5 --save_steps 1"
  [pretrain]="recipes/pretrain.py --vocab_size 512 --block_size 64 --model_config_overrides n_layer=2,n_embd=64,n_positions=64,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0 --max_steps 3 --eval_strategy no --sample_max_new_tokens 4 --save_strategy no"
)
RECIPES=${RECIPES:-sft_lora sft_qlora sft_full reward_model dpo rloo ppo ppo_ptx pretrain}
declare -A BATCH=()
for recipe in sft_lora sft_qlora sft_full reward_model dpo pretrain; do [[ " $RECIPES " == *" $recipe "* ]] && BATCH[$recipe]=2; done
COMMON="--bf16 false --report_to none --logging_steps 1 --seed 42"

for recipe in "${!BATCH[@]}"; do  # the 1-process references
  python ${ARGS[$recipe]} --per_device_train_batch_size $(( 2 * ${BATCH[$recipe]} )) $COMMON \
      --output_dir "$OUT/one-$recipe" > "$OUT/one-$recipe.log" 2>&1 || echo "1-process $recipe failed: $OUT/one-$recipe.log"
done
for launcher in $LAUNCHERS; do
  for recipe in $RECIPES; do
    start=$(date +%s)
    batch=${BATCH[$recipe]:+--per_device_train_batch_size ${BATCH[$recipe]}}
    timeout 600 accelerate launch --config_file "accelerate_configs/$launcher.yaml" --num_processes 2 ${ARGS[$recipe]} \
        $batch $COMMON --output_dir "$OUT/$launcher-$recipe" > "$OUT/$launcher-$recipe.log" 2>&1
    code=$?
    saved=$(ls "$OUT/$launcher-$recipe" 2>/dev/null | grep -c -E "^(model|adapter_model)\.safetensors$")
    echo "$launcher $recipe exit=$code saved=$saved $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  done
done

# kill -9 under ZeRO-3: each recipe saves every step; once a checkpoint is complete, a random 0-0.9 s later the whole
# process tree is killed (torchrun starts each rank in a session of its own), then the same command runs again: it
# must say "Resuming from", finish and save; curves.txt compares its curve with the uninterrupted ZeRO-3 run's
if [[ " $LAUNCHERS " == *" deepspeed_zero3 "* ]]; then
  for recipe in $RECIPES; do
    dir="$OUT/kill-$recipe"; batch=${BATCH[$recipe]:+--per_device_train_batch_size ${BATCH[$recipe]}}
    extra="--save_strategy steps --save_steps 1"; [[ $recipe == ppo* ]] && extra="--save_steps 1"
    command="accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 2 ${ARGS[$recipe]} $batch $COMMON $extra --output_dir $dir"
    $command > "$dir.killed.log" 2>&1 & pid=$!
    for _ in $(seq 600); do compgen -G "$dir/checkpoint-*/trainer_state.json" > /dev/null && break; sleep 0.2; done
    sleep "0.$(( RANDOM % 10 ))"
    python -c "import psutil, sys; tree = psutil.Process(int(sys.argv[1])); [p.kill() for p in [*tree.children(recursive=True), tree]]" $pid 2>/dev/null
    wait $pid 2>/dev/null
    killed_at=$(ls -d "$dir"/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tr '\n' ' ')
    timeout 600 $command > "$dir.log" 2>&1
    code=$?
    resumed=$(grep -o "Resuming from [^ ]*" "$dir.log" | head -1 | sed 's/.*checkpoint-/checkpoint-/')
    saved=$(ls "$dir" 2>/dev/null | grep -c -E "^(model|adapter_model)\.safetensors$")
    echo "kill-zero3 $recipe checkpoints_at_kill=[${killed_at% }] rerun_exit=$code resumed=${resumed:-no} saved=$saved" | tee -a "$OUT/summary.txt"
  done
fi

python - "$OUT" "$LAUNCHERS" "${!BATCH[*]}" <<'PY' | tee "$OUT/curves.txt"
import json, sys
from pathlib import Path
out, launchers, compared = Path(sys.argv[1]), sys.argv[2].split(), sorted(sys.argv[3].split())

def logged(run: str, key: str) -> dict:
    history = json.loads((out / run / "log_history.json").read_text())
    return {entry["step"]: entry[key] for entry in history if key in entry}

def largest_difference(run: str, reference: str, keys: list[str]) -> list[float] | str:
    """Per key, the largest relative difference of `run`'s logged values from `reference`'s, or why there is none."""
    differences = []
    for key in keys:
        try:
            values, expected = logged(run, key), logged(reference, key)
        except OSError as error:
            return f"no log ({error})"
        if values.keys() != expected.keys():
            return f"steps differ: {sorted(values)} vs {sorted(expected)}"
        differences.append(max(abs(values[s] - expected[s]) / max(abs(expected[s]), 1e-12) for s in expected))
    return differences

for launcher in launchers:  # 2 processes against 1, per step
    for recipe in compared:
        result = largest_difference(f"{launcher}-{recipe}", f"one-{recipe}", ["loss", "grad_norm"])
        if isinstance(result, str):
            print(f"{launcher} {recipe} {result}")
            continue
        loss, norm = result
        print(f"{launcher} {recipe} max_rel_loss_diff={loss:.1e} max_rel_grad_norm_diff={norm:.1e} "
              f"{'match' if loss <= 1e-4 and norm <= 1e-3 else 'DIFFER'}")
for killed in sorted(out.glob("kill-*/")):  # the resumed run against the uninterrupted one
    recipe = killed.name[len("kill-"):]
    key = "objective/scores" if recipe.startswith("ppo") else "loss"
    result = largest_difference(killed.name, f"deepspeed_zero3-{recipe}", [key])
    if isinstance(result, str):
        print(f"kill-zero3 {recipe} {result}")
        continue
    print(f"kill-zero3 {recipe} {key} max_rel_diff_to_uninterrupted={result[0]:.1e} "
          f"{'match' if result[0] <= 1e-4 else 'DIFFER'}")
PY

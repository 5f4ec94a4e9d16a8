#!/usr/bin/env bash
# Every training recipe under every CPU-provable launcher with 2 processes, on tiny generated models: the runs behind
# the support table in docs/scaling.md. One line per run in $OUT/summary.txt (launcher, recipe, exit code, seconds),
# its log next to it. About 10 minutes on 2 CPU cores (the first DeepSpeed run compiles its shm op, 1-3 min).
#   bash scripts/multiprocess_matrix.sh [OUT] [launcher ...]     # default: cpu deepspeed_zero2 deepspeed_zero3 (fsdp2: refused on a CPU, docs/scaling.md)
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
from chatgpt_recipes.models import fetch_offline_model
from chatgpt_recipes.templates import save_stage_info
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

declare -A ARGS=(
  [sft_lora]="recipes/sft_lora.py --model_name_or_path $TINY --max_train_samples 48 --eval_split_size 4 --max_length 256 --per_device_train_batch_size 2 --max_steps 2 --sample_max_new_tokens 2 --save_strategy no"
  [sft_full]="recipes/sft_lora.py --use_peft false --model_name_or_path $TINY --max_train_samples 48 --eval_split_size 4 --max_length 256 --per_device_train_batch_size 2 --max_steps 2 --sample_max_new_tokens 2 --save_strategy no"
  [reward_model]="recipes/reward_model.py --model_name_or_path $TINY --max_train_samples 24 --eval_split_size 12 --max_length 384 --per_device_train_batch_size 2 --max_steps 2 --centering_samples 4 --save_strategy no"
  [dpo]="recipes/dpo.py --model_name_or_path $TINY --max_steps 2 --max_train_samples 8 --eval_split_size 6 --max_length 128 --save_strategy no"
  [rloo]="recipes/rloo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_steps 1 --max_train_prompts 8 --eval_prompts 2 --max_completion_length 6 --save_strategy no"
  [ppo]="recipes/ppo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_train_prompts 12 --eval_prompts 2 --total_episodes 8 --response_length 6 --num_ppo_epochs 1 --save_steps 1"
  [ppo_ptx]="recipes/ppo.py --model_name_or_path $TINY --reward_model_path $RM --on_weak_reward_model warn --max_train_prompts 12 --eval_prompts 2 --total_episodes 8 --response_length 6 --num_ppo_epochs 1 --ptx_coef 0.5 --save_steps 1"
  [pretrain]="recipes/pretrain.py --max_steps 3 --save_strategy no"
)
for launcher in $LAUNCHERS; do
  for recipe in sft_lora sft_full reward_model dpo rloo ppo ppo_ptx pretrain; do
    start=$(date +%s)
    timeout 600 accelerate launch --config_file "accelerate_configs/$launcher.yaml" --num_processes 2 ${ARGS[$recipe]} \
        --bf16 false --report_to none --output_dir "$OUT/$launcher-$recipe" > "$OUT/$launcher-$recipe.log" 2>&1
    code=$?
    saved=$(ls "$OUT/$launcher-$recipe" 2>/dev/null | grep -c -E "^(model|adapter_model)\.safetensors$")
    echo "$launcher $recipe exit=$code saved=$saved $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  done
done

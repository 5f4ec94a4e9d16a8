#!/usr/bin/env bash
# The checks a CPU cannot make, on one GPU, in about 10 minutes: QLoRA SFT on CUDA; SFT, the reward model and PPO
# under ZeRO-2 and ZeRO-3 (one process); the precision decision; SFT real tokens/s and MFU. One results file:
# $OUT/gpu_check.jsonl (one JSON line per check: name, exit code, seconds, log), plus the precision and throughput JSON.
# Self-contained and offline: the machine's own torch (CUDA) is used; the repository's other requirements come from
# the wheels handed in WHEELS (installed with --no-index), the model from MODEL (a local directory).
#   WHEELS=.whl MODEL=/path/to/SmolLM2-135M-Instruct OUT=/tmp/gpu-check bash scripts/gpu_check.sh
# Status: written for the first GPU machine lent to this project; not run yet (none was lent so far).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}; MODEL=${MODEL:?MODEL: a local model directory (SmolLM2-135M-Instruct)}
mkdir -p "$OUT"; : > "$OUT/gpu_check.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RECIPES_CACHE=${RECIPES_CACHE:-$OUT/cache}
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$OUT/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, log it, append its result line
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  printf '{"check": "%s", "exit": %d, "seconds": %d, "log": "%s"}\n' "$name" "$code" "$(( $(date +%s) - start ))" \
      "$OUT/$name.log" | tee -a "$OUT/gpu_check.jsonl"
}

check precision 60 python3 -c "
import json, torch
from chatgpt_recipes.precision import choose_precision, detect_capability
capability = detect_capability()
print(json.dumps({'device': torch.cuda.get_device_name(0), 'capability': str(capability),
                  'precision': str(choose_precision(capability))}))" 
cp "$OUT/precision.log" "$OUT/precision.json" 2>/dev/null

LAUNCH="python3 -m accelerate.commands.launch"
SFT="recipes/sft_lora.py --model_name_or_path $MODEL --max_steps 10 --eval_split_size 8 --save_strategy no --report_to none"
check qlora_sft_cuda 150 $LAUNCH --config_file accelerate_configs/single_gpu.yaml $SFT --load_in_4bit true \
    --output_dir "$OUT/qlora"
for zero in zero2 zero3; do
  launcher="$LAUNCH --config_file accelerate_configs/deepspeed_$zero.yaml --num_processes 1"
  check "sft_full_$zero" 120 $launcher $SFT --use_peft false --output_dir "$OUT/sft-$zero"
  check "reward_model_$zero" 120 $launcher recipes/reward_model.py --model_name_or_path "$MODEL" --max_steps 10 \
      --eval_split_size 20 --save_strategy no --report_to none --output_dir "$OUT/rm-$zero"
  check "ppo_$zero" 150 $launcher recipes/ppo.py --model_name_or_path "$MODEL" --reward_model_path "$OUT/rm-$zero" \
      --on_weak_reward_model warn --total_episodes 32 --response_length 32 --eval_prompts 4 --save_steps 2 \
      --report_to none --output_dir "$OUT/ppo-$zero"
done
check sft_throughput 240 python3 benchmarks/sft_throughput.py --configs recipe trl_best --rounds 1 --model "$MODEL" \
    --tokens 65536 --no_base_eval --json "$OUT/sft_throughput.json"
echo "results: $OUT/gpu_check.jsonl"

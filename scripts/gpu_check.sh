#!/usr/bin/env bash
# The checks a CPU cannot make, on one CUDA GPU, in at most 8 minutes (one global deadline, GPU_CHECK_SECONDS=480):
# each step has its own time limit, the most valuable steps run first, and a step whose limit no longer fits before
# the deadline is not started: it is recorded as skipped, with the seconds that were left (never run cut short). The
# limits add up to more than 8 minutes: which steps fit in one 8-minute run is for the first GPU run to show;
# GPU_CHECK_SECONDS=1500 runs them all. Offline: the machine's own CUDA torch is used; the other pinned libraries come from
# BUNDLE/wheels, the models are made from benchmarks/gpu_models with random weights and BUNDLE/tokenizer (both written
# on a machine with the package index by scripts/prepare_gpu_check.sh), unless MODELS names a folder that holds
# smollm2-135m and smollm2-1.7b already.
#   bash scripts/gpu_check.sh --dry-run        # the steps and their limits; needs no GPU
#   BUNDLE=.gpu-bundle OUT=/tmp/gpu-check bash scripts/gpu_check.sh
# Writes OUT/gpu_check.jsonl (one JSON line per step: step, status, exit, seconds, limit, log) and OUT/gpu_check.md
# (a machine line and the table of steps, then the benchmarks' tables), which it prints.
# Status: not run on a GPU yet (none was lent to the session that wrote it).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0; [ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-/tmp/gpu-check}; BUNDLE=${BUNDLE:-.gpu-bundle}; MODELS=${MODELS:-$OUT/models}
DEADLINE_SECONDS=${GPU_CHECK_SECONDS:-480}
M135=$MODELS/smollm2-135m; M17=$MODELS/smollm2-1.7b
LAUNCH="python3 -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml"
ZERO() { echo "python3 -m accelerate.commands.launch --config_file accelerate_configs/deepspeed_$1.yaml --num_processes 1"; }
SHORT="--report_to none --save_strategy no --eval_strategy no"
SFT="recipes/sft_lora.py --model_name_or_path $M135 --max_steps 10 --sample_max_new_tokens 8 $SHORT"
RM="recipes/reward_model.py --model_name_or_path $M135 --max_steps 10 --centering_samples 32 $SHORT"
PPO="recipes/ppo.py --model_name_or_path $M135 --total_episodes 32 --response_length 32 --eval_prompts 4 \
  --save_steps 100 --on_weak_reward_model warn --report_to none"

# name | seconds | command, most valuable first
STEPS=(
  "decisions|20|python3 scripts/gpu_report.py decisions"
  "sft_lora_default|60|$LAUNCH $SFT --output_dir $OUT/sft"
  "gpu_tests|150|python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -p no:xdist -o addopts="
  "sft_throughput_1.7b|150|python3 benchmarks/sft_throughput.py --model $M17 --configs trl_defaults trl_best recipe \
--rounds 1 --tokens 32768 --no_base_eval --json $OUT/sft_throughput_1.7b.json"
  "qlora_sft|60|$LAUNCH $SFT --load_in_4bit true --output_dir $OUT/qlora"
  "sft_full_zero3|60|$(ZERO zero3) $SFT --use_peft false --output_dir $OUT/sft-zero3"
  "alpaca_epoch_135m|200|python3 benchmarks/sft_throughput.py --model $M135 --configs recipe --rows 52002 --epoch \
--rounds 1 --no_base_eval --json $OUT/alpaca_epoch_135m.json"
  "reward_model_zero3|60|$(ZERO zero3) $RM --output_dir $OUT/rm-zero3"
  "ppo_zero3|90|$(ZERO zero3) $PPO --reward_model_path $OUT/rm-zero3 --output_dir $OUT/ppo-zero3"
  "ppo_throughput|120|python3 benchmarks/ppo_throughput.py --model $M135 --rounds 1 --json $OUT/ppo_throughput.json"
  "sft_full_zero2|60|$(ZERO zero2) $SFT --use_peft false --output_dir $OUT/sft-zero2"
  "reward_model_zero2|60|$(ZERO zero2) $RM --output_dir $OUT/rm-zero2"
  "ppo_zero2|90|$(ZERO zero2) $PPO --reward_model_path $OUT/rm-zero2 --output_dir $OUT/ppo-zero2"
  "sft_throughput_135m|120|python3 benchmarks/sft_throughput.py --model $M135 --configs trl_defaults trl_best recipe \
--rounds 1 --tokens 32768 --no_base_eval --json $OUT/sft_throughput_135m.json"
  # the race at GPU size (recipes/configs/pipeline/compare_rl_gpu.yaml), its quick variant on the random-weight
  # 1.7B model: checks that every stage and the race table run on a GPU, not what the race finds
  "race_gpu_quick|300|python3 recipes/pipeline.py --config recipes/configs/pipeline/compare_rl_gpu.yaml --quick true \
--base_model $M17 --output_dir $OUT/race-gpu"
)

if [ $DRY_RUN = 1 ]; then
  echo "gpu_check: ${#STEPS[@]} steps in this order under one deadline of ${DEADLINE_SECONDS} s (setup first: wheels,"
  echo "random-weight models); a step whose limit no longer fits is skipped. Results: $OUT/gpu_check.jsonl and .md"
  if [ -d "$BUNDLE/wheels" ]; then
    echo "bundle: $BUNDLE/wheels, installed into $OUT/site: $(ls "$BUNDLE/wheels" | sed 's/-[0-9].*//' | sort | tr '\n' ' ')"
  else
    echo "bundle: none at $BUNDLE/wheels (write it with scripts/prepare_gpu_check.sh): the machine's own libraries are used"
  fi
  echo "tests: pytest without pytest-xdist (-p no:xdist -o addopts=), which the bundle does not carry"
  echo "| # | step | limit (s) | starts by (s) | if every earlier step takes its whole limit | command |"
  echo "|---|---|---|---|---|---|"
  total=0; i=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"; i=$((i + 1))
    if [ $((total + limit)) -le "$DEADLINE_SECONDS" ]; then fits=runs; else fits="skipped unless earlier steps end early"; fi
    echo "| $i | $name | $limit | $total | $fits | \`$command\` |"
    total=$((total + limit))
  done
  echo "sum of the limits: $total s; global deadline: $DEADLINE_SECONDS s"
  exit 0
fi

start_all=$(date +%s); deadline=$((start_all + DEADLINE_SECONDS))
mkdir -p "$OUT"; : > "$OUT/gpu_check.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RECIPES_CACHE=${RECIPES_CACHE:-$OUT/cache}
if [ -d "$BUNDLE/wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/site" "$BUNDLE"/wheels/*.whl \
    > "$OUT/setup.log" 2>&1 || { echo "wheel install failed: $OUT/setup.log"; exit 1; }
  export PYTHONPATH="$OUT/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -f "$M135/model.safetensors" ] || [ ! -f "$M17/model.safetensors" ]; then
  python3 scripts/make_models.py "$MODELS" "$BUNDLE/tokenizer" >> "$OUT/setup.log" 2>&1 \
    || { echo "making the models failed: $OUT/setup.log"; exit 1; }
fi
echo "setup: $(( $(date +%s) - start_all )) s (log: $OUT/setup.log)"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  left=$((deadline - $(date +%s))); log="$OUT/$name.log"
  if [ $left -lt "$limit" ]; then  # would be cut short: not started, recorded as skipped
    status=skipped; code=-1; seconds=0; run_limit=0; log="(not run: ${left} s left before the deadline, limit ${limit} s)"
  else
    run_limit=$limit; begin=$(date +%s)
    timeout -k 10 "$run_limit" bash -c "$command" > "$log" 2>&1; code=$?
    seconds=$(( $(date +%s) - begin ))
    case $code in 0) status=pass ;; 124|137) status=timeout ;; *) status=fail ;; esac
  fi
  printf '{"step": "%s", "status": "%s", "exit": %d, "seconds": %d, "limit": %d, "log": "%s"}\n' \
    "$name" "$status" "$code" "$seconds" "$run_limit" "$log" | tee -a "$OUT/gpu_check.jsonl"
done
python3 scripts/gpu_report.py table "$OUT" $(( $(date +%s) - start_all ))

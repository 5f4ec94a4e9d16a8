"""Peak memory of the SFT recipe with LoRA vs QLoRA (4-bit NF4 base weights), same model, data and steps.

    export RECIPES_CACHE=/tmp/rcache
    python benchmarks/qlora_memory.py                     # SmolLM2-135M, 3 steps each: LoRA (bf16 and fp32 base), QLoRA
    python benchmarks/qlora_memory.py --model Qwen/Qwen2.5-0.5B --steps 5

Each configuration runs recipes/sft_lora.py's own main() (default YAML; only max_steps, output_dir and no mid-run
eval/save/report overridden) in its own process. Reported per process: the peak RSS over the whole run (VmHWM,
model loading included) and over training alone (the peak is reset with /proc/self/clear_refs when training
starts), and on a GPU torch.cuda.max_memory_allocated. QLoRA quantizes every linear layer of the decoder; the
(tied) embedding and the norms stay in the run's dtype (bf16), as in the LoRA run (chatgpt_recipes.modeling.loading.
prepare_quantized_for_training: PEFT's prepare_model_for_kbit_training would upcast them to fp32, and with them the
residual stream and every activation saved for backward), so the two runs differ only in the linear weights.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import check_model, parse_checked, recipe_module, run_benchmark

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# lora: the recipe's defaults (bf16 base weights); lora_fp32: base weights in fp32 (transformers' and TRL's default)
CONFIGS = {"lora": [], "lora_fp32": ["--dtype", "float32"], "qlora": ["--load_in_4bit", "true"]}


def rss_peak_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(name: str, model: str, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    sft_lora = recipe_module("sft_lora")
    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    class TrainingPeak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.before_training = rss_peak_gb()
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM: from here on it is the peak of training alone
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.training = rss_peak_gb()
            self.seconds = time.perf_counter() - self.started
            if torch.cuda.is_available():
                self.gpu = torch.cuda.max_memory_allocated() / 2**30

    peak = TrainingPeak()

    class MeasuredTrainer(sft_lora.SFTTrainer):
        last = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(peak)
            MeasuredTrainer.last = self

    sft_lora.SFTTrainer = MeasuredTrainer
    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as out_dir:
        args = ["--model_name_or_path", model, "--output_dir", out_dir, "--max_steps", str(steps),
                "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                "--sample_max_new_tokens", "1", *CONFIGS[name]]
        sft_lora.main(*parse_config((sft_lora.SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args))
    model = MeasuredTrainer.last.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    result = dict(config=name, steps=steps, peak_rss_gb=max(peak.before_training, rss_peak_gb()),
                  peak_rss_before_training_gb=peak.before_training, peak_rss_training_gb=peak.training,
                  weights_and_buffers_gb=weights / 2**30, train_seconds=peak.seconds,
                  final_train_loss=next((e["train_loss"] for e in reversed(MeasuredTrainer.last.state.log_history)
                                         if "train_loss" in e), None))
    if hasattr(peak, "gpu"):
        result["peak_gpu_memory_gb"] = peak.gpu
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parse_checked(parser, positive=("steps",))
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.model, args.steps)))
        return
    check_model(args.model)

    import peft
    import torch
    import transformers
    import trl

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
    print("command: python " + " ".join(sys.argv), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            result_file = Path(tmp) / f"{name}.json"
            log = result_file.with_suffix(".log")
            command = [sys.executable, __file__, "--worker", name, "--model", args.model, "--steps",
                       str(args.steps), "--result", str(result_file)]
            with open(log, "w") as handle:
                if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode:
                    raise SystemExit(f"{name} failed; its log:\n" + log.read_text()[-3000:])
            results.append(json.loads(result_file.read_text()))
            print(f"  {name}: done", flush=True)
    keys = ["peak_rss_gb", "peak_rss_training_gb", "weights_and_buffers_gb", "final_train_loss", "train_seconds"]
    if "peak_gpu_memory_gb" in results[0]:
        keys.append("peak_gpu_memory_gb")
    print("\n| config | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for result in results:
        print(f"| {result['config']} | " + " | ".join(f"{result[k]:.3f}" for k in keys) + " |")
    by_name = {result["config"]: result for result in results}
    for base in ("lora", "lora_fp32"):
        print(f"QLoRA / {base} peak RSS: whole run {by_name['qlora']['peak_rss_gb'] / by_name[base]['peak_rss_gb']:.2f}x, "
              f"training {by_name['qlora']['peak_rss_training_gb'] / by_name[base]['peak_rss_training_gb']:.2f}x")

if __name__ == "__main__":
    run_benchmark(main)

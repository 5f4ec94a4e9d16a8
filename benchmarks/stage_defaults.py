"""Wall time and peak memory of each stage's default command, as a new user runs it (`accelerate launch
recipes/<stage>.py`, no arguments but the output directory), one stage after the other in the order the pipeline
needs (the reward model before PPO and RLOO, which read its output). Budgets: 10 minutes and 8 GB peak RSS per stage.

    python benchmarks/stage_defaults.py                                  # every stage, this CPU's own precision
    RECIPES_NATIVE_BF16=0 python benchmarks/stage_defaults.py            # the decisions of a CPU without native bf16
    python benchmarks/stage_defaults.py --stages sft_lora reward_model   # some of them

`RECIPES_NATIVE_BF16=0` makes the recipes choose fp32 as they would on an AVX2-only CPU, but the matmuls still run at
this CPU's fp32 speed (AMD Zen 4: ~170 GFLOP/s on 2 cores; Zen 3: ~90), so such a run's times are a lower bound for a
slower CPU. Peak RSS is the stage process's own (`ru_maxrss` of the waited-for children: accelerate's launcher and the
recipe, the larger of the two).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from bench_utils import machine, parse_checked, versions  # noqa: E402

STAGES = ["sft_lora", "reward_model", "ppo", "rloo", "dpo", "pretrain"]
BUDGET_S, BUDGET_GB = 600, 8.0


def run_stage(stage: str, out_dir: Path, reward_model: Path) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", f"recipes/{stage}.py",
               "--output_dir", str(out_dir / stage), "--report_to", "none"]
    if stage in ("ppo", "rloo"):
        command += ["--reward_model_path", str(reward_model)]
    log = out_dir / f"{stage}.log"
    start = time.time()
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all waited-for descendants so far: run each stage from a fresh
    # helper process so that it is this stage's own.
    probe = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO, stdout=handle,
                                stderr=subprocess.PIPE, text=True)
    seconds = time.time() - start
    handle_text = log.read_text()
    peak_kb = int(result.stderr.strip().splitlines()[-1])
    if result.returncode != 0:
        sys.exit(f"{stage} failed ({result.returncode}); its log: {log}\n{handle_text[-3000:]}\n{result.stderr[-3000:]}")
    precision = next((line for line in handle_text.splitlines() if line.startswith("[precision]")), "")
    budget = next((line for line in handle_text.splitlines() if line.startswith("[time budget]")), "")
    return {"stage": stage, "seconds": round(seconds, 1), "peak_rss_gb": round(peak_kb / 2**20, 2),
            "precision": precision, "time_budget": budget}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    parser.add_argument("--json", default="benchmarks/stage_defaults.json", help="where the results go")
    parser.add_argument("--keep", help="keep the stage outputs in this directory (default: a temporary one)")
    args = parse_checked(parser)
    if any(stage in ("ppo", "rloo") for stage in args.stages) and "reward_model" not in args.stages:
        args.stages.insert(0, "reward_model")
    args.stages = sorted(args.stages, key=STAGES.index)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {machine()} | {versions()}\ncommand: python "
          + " ".join(sys.argv), flush=True)
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="stage-defaults-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in args.stages:
        results.append(run_stage(stage, out_dir, out_dir / "reward_model"))
        r = results[-1]
        print(f"  {stage}: {r['seconds'] / 60:.1f} min, peak RSS {r['peak_rss_gb']:.2f} GB  {r['precision']} "
              f"{r['time_budget']}", flush=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), "versions": versions(), "command": sys.argv,
                                               "native_bf16_forced": os.environ.get("RECIPES_NATIVE_BF16"),
                                               "results": results}, indent=1))
    print("\n| stage | wall time | peak RSS | within 10 min and 8 GB |\n|---|---|---|---|")
    for r in results:
        ok = r["seconds"] <= BUDGET_S and r["peak_rss_gb"] <= BUDGET_GB
        print(f"| {r['stage']} | {r['seconds'] / 60:.1f} min | {r['peak_rss_gb']:.2f} GB | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()

"""The two reports of scripts/gpu_check.sh.
    python scripts/gpu_report.py decisions          # the precision, attention, kernel and batch decisions here
    python scripts/gpu_report.py table OUT SECONDS  # OUT/gpu_check.md from OUT/gpu_check.jsonl (+ benchmark JSON)
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine_line() -> str:
    import torch

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    return f"{gpu} | torch {torch.__version__} (CUDA {torch.version.cuda})"


def decisions() -> None:
    from chatgpt_recipes.modeling.kernels import liger_available, packed_attention_choice
    from chatgpt_recipes.runtime.precision import choose_precision, detect_capability

    capability = detect_capability()
    precision = choose_precision(capability)
    attention, why = packed_attention_choice(capability.device, precision.bf16 or precision.fp16)
    print(json.dumps({"machine": machine_line(), "precision": precision.reason, "attention": f"{attention}: {why}",
                      "liger_kernel": liger_available()}, indent=1))


def write_table(out: str, seconds: int) -> None:
    out = Path(out)
    steps = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines() if line.strip()]
    lines = [f"gpu_check: {machine_line()} | {seconds} s in all", "", "| step | status | seconds | limit |",
             "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit']} |" for s in steps]
    sys.path.insert(0, str(REPO / "benchmarks"))
    for name in ("sft_throughput_1.7b", "alpaca_epoch_135m", "sft_throughput_135m"):
        saved = out / f"{name}.json"
        if saved.is_file():
            from sft_throughput import summarise

            data = json.loads(saved.read_text())
            if data.get("runs"):
                lines += ["", f"### {name}", summarise(data["runs"], data["matmul_peaks"], data.get("base"))]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1] == "decisions":
        decisions()
    else:
        write_table(sys.argv[2], int(sys.argv[3]))

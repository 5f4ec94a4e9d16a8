"""Models with random weights from the configs in benchmarks/gpu_models: SmolLM2-135M and the SmolLM2-1.7B shape, both
with SmolLM2's real tokenizer and chat template (copied from TOKENIZER_DIR). Speed and every code path are real;
answer quality is not. For a GPU machine without the weights (scripts/gpu_check.sh).
    python scripts/make_models.py OUT_DIR TOKENIZER_DIR      # writes OUT_DIR/smollm2-135m and OUT_DIR/smollm2-1.7b
"""
import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("tokenizer_dir", help="a directory with SmolLM2's tokenizer files")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-1.7b"])
args = parser.parse_args()
for name in args.models:
    start, out = time.time(), Path(args.out) / name
    if (out / "model.safetensors").is_file():
        continue
    config = AutoConfig.from_pretrained(CONFIGS / name)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for file in TOKENIZER_FILES:
        if (Path(args.tokenizer_dir) / file).is_file():
            shutil.copy(Path(args.tokenizer_dir) / file, out / file)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {time.time() - start:.1f} s")
    del model

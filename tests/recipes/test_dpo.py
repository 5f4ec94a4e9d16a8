"""recipes/dpo.py on a tiny model through `accelerate launch`: trains, evaluates reward accuracy, saves a plain
merged model that records its prompt format."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def test_dpo_runs_on_tiny_model(tmp_path, tiny_llama_dir):
    out = tmp_path / "dpo"
    result = run_recipe("dpo.py", "--model_name_or_path", tiny_llama_dir, "--max_steps", "2",
                        "--max_train_samples", "8", "--eval_split_size", "6", "--max_length", "128",
                        "--learning_rate", "1e-3", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
                        "--output_dir", out)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_rewards/accuracies", "eval_rewards/margins"} <= set(results)
    assert "eval reward accuracy" in result.stdout
    assert "multi-turn conversation cannot be rendered in the alpaca format" in result.stdout  # counted skip
    info = json.loads((out / "stage_info.json").read_text())
    assert info["prompt_format"] == "alpaca" and info["max_length"] == 128
    assert set(info["truncation"]) == {"train", "eval"}  # what was cut to max_length, counted (issue 34)
    assert "cut to max_length=128" in result.stdout
    initial = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(value, final[name]) for name, value in initial.items())

"""chatgpt_recipes/config.py: a YAML recipe plus command-line overrides; unknown keys and bad values are clear errors."""

import pytest
from sft_lora import SFTRecipeConfig

from chatgpt_recipes.config import ConfigError, parse_config
from chatgpt_recipes.models import ModelArguments

TYPES = (SFTRecipeConfig, ModelArguments)
DEFAULT = "sft/smollm2_alpaca_lora.yaml"


def test_default_yaml_and_overrides():
    config, model_args = parse_config(TYPES, DEFAULT, [])
    assert model_args.model_name_or_path == "smollm2-135m-instruct" and model_args.use_peft
    assert config.dataset_name == "data/alpaca_en_demo.json" and config.packing
    config, model_args = parse_config(TYPES, DEFAULT, ["--model_name_or_path", "gpt2", "--max_steps", "3"])
    assert model_args.model_name_or_path == "gpt2" and config.max_steps == 3


@pytest.mark.parametrize("name", ["sft/gpt2_alpaca_full.yaml", "sft/smollm2_chat_lora.yaml",
                                  "sft/qwen2.5_alpaca_qlora.yaml", "sft/llama3.2_chat_lora.yaml",
                                  "sft/mistral7b_alpaca_qlora.yaml"])
def test_every_sft_yaml_parses(name):
    from chatgpt_recipes.config import RECIPES_DIR

    config, model_args = parse_config(TYPES, DEFAULT, ["--config", str(RECIPES_DIR / "configs" / name)])
    assert config.output_dir and model_args.model_name_or_path


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: gpt2\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml or the command line sets unknown option\(s\) \['learning_rat'\]"):
        parse_config(TYPES, DEFAULT, ["--config", str(path)])


def test_unknown_flag_missing_file_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['lora_rank'\]"):
        parse_config(TYPES, DEFAULT, ["--lora_rank", "8"])
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        parse_config(TYPES, DEFAULT, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be positive, got 0"):
        parse_config(TYPES, DEFAULT, ["--per_device_train_batch_size", "0"])


def test_single_cpu_process_under_accelerate_launch_uses_every_core(monkeypatch):
    """`accelerate launch` without a config on a CPU-only machine sets OMP_NUM_THREADS=1 for its one process."""
    import os

    import torch

    from chatgpt_recipes.config import use_all_cores_under_accelerate

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs 2+ cores")
    threads = torch.get_num_threads()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # several CPU processes: accelerate's split is kept
        torch.set_num_threads(1)
        use_all_cores_under_accelerate()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("WORLD_SIZE")
        use_all_cores_under_accelerate()
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(threads)

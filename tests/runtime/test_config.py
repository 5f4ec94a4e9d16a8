"""chatgpt_recipes/runtime/config.py: a YAML recipe plus command-line overrides; unknown keys and bad values are clear errors."""

import pytest
from sft_lora import SFTRecipeConfig

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.modeling.loading import ModelArguments
from chatgpt_recipes.runtime.errors import ConfigError

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
    from chatgpt_recipes.runtime.config import RECIPES_DIR

    config, model_args = parse_config(TYPES, DEFAULT, ["--config", str(RECIPES_DIR / "configs" / name)])
    assert config.output_dir and model_args.model_name_or_path


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: gpt2\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml sets unknown option\(s\) \['learning_rat'\]"):
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

    from chatgpt_recipes.runtime.config import use_all_cores_under_accelerate

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


RECIPE_OF_CONFIG_DIR = {"sft": "sft_lora", "dpo": "dpo", "reward": "reward_model", "ppo": "ppo", "rloo": "rloo",
                        "pretrain": "pretrain", "evaluate": "evaluate_model", "comparison_data": "comparison_data",
                        "self_instruct": "self_instruct", "pipeline": "pipeline", "grpo": "grpo"}


def recipe_config_types(recipe: str) -> tuple:
    """The dataclasses a recipe's entry point parses: `run(main, (A, B), ...)` in its source."""
    import importlib
    import re

    from chatgpt_recipes.runtime.config import RECIPES_DIR

    module = importlib.import_module(recipe)
    if hasattr(module, "OPTIONS"):
        return module.OPTIONS
    names = re.search(r"run\(main, \(([\w, ]+)\)", (RECIPES_DIR / f"{recipe}.py").read_text()).group(1)
    return tuple(getattr(module, name.strip()) for name in names.split(",") if name.strip())


def test_every_shipped_yaml_passes_the_option_checks(tmp_path):
    """The option checks (chatgpt_recipes.cli) refuse no recipe the repository ships."""
    from chatgpt_recipes.runtime.config import RECIPES_DIR

    configs = sorted((RECIPES_DIR / "configs").glob("*/*.yaml"))
    assert {path.parent.name for path in configs} == set(RECIPE_OF_CONFIG_DIR)
    for path in configs:
        extra = [] if path.parent.name == "pipeline" else ["--output_dir", str(tmp_path / "out")]
        parsed = parse_config(recipe_config_types(RECIPE_OF_CONFIG_DIR[path.parent.name]), "unused",
                              ["--config", str(path), *extra])
        if path.parent.name == "pipeline":  # and every stage's options, as the pipeline checks them before it runs
            from pipeline import check_stage_options, stage_paths

            check_stage_options(parsed[0], stage_paths(parsed[0]))


@pytest.mark.parametrize("text, message", [
    ("max_steps: 3\n  bad: : 1\n", r"bad.yaml: not valid YAML at line 2, column 6: mapping values are not allowed"),
    ("learning_rate: [1, 2]\n", r"bad.yaml: learning_rate must be a number, got \[1, 2\]"),
    ("learning_rate: .nan\n", r"bad.yaml: learning_rate must be a finite number, got nan"),
    ("max_length: 0\n", r"bad.yaml: max_length must be positive, got 0"),
    ("max_skipped_fraction: 2\n", r"bad.yaml: max_skipped_fraction must be between 0 and 1, got 2"),
    ("num_train_epochs: 0\nmax_steps: 0\n", r"would train 0 steps"),
])
def test_option_values_are_refused_with_the_file_and_the_option(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(TYPES, DEFAULT, ["--config", str(path)])


def test_flags_only_scripts_are_checked_like_recipes():
    from chat import ChatArguments
    from merge_lora import MergeArguments

    from chatgpt_recipes.cli import parse_flags

    with pytest.raises(ConfigError, match=r"command-line option --temperature must not be negative, got -1.0"):
        parse_flags((ChatArguments,), ["--temperature", "-1"])
    with pytest.raises(ConfigError, match=r"command-line option --prompt_format must be one of \['auto', 'alpaca'"):
        parse_flags((ChatArguments,), ["--prompt_format", "chatml"])
    (merge,) = parse_flags((MergeArguments,), ["--dtype", "bfloat16"])
    assert merge.dtype == "bfloat16"


def test_warnings_that_do_not_apply_are_silenced_by_their_text_only(caplog):
    import logging
    import warnings

    from chatgpt_recipes.runtime.output import quiet_warnings_that_do_not_apply

    quiet_warnings_that_do_not_apply()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings_that_do_not_apply()  # as run() installs it, after any "always"
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`something_else` is deprecated and will be removed in v6.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated and will be removed in v6."]
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=bnb.name):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                    ModuleNotFoundError("No module named 'kernels'"))
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                    RuntimeError("kernel build failed"))  # another cause applies: kept
    assert len(caplog.records) == 1 and "kernel build failed" in caplog.records[0].getMessage()

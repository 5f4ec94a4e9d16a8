"""Every recipe's option values, checked in one place before anything heavy loads (chatgpt_recipes.config calls
`check_options` on each parsed config dataclass). The checks go by option name, so an option means the same in
every recipe that has it; an invalid value is a ConfigError naming the option and where it was set (the config
file or the command line), instead of a library failing on it deep inside, or silently doing something else."""

import dataclasses
import math
import types
import typing
from pathlib import Path

from chatgpt_recipes.config import ConfigError
from chatgpt_recipes.templates import PROMPT_FORMATS

# > 0 when set
POSITIVE = {
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length",
    "max_new_tokens", "sample_max_new_tokens", "max_prompt_length", "max_completion_length", "response_length",
    "ptx_batch_size", "ptx_max_length", "block_size", "batch_size", "num_pairs", "max_answer_tokens",
    "num_instructions", "num_prompt_instructions", "request_batch_size", "num_prompts", "max_train_samples",
    "max_train_prompts", "max_train_minutes", "num_generations", "num_mini_batches", "num_ppo_epochs",
    "text_eval_documents", "request_timeout", "lora_r", "lora_alpha", "learning_rate", "dataset_num_proc",
}
# >= 0
NON_NEGATIVE = {
    "weight_decay", "max_grad_norm", "warmup_steps", "eval_split_size", "sft_eval_split_size",
    "preference_eval_split_size", "temperature", "kl_coef", "ptx_coef", "vf_coef", "beta", "eval_prompts",
    "sample_every", "max_retries", "max_unparseable_batches", "num_workers", "seed", "save_total_limit",
}
# within [0, 1]
FRACTION = {"lora_dropout", "max_skipped_fraction", "min_reward_model_accuracy", "warmup_ratio", "top_p",
            "max_rouge_l"}
CHOICES = {
    "overlong": ("drop", "truncate"),
    "on_weak_reward_model": ("error", "warn"),
    "txt_sample_by": ("line", "paragraph", "document"),
    "prompt_style": ("completion", "chat"),
    "prompt_format": PROMPT_FORMATS,
}
CHOICES_OF = {("ChatArguments", "prompt_format"): ("auto", *PROMPT_FORMATS)}  # auto: read stage_info.json
# the dtype of a model the recipe loads; merge_lora saves float32 or bfloat16 (its --dtype help), never float16
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_CHOICES = {"MergeArguments": ("auto", "float32", "bfloat16")}
# options naming a model directory (or a hub id); the reward model ones must be a one-score classifier
MODEL_OPTIONS = ("model_name_or_path", "adapter_path", "reward_model_path", "reward_model")
REWARD_MODEL_OPTIONS = ("reward_model_path", "reward_model")
# options naming a data file (or a hub dataset id)
DATA_OPTIONS = ("dataset_name", "eval_dataset_name", "ptx_dataset_name", "preference_dataset", "text_dataset",
                "seed_tasks")


def check_options(config, where) -> None:
    """Refuse `config`'s invalid values. `where(name)` says where option `name` was set, for the message."""
    hints = _type_hints(type(config))
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name, None)
        if value is None:
            continue
        expected = _simple_type(hints.get(name))
        if expected is not None and not _is_instance(value, expected):
            raise ConfigError(f"{where(name)} must be {_type_words(expected)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                name.startswith("lora_") and getattr(config, "use_peft", True) is False):  # unused without LoRA
            _check_number(name, value, where)
        choices = CHOICES_OF.get((type(config).__name__, name), CHOICES.get(name))
        if choices and value not in choices:
            raise ConfigError(f"{where(name)} must be one of {list(choices)}, got {value!r}")
        if name == "dtype" and isinstance(value, str):
            allowed = DTYPE_CHOICES.get(type(config).__name__, DTYPES)
            if value not in allowed:
                raise ConfigError(f"{where(name)} must be one of {list(allowed)}, got {value!r}")
        if name in DATA_OPTIONS and isinstance(value, str):
            check_data_path(value, where(name), corpus=hasattr(config, "txt_sample_by"))
        if name in MODEL_OPTIONS and isinstance(value, str) and Path(value).expanduser().is_dir():
            check_model_option(value, where(name), name in REWARD_MODEL_OPTIONS,
                               getattr(config, "allow_pickle_weights", False))
        if name == "output_dir" and isinstance(value, str) and Path(value).expanduser().exists() \
                and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{where(name)} is {value}, an existing file, not a directory: choose another "
                              "output_dir")
    _check_training_length(config, where)


def _check_number(name: str, value, where) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where(name)} must be a finite number, got {value}")
    if name in POSITIVE and value <= 0:
        raise ConfigError(f"{where(name)} must be positive, got {value}")
    if name in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{where(name)} must not be negative, got {value}")
    if name in FRACTION and not 0 <= value <= 1:
        raise ConfigError(f"{where(name)} must be between 0 and 1, got {value}")


def _check_training_length(config, where) -> None:
    """Zero training steps would exit 0 and save an untrained model whose stage_info the next stage accepts."""
    if not (hasattr(config, "max_steps") and hasattr(config, "num_train_epochs")):
        return
    total_episodes = getattr(config, "total_episodes", None)  # PPO: overrides num_train_epochs when set
    if total_episodes is not None:
        if total_episodes <= 0:
            raise ConfigError(f"{where('total_episodes')} must be positive, got {total_episodes}")
        return
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ConfigError(f"{where('num_train_epochs')} is {config.num_train_epochs} and {where('max_steps')} is "
                          f"{config.max_steps}: the run would train 0 steps. Set num_train_epochs > 0 or "
                          "max_steps > 0")


def check_data_path(value: str, where: str, corpus: bool = False) -> None:
    """A local directory is not a dataset: the loaders read one file (a pretraining corpus: a glob) or a hub id."""
    from chatgpt_recipes.rows import directory_is_no_dataset

    problem = directory_is_no_dataset(value)
    if problem:
        glob_hint = f"; for a corpus of many files give a glob, e.g. '{value.rstrip('/')}/*.txt'" if corpus else ""
        raise ConfigError(f"{where}: {problem}{glob_hint}")


def check_model_option(value: str, where: str, reward_model: bool, allow_pickle_weights: bool) -> None:
    """A local model directory with its weights whole (and, for a reward model, a one-score classifier): found
    wrong now rather than after the data is prepared."""
    from chatgpt_recipes.models import ModelLoadError, check_model_directory
    from chatgpt_recipes.rl_inputs import check_policy_path, check_reward_model_path

    try:
        if reward_model:
            check_reward_model_path(value)
        check_policy_path(value)  # an adapter's base first: without it, its weights are of no use
        check_model_directory(value, allow_pickle_weights)
    except ModelLoadError as error:
        raise ModelLoadError(f"{where}: {error}") from None


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a library's annotation that does not resolve: check only the fields that do
        hints = {}
        for klass in reversed(cls.__mro__):
            for name, hint in getattr(klass, "__annotations__", {}).items():
                if not isinstance(hint, str):
                    hints[name] = hint
        return hints


def _simple_type(hint):
    """int, float, bool or str for a field annotated with one of them (or Optional of one); else None."""
    if hint in (int, float, bool, str):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1 and args[0] in (int, float, bool, str):
            return args[0]
    return None


def _is_instance(value, expected) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_words(expected) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a text"}[expected]

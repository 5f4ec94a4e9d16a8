"""The recipes' front door: a recipe's options parsed from its YAML and the command line (the TRL /
alignment-handbook way: TrlParser), every option value checked before any work, and the run ended on one clear
line for an error or a Ctrl-C. A recipe run with no `--config` uses its default YAML, so `python recipes/X.py` runs
the embedded demo.

The option checks go by option name, so an option means the same in every recipe that has it; an invalid value is
a ConfigError naming the option and where it was set (the config file or the command line), instead of a library
failing on it deep inside, or silently doing something else. Nothing in the package imports this module: it sits
on top of every layer (docs/package.md)."""

import dataclasses
import logging
import math
import sys
import tempfile
import types
import typing
import warnings
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging as transformers_logging
from trl import TrlParser

from chatgpt_recipes.data.rows import LOCAL_FORMATS, directory_is_no_dataset
from chatgpt_recipes.data.templates import PROMPT_FORMATS
from chatgpt_recipes.modeling.loading import check_model_directory
from chatgpt_recipes.rl.inputs import check_policy_path, check_reward_model_path
from chatgpt_recipes.runtime.config import (RECIPES_DIR, check_launcher, check_yaml, end_distributed, has_accelerator,
                                            resolve_precision_flags, resolve_weights_dtype,
                                            use_all_cores_under_accelerate)
from chatgpt_recipes.runtime.errors import EXIT_ERROR, EXIT_INTERRUPTED, ConfigError, ModelLoadError, RecipeError
from chatgpt_recipes.runtime.output import quiet_warnings_that_do_not_apply, record_error_for_launcher, say
from chatgpt_recipes.training.resume import last_complete_checkpoint


def run(main, dataclass_types, default_config: str | None = None) -> None:
    """A script's entry point: parse its options (a YAML recipe when it has a default config, else flags
    only), check them, call main, and end a RecipeError or a Ctrl-C on one clear line (exit statuses: README,
    "Errors and exit statuses")."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_propagation()  # with CI=true it also hands its lines to this root handler: twice
    quiet_warnings_that_do_not_apply()
    use_all_cores_under_accelerate()
    parsed = []
    try:
        parsed = parse_flags(dataclass_types) if default_config is None else parse_config(dataclass_types,
                                                                                            default_config)
        main(*parsed)
        end_distributed()
    except RecipeError as error:
        exit_on_error(str(error))
    except KeyboardInterrupt:
        exit_on_interrupt(next((getattr(p, "output_dir", None) for p in parsed if getattr(p, "output_dir", None)),
                               None))

def exit_on_error(message: str) -> None:
    """Print `error: MESSAGE` once and exit with EXIT_ERROR. Under a multi-process launch every process has
    the error (they run the same checks on the same inputs): the main process prints it, and each process
    also leaves it in torch's per-process error file, so that the launcher's failure summary shows this message
    instead of "To enable traceback see ..." (and shows it for a process that failed alone)."""
    say(f"error: {message}", file=sys.stderr)
    record_error_for_launcher(f"error: {message}")
    sys.exit(EXIT_ERROR)

def exit_on_interrupt(output_dir: str | None) -> None:
    """Ctrl-C: one line saying where the run stopped and what rerunning does, exit 130 (no traceback)."""
    where = ""
    if output_dir:
        checkpoint = last_complete_checkpoint(output_dir, quiet=True)
        where = (f"; the newest complete checkpoint is {checkpoint}: rerun the same command to resume from it"
                 if checkpoint else f"; {output_dir} holds no complete checkpoint yet: rerunning the same command "
                                    "starts from the beginning")
    say(f"\ninterrupted (Ctrl-C){where}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)

def parse_flags(dataclass_types, args: list[str] | None = None):
    """Instances of `dataclass_types` from command-line flags alone (the scripts without a YAML recipe: chat,
    merge_lora), checked like a recipe's options: an unknown, abbreviated or misspelt flag and a word that belongs
    to no flag are errors."""
    from transformers import HfArgumentParser

    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    parser.allow_abbrev = False  # `--max_new_token 5` is an unknown flag, not --max_new_tokens
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    except SystemExit as error:  # argparse already printed which flag is bad, or the --help asked for
        if error.code == 0:
            raise
        raise ConfigError("the command line: an option value of the wrong type (the line above names the "
                          "option)") from error
    except ValueError as error:
        raise _library_refusal(error, "the command line") from None
    check_leftovers(remaining, "the command line")
    command_line = {item[2:].split("=", 1)[0] for item in args if item.startswith("--")}
    for instance in parsed:
        check_values(instance, None, command_line)
    return parsed


def check_leftovers(remaining: list[str], origin: str) -> None:
    """What the parser did not take: unknown flags (with the words after them) and words that follow no flag (an
    unquoted value with spaces: `--prompt Name three colors.`)."""
    unknown, stray, after_unknown = [], [], False
    for item in remaining:
        if item.startswith("--"):
            unknown.append(item[2:].split("=", 1)[0])
            after_unknown = "=" not in item
        elif not after_unknown:
            stray.append(item)
    if unknown:
        raise ConfigError(f"{origin} sets unknown option(s) {unknown} (options are never abbreviated); run with "
                          "--help for the options")
    if stray:
        raise ConfigError(f"{origin} has word(s) {stray} that belong to no option: quote a value that holds "
                          "spaces, e.g. --prompt \"Name three colors.\"")


def _library_refusal(error: ValueError, origin: str) -> RecipeError:
    """A library config's own check (TRL's or transformers' __post_init__) as one error line naming the options."""
    if isinstance(error, RecipeError):
        return error
    message = " ".join(str(error).split())
    hint = ""
    if "at least 2 generations per prompt" in message:  # TRL's message does not name the option
        message = f"num_generations must be 2 or more: {message}"
    if "num_generations" in message and "divisible" in message:
        hint = (" (the generation batch is per_device_train_batch_size x gradient_accumulation_steps x processes, "
                "unless generation_batch_size or steps_per_generation is set: make it a multiple of "
                "num_generations)")
    return ConfigError(f"{origin}: {message}{hint}")


def parse_config(dataclass_types, default_config: str, args: list[str] | None = None, flags_from: str | None = None,
                 quiet: bool = False):
    """Instances of `dataclass_types` from `--config FILE` (default: `default_config`, relative to recipes/configs)
    and command-line overrides. Unknown YAML keys and flags are errors, never silently ignored, and so is an
    abbreviated flag. `flags_from` names where the flags came from when not the command line (the pipeline: its
    YAML and stage), for the messages; `quiet` skips the precision line (the pipeline checks every stage first)."""
    args = list(sys.argv[1:] if args is None else args)
    if "--config" not in args:
        if not RECIPES_DIR.is_dir():
            raise ConfigError(f"no recipes/ next to the installed package ({RECIPES_DIR} is missing): install it from "
                              "a checkout of the repository with `pip install -r requirements.txt` (editable), or pass "
                              "--config")
        args = ["--config", str(RECIPES_DIR / "configs" / default_config)] + args
    if "--use_cpu" not in args and not has_accelerator():
        args += ["--use_cpu", "true"]  # transformers refuses bf16 autocast on a CPU unless told it is one
    check_launcher()
    config_path = args[args.index("--config") + 1]
    check_yaml(config_path)
    command_line = {item[2:].split("=", 1)[0] for item in args if item.startswith("--")} - {"config", "use_cpu"}
    origin = f"{config_path} or {flags_from or 'the command line'}"
    precision = None
    if any("bf16" in dataclass.__dataclass_fields__ for dataclass in dataclass_types):
        precision, args = resolve_precision_flags(args, config_path, quiet=quiet)
    parser = TrlParser(dataclass_types)
    parser.allow_abbrev = False  # `--max_step 1` is an unknown flag, not --max_steps
    try:
        with warnings.catch_warnings():
            # TRL 1.12's configs default `gradient_checkpointing` (trl/trainer/base_config.py), so transformers
            # 5.23 warns that this name is deprecated on every run, whatever the YAML says; in 5.x it still works
            # (it mirrors `activation_checkpointing`)
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            *parsed, config_unknown, remaining = parser.parse_args_and_config(
                args, return_remaining_strings=True, separate_remaining_strings=True)
    except SystemExit as error:  # argparse already printed which flag is bad, or the --help asked for
        if error.code == 0:
            raise
        raise ConfigError(f"{origin}: an option value of the wrong type (the line above names the "
                          "option)") from error
    except ValueError as error:  # TRL's and transformers' own checks of the options (their __post_init__)
        raise _library_refusal(error, origin) from None
    yaml_unknown = [item[2:] for item in config_unknown if item.startswith("--")]
    if yaml_unknown:
        raise ConfigError(f"{config_path} sets unknown option(s) {yaml_unknown}; run with --help for the options")
    check_leftovers(remaining, flags_from or "the command line")
    for instance in parsed:
        check_values(instance, config_path, command_line, flags_from)
    if precision is not None:
        resolve_weights_dtype(parsed, precision)
    seed = next((instance.seed for instance in parsed if hasattr(instance, "seed")), None)
    if seed is not None:
        # The Trainer seeds only when built, after LoRA weights and reward heads are drawn: seed now, so that
        # those start the same on every run and for every process count (1 process or N under accelerate launch)
        set_seed(seed)
    return parsed

def check_values(config, config_path: str | None, command_line: set[str] = frozenset(),
                 flags_from: str | None = None) -> None:
    """Catch values the libraries would accept silently or fail on deep inside (chatgpt_recipes.cli,
    the one place where option values are checked). The error names where the value came from: the command line
    (or `flags_from`, e.g. the pipeline's YAML and stage) or the YAML."""
    def where(name: str) -> str:
        if name in command_line or config_path is None:
            return f"{flags_from}.{name}" if flags_from else f"command-line option --{name}"
        return f"{config_path}: {name}"

    check_options(config, where)


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
# Enumerated options that TRL 1.12 checks late (at the first training step or in the trainer, after the models
# loaded), by the TRL config class that has them: the values its trainers implement (trl/trainer/grpo_trainer.py
# _compute_loss, dpo_trainer.py, sft_trainer.py, experimental/ppo/ppo_trainer.py)
LATE_CHOICES = {
    "GRPOConfig": {"loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
                   "importance_sampling_level": ("token", "sequence"),
                   "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
                   "scale_rewards": ("group", "batch", "none")},
    "DPOConfig": {"loss_type": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
                  "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")},
    "SFTConfig": {"loss_type": ("nll", "dft", "chunked_nll")},
    "PPOConfig": {"kl_estimator": ("k1", "k3")},
}
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
    late_choices = {name: values for klass in type(config).__mro__ for name, values in
                    LATE_CHOICES.get(klass.__name__, {}).items()}
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
        choices = CHOICES_OF.get((type(config).__name__, name), CHOICES.get(name)) or late_choices.get(name)
        if choices and isinstance(value, list):
            wrong = [item for item in value if item not in choices]
            if wrong:
                raise ConfigError(f"{where(name)} must hold only values of {list(choices)}, got {wrong}")
        elif choices and value not in choices:
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
        if name == "output_dir" and isinstance(value, str):
            check_writable(value, where(name))
    _check_reward_weights(config, where)
    _check_dpo_losses(config, where)
    _check_training_length(config, where)
    if getattr(config, "system_prompt", None) is not None and getattr(config, "prompt_format", "chat") != "chat":
        raise ConfigError(f"{where('system_prompt')} is set, but {where('prompt_format')} is "
                          f"'{config.prompt_format}': only the chat format has a system turn (unset system_prompt, or "
                          "use prompt_format: chat)")


def check_writable(output_dir: str, where: str) -> None:
    """The output directory (or, while it does not exist, the nearest folder above it, where it will be made)
    takes a new file: found now, not when the first file is written after the data is prepared. Tried with a file
    rather than os.access, which says yes to root even on a read-only file system."""
    folder = Path(output_dir).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"{where} is {output_dir}, which cannot be written ({folder}: "
                          f"{error.strerror or error}): choose a writable output_dir") from None


# the DPO losses that take a non-default f_divergence_type (trl/trainer/dpo_trainer.py, DPOTrainer.__init__)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _check_dpo_losses(config, where) -> None:
    """DPOTrainer's own checks of the loss options, made when it is built (after the models loaded)."""
    if "DPOConfig" not in {klass.__name__ for klass in type(config).__mro__}:
        return
    losses = list(config.loss_type)
    if config.f_divergence_type != "reverse_kl" and not set(losses) <= set(F_DIVERGENCE_LOSSES):
        raise ConfigError(f"{where('f_divergence_type')} {config.f_divergence_type!r} works only with the loss types "
                          f"{list(F_DIVERGENCE_LOSSES)}; {where('loss_type')} is {losses}")
    if "exo_pair" in losses and config.label_smoothing == 0:
        raise ConfigError(f"{where('loss_type')} exo_pair needs {where('label_smoothing')} > 0 (the EXO paper "
                          "recommends 1e-3)")


def _check_reward_weights(config, where) -> None:
    """TRL checks reward_weights against its reward functions only when the trainer is built, after the models
    loaded: one weight for the reward model and one per rule reward (grpo.py's rule_rewards)."""
    weights = getattr(config, "reward_weights", None)
    if weights is None:
        return
    rule_rewards = list(getattr(config, "rule_rewards", None) or [])
    if len(weights) != 1 + len(rule_rewards):
        raise ConfigError(f"{where('reward_weights')} has {len(weights)} weight(s), {weights}; it needs "
                          f"{1 + len(rule_rewards)}: one for the reward model"
                          + (f" and one per rule reward {rule_rewards}" if rule_rewards else " (no rule_rewards set)"))


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
    """A local directory is not a dataset: the loaders read one file (a pretraining corpus: a glob) or a hub id. A
    data file that is not there is found now, as the loaders would find it (a data file's suffix, or a path that
    starts with . / ~), not after the stages before it have run (the pipeline)."""
    problem = directory_is_no_dataset(value)
    if problem:
        glob_hint = f"; for a corpus of many files give a glob, e.g. '{value.rstrip('/')}/*.txt'" if corpus else ""
        raise ConfigError(f"{where}: {problem}{glob_hint}")
    path = Path(value).expanduser()
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if not corpus and not path.exists() and (suffix in LOCAL_FORMATS or value.startswith((".", "/", "~"))):
        raise ConfigError(f"{where}: data file not found: {value}")


def check_model_option(value: str, where: str, reward_model: bool, allow_pickle_weights: bool) -> None:
    """A local model directory with its weights whole (and, for a reward model, a one-score classifier): found
    wrong now rather than after the data is prepared."""
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

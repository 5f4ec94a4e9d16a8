"""Config parsing the TRL / alignment-handbook way: a YAML recipe plus command-line overrides (TrlParser).
A recipe run with no `--config` uses its default YAML, so `python recipes/X.py` runs the embedded demo."""

import logging
import os
import sys
from pathlib import Path

from transformers import set_seed
from trl import TrlParser

RECIPES_DIR = Path(__file__).resolve().parent.parent


class RecipeError(Exception):
    """An error the user can fix (bad data, config, model path, a diverged run): `run` prints its message
    alone, without a traceback, and exits with status 2."""


class ConfigError(RecipeError, ValueError):
    """A bad recipe config: unknown key, bad value. The message names the file or flag."""


def run(main, dataclass_types, default_config: str | None = None) -> None:
    """A script's entry point: parse its options (a YAML recipe when it has a default config, else flags
    only), call main, and turn a RecipeError into one clear line."""
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    use_all_cores_under_accelerate()
    try:
        if default_config is None:
            main(*HfArgumentParser(dataclass_types).parse_args_into_dataclasses())
        else:
            main(*parse_config(dataclass_types, default_config))
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_config(dataclass_types, default_config: str, args: list[str] | None = None):
    """Instances of `dataclass_types` from `--config FILE` (default: `default_config`, relative to recipes/configs)
    and command-line overrides. Unknown YAML keys and flags are errors, never silently ignored."""
    args = list(sys.argv[1:] if args is None else args)
    if "--config" not in args:
        args = ["--config", str(RECIPES_DIR / "configs" / default_config)] + args
    if "--use_cpu" not in args and not _has_accelerator():
        args += ["--use_cpu", "true"]  # transformers refuses bf16 autocast on a CPU unless told it is one
    config_path = args[args.index("--config") + 1]
    if not Path(config_path).is_file():
        raise ConfigError(f"config file not found: {config_path}")
    parser = TrlParser(dataclass_types)
    try:
        *parsed, remaining = parser.parse_args_and_config(args, return_remaining_strings=True)
    except SystemExit as error:  # argparse already printed which flag is bad
        raise ConfigError(f"bad command-line option or value (see above); config: {config_path}") from error
    unknown = [item[2:] for item in remaining if item.startswith("--")]
    if unknown:
        raise ConfigError(f"{config_path} or the command line sets unknown option(s) {unknown}; "
                          f"run with --help for the options")
    for instance in parsed:
        check_values(instance, config_path)
    seed = next((instance.seed for instance in parsed if hasattr(instance, "seed")), None)
    if seed is not None:
        # The Trainer seeds only when built, after LoRA weights and reward heads are drawn: seed now, so that
        # those start the same on every run and for every process count (1 process or N under accelerate launch)
        set_seed(seed)
    return parsed


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_values(config, config_path: str) -> None:
    """Catch values the libraries would accept silently or fail on deep inside."""
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
        value = getattr(config, name, None)
        if value is not None and (value < 0 or (value == 0 and name != "learning_rate")):
            raise ConfigError(f"{config_path}: {name} must be positive, got {value}")


def use_all_cores_under_accelerate() -> None:
    """`accelerate launch script.py` with no config on a machine without a GPU counts 0 processes, skips its CPU
    thread heuristic and starts the one process with OMP_NUM_THREADS=1: half the speed of a 2-core CPU. Such a
    single CPU process gets every core it may run on. Several processes (accelerate_configs/cpu.yaml) keep the
    split accelerate chose, and so does `--num_cpu_threads_per_process N` for N > 1."""
    import torch

    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if (launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1"
            and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not _has_accelerator()):
        cores = len(os.sched_getaffinity(0))
        if cores > 1 and torch.get_num_threads() == 1:
            torch.set_num_threads(cores)
            logging.getLogger(__name__).info(
                "accelerate launch set OMP_NUM_THREADS=1 for this single CPU process; using all %d cores", cores)

"""Config parsing the TRL / alignment-handbook way: a YAML recipe plus command-line overrides (TrlParser).
A recipe run with no `--config` uses its default YAML, so `python recipes/X.py` runs the embedded demo."""

import logging
import os
import sys
import warnings
from pathlib import Path

from transformers import set_seed
from trl import TrlParser

# The recipes and their YAMLs are the checkout's scripts, not package data: the package is installed editable from
# the checkout (`-e .` in requirements.txt), so recipes/ sits next to src/.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(Exception):
    """An error the user can fix (bad data, config, model path, a diverged run): `run` prints its message
    alone, without a traceback, and exits with status 2."""


class ConfigError(RecipeError, ValueError):
    """A bad recipe config: unknown key, bad value. The message names the file or flag."""


def run(main, dataclass_types, default_config: str | None = None) -> None:
    """A script's entry point: parse its options (a YAML recipe when it has a default config, else flags
    only), check them, call main, and end a RecipeError or a Ctrl-C on one clear line (exit statuses: README,
    "Errors and exit statuses")."""
    from chatgpt_recipes.output import quiet_warnings_that_do_not_apply

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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


EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # 130: the shell's own status for a command ended by Ctrl-C (128 + SIGINT)


def exit_on_error(message: str) -> None:
    """Print `error: MESSAGE` once and exit with EXIT_ERROR. Under a multi-process launch every process has
    the error (they run the same checks on the same inputs): the main process prints it, and each process
    also leaves it in torch's per-process error file, so that the launcher's failure summary shows this message
    instead of "To enable traceback see ..." (and shows it for a process that failed alone)."""
    from chatgpt_recipes.output import record_error_for_launcher, say

    say(f"error: {message}", file=sys.stderr)
    record_error_for_launcher(f"error: {message}")
    sys.exit(EXIT_ERROR)


def exit_on_interrupt(output_dir: str | None) -> None:
    """Ctrl-C: one line saying where the run stopped and what rerunning does, exit 130 (no traceback)."""
    from chatgpt_recipes.output import say

    where = ""
    if output_dir:
        from chatgpt_recipes.resume import last_complete_checkpoint

        checkpoint = last_complete_checkpoint(output_dir, quiet=True)
        where = (f"; the newest complete checkpoint is {checkpoint}: rerun the same command to resume from it"
                 if checkpoint else f"; {output_dir} holds no complete checkpoint yet: rerunning the same command "
                                    "starts from the beginning")
    say(f"\ninterrupted (Ctrl-C){where}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def parse_flags(dataclass_types, args: list[str] | None = None):
    """Instances of `dataclass_types` from command-line flags alone (the scripts without a YAML recipe: chat,
    merge_lora), checked like a recipe's options."""
    from transformers import HfArgumentParser

    args = list(sys.argv[1:] if args is None else args)
    parsed = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args)
    command_line = {item[2:].split("=", 1)[0] for item in args if item.startswith("--")}
    for instance in parsed:
        check_values(instance, None, command_line)
    return parsed


def end_distributed() -> None:
    """Destroy the process group a launcher's run opened, once the work is done: a NCCL group left to the
    interpreter's exit can keep the process (and `accelerate launch`) from exiting, the likely cause of a ZeRO-3 SFT
    launcher still running ~40 s after saving on a GPU (issue 23; not yet rechecked on a GPU). Only after success:
    after an error another rank may still wait in a collective."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def parse_config(dataclass_types, default_config: str, args: list[str] | None = None):
    """Instances of `dataclass_types` from `--config FILE` (default: `default_config`, relative to recipes/configs)
    and command-line overrides. Unknown YAML keys and flags are errors, never silently ignored."""
    args = list(sys.argv[1:] if args is None else args)
    if "--config" not in args:
        if not RECIPES_DIR.is_dir():
            raise ConfigError(f"no recipes/ next to the installed package ({RECIPES_DIR} is missing): install it from "
                              "a checkout of the repository with `pip install -r requirements.txt` (editable), or pass "
                              "--config")
        args = ["--config", str(RECIPES_DIR / "configs" / default_config)] + args
    if "--use_cpu" not in args and not _has_accelerator():
        args += ["--use_cpu", "true"]  # transformers refuses bf16 autocast on a CPU unless told it is one
    check_launcher()
    config_path = args[args.index("--config") + 1]
    check_yaml(config_path)
    command_line = {item[2:].split("=", 1)[0] for item in args if item.startswith("--")} - {"config", "use_cpu"}
    precision = None
    if any("bf16" in dataclass.__dataclass_fields__ for dataclass in dataclass_types):
        precision, args = resolve_precision_flags(args, config_path)
    parser = TrlParser(dataclass_types)
    try:
        with warnings.catch_warnings():
            # TRL 1.12's configs default `gradient_checkpointing` (trl/trainer/base_config.py), so transformers
            # 5.23 warns that this name is deprecated on every run, whatever the YAML says; in 5.x it still works
            # (it mirrors `activation_checkpointing`)
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            *parsed, remaining = parser.parse_args_and_config(args, return_remaining_strings=True)
    except SystemExit as error:  # argparse already printed which flag is bad, or the --help asked for
        if error.code == 0:
            raise
        raise ConfigError(f"{config_path} or the command line: an option value of the wrong type (the line "
                          "above names the option)") from error
    unknown = [item[2:] for item in remaining if item.startswith("--")]
    if unknown:
        raise ConfigError(f"{config_path} or the command line sets unknown option(s) {unknown}; "
                          f"run with --help for the options")
    for instance in parsed:
        check_values(instance, config_path, command_line)
    if precision is not None:
        resolve_weights_dtype(parsed, precision)
    seed = next((instance.seed for instance in parsed if hasattr(instance, "seed")), None)
    if seed is not None:
        # The Trainer seeds only when built, after LoRA weights and reward heads are drawn: seed now, so that
        # those start the same on every run and for every process count (1 process or N under accelerate launch)
        set_seed(seed)
    return parsed


def _has_accelerator() -> bool:
    import torch

    return (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
            or torch.backends.mps.is_available())


def check_launcher() -> None:
    """Refuse an FSDP launch (accelerate_configs/fsdp2.yaml) of several processes on a machine without GPUs.
    accelerate 1.15 builds its FSDP plugin only for GPU-like devices: on a CPU the processes run as plain DDP
    (MULTI_CPU), or as independent single processes all writing the same output_dir, while transformers, reading
    the launcher's FSDP variables, loads the weights on rank 0 only and leaves the other ranks' new heads on the meta
    device. torch's own fully_shard does run on CPUs (scripts/fsdp2_on_cpu.py shows both)."""
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and not _has_accelerator()):
        raise ConfigError(
            "an FSDP launcher config (distributed_type: FSDP) on a machine without GPUs: accelerate does not run "
            "FSDP on CPUs (the processes would not shard, and the reward model's rank 1 would fail on meta "
            "tensors). On a CPU use accelerate_configs/cpu.yaml (DDP) or accelerate_configs/deepspeed_zero3.yaml "
            "(sharded, DeepSpeed's CPU accelerator); FSDP2 needs GPUs (docs/scaling.md)")


def check_yaml(config_path: str) -> None:
    """The --config file exists and is a YAML mapping of options; a syntax error names its line and column."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {config_path}" if not path.is_dir() else
                          f"--config {config_path} is a directory; name a YAML file")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{config_path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{config_path}: not UTF-8 text (byte {error.start})") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"{config_path}: expected a YAML mapping of option: value, found a "
                          f"{type(content).__name__}")


def check_values(config, config_path: str | None, command_line: set[str] = frozenset()) -> None:
    """Catch values the libraries would accept silently or fail on deep inside (chatgpt_recipes.option_checks,
    the one place where option values are checked). The error names where the value came from: the command line
    or the YAML."""
    from chatgpt_recipes.option_checks import check_options

    def where(name: str) -> str:
        if name in command_line or config_path is None:
            return f"command-line option --{name}"
        return f"{config_path}: {name}"

    check_options(config, where)


def _last_setting(args: list[str], config: dict, name: str):
    """The value of option `name` as the user set it: its last command-line occurrence, else the YAML's."""
    value = config.get(name)
    for index, item in enumerate(args):
        if item == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
        elif item.startswith(f"--{name}="):
            value = item.split("=", 1)[1]
    return value


def _without_option(args: list[str], name: str) -> list[str]:
    kept, skip = [], False
    for item in args:
        if skip:
            skip = False
        elif item == f"--{name}":
            skip = True
        elif not item.startswith(f"--{name}="):
            kept.append(item)
    return kept


def resolve_precision_flags(args: list[str], config_path: str):
    """Replace `bf16`/`fp16` set to auto (or unset) in the YAML or on the command line by the precision decision
    for this hardware (chatgpt_recipes/precision.py); explicit true/false stay. Prints the choice once."""
    import yaml

    from chatgpt_recipes.precision import announce, choose_precision, detect_capability, parse_flag

    config = yaml.safe_load(Path(config_path).read_text()) or {}
    try:
        requested = {name: parse_flag(_last_setting(args, config, name)) for name in ("bf16", "fp16")}
    except ConfigError as error:
        raise ConfigError(f"{config_path} or the command line: bf16/fp16: {error}") from None
    use_cpu = parse_flag(_last_setting(args, config, "use_cpu")) or not _has_accelerator()
    precision = choose_precision(detect_capability(bool(use_cpu)), **requested)
    for name in ("bf16", "fp16"):
        args = _without_option(args, name) + [f"--{name}", str(getattr(precision, name)).lower()]
    announce(precision.reason)
    return precision, args


def resolve_weights_dtype(parsed, precision) -> None:
    """`dtype: auto` (the default) stores frozen weights in the compute dtype and fully trained ones in fp32."""
    for instance in parsed:
        if getattr(instance, "dtype", None) in (None, "auto") and hasattr(instance, "use_peft"):
            instance.dtype = precision.weights_dtype(trains_all_weights=not instance.use_peft)


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

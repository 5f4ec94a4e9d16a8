"""What the front door (chatgpt_recipes.cli) needs below it: where the recipes' YAMLs are, the launcher and the
YAML file checked, bf16/fp16 set to auto resolved to this hardware's precision, the CPU threads a lone process
gets, and the process group closed after a run."""

import logging
import os
from pathlib import Path

import torch
import torch.distributed
import yaml

from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.precision import announce, choose_precision, detect_capability, parse_flag

# The recipes and their YAMLs are the checkout's scripts, not package data: the package is installed editable from
# the checkout (`-e .` in requirements.txt), so recipes/ sits next to src/.
RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"


def end_distributed() -> None:
    """Destroy the process group a launcher's run opened, once the work is done: a NCCL group left to the
    interpreter's exit can keep the process (and `accelerate launch`) from exiting, the likely cause of a ZeRO-3 SFT
    launcher still running ~40 s after saving on a GPU (issue 23; not yet rechecked on a GPU). Only after success:
    after an error another rank may still wait in a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def has_accelerator() -> bool:
    return (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
            or torch.backends.mps.is_available())


def check_launcher() -> None:
    """Refuse an FSDP launch (accelerate_configs/fsdp2.yaml) of several processes on a machine without GPUs.
    accelerate 1.15 builds its FSDP plugin only for GPU-like devices: on a CPU the processes run as plain DDP
    (MULTI_CPU), or as independent single processes all writing the same output_dir, while transformers, reading
    the launcher's FSDP variables, loads the weights on rank 0 only and leaves the other ranks' new heads on the meta
    device. torch's own fully_shard does run on CPUs (scripts/fsdp2_on_cpu.py shows both)."""
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and not has_accelerator()):
        raise ConfigError(
            "an FSDP launcher config (distributed_type: FSDP) on a machine without GPUs: accelerate does not run "
            "FSDP on CPUs (the processes would not shard, and the reward model's rank 1 would fail on meta "
            "tensors). On a CPU use accelerate_configs/cpu.yaml (DDP) or accelerate_configs/deepspeed_zero3.yaml "
            "(sharded, DeepSpeed's CPU accelerator); FSDP2 needs GPUs (docs/scaling.md)")


def check_yaml(config_path: str) -> None:
    """The --config file exists and is a YAML mapping of options; a syntax error names its line and column."""
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


def resolve_precision_flags(args: list[str], config_path: str, quiet: bool = False):
    """Replace `bf16`/`fp16` set to auto (or unset) in the YAML or on the command line by the precision decision
    for this hardware (chatgpt_recipes/runtime/precision.py); explicit true/false stay. Prints the choice once
    (not when `quiet`)."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    try:
        requested = {name: parse_flag(_last_setting(args, config, name)) for name in ("bf16", "fp16")}
    except ConfigError as error:
        raise ConfigError(f"{config_path} or the command line: bf16/fp16: {error}") from None
    use_cpu = parse_flag(_last_setting(args, config, "use_cpu")) or not has_accelerator()
    precision = choose_precision(detect_capability(bool(use_cpu)), **requested)
    for name in ("bf16", "fp16"):
        args = _without_option(args, name) + [f"--{name}", str(getattr(precision, name)).lower()]
    if not quiet:
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
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if (launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1"
            and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not has_accelerator()):
        cores = len(os.sched_getaffinity(0))
        if cores > 1 and torch.get_num_threads() == 1:
            torch.set_num_threads(cores)
            logging.getLogger(__name__).info(
                "accelerate launch set OMP_NUM_THREADS=1 for this single CPU process; using all %d cores", cores)

"""A run's output, once: under a multi-process launch (DDP, DeepSpeed, FSDP) every process runs the same code, so a
plain print shows each event once per process. `say` prints on the main process only; with RECIPES_DEBUG_RANKS=1
every process prints, its lines prefixed with its rank (per-rank detail when a multi-process run misbehaves)."""

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager

DEBUG_RANKS_ENV = "RECIPES_DEBUG_RANKS"


def process_rank() -> tuple[int, int]:
    """(rank, number of processes) as the launcher set them (torchrun, accelerate, deepspeed); (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def say(*values, sep: str = " ", end: str = "\n", file=None, flush: bool = True) -> None:
    """print() for the events of a run: once, by the main process (every process with RECIPES_DEBUG_RANKS=1)."""
    rank, world = process_rank()
    every_rank = os.environ.get(DEBUG_RANKS_ENV) == "1"
    if rank != 0 and not every_rank:
        return
    text = sep.join(map(str, values))
    if every_rank and world > 1:
        text = "\n".join(f"[rank {rank}] {line}" for line in text.split("\n"))
    print(text, end=end, file=file or sys.stdout, flush=flush)


def record_error_for_launcher(message: str) -> None:
    """Leave `message` in the error file torch's elastic launcher (torchrun, and `accelerate launch` with several
    processes or DeepSpeed) gives each process in TORCHELASTIC_ERROR_FILE: its failure summary then shows this
    message rather than a pointer to its docs. The file format is torch.distributed.elastic's documented one; no
    py_callstack, since a user error has no traceback worth showing. Nothing without that launcher."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as file:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, file)
    except OSError:
        pass  # the summary then says "To enable traceback see ...": the message is still printed above it


def _not_kernels_missing(record) -> bool:
    """bitsandbytes 0.50, on CPUs with AVX512-BF16, logs at its import that its optional `kernels` package is
    missing; it then uses its own CPU kernel, which the recipes' QLoRA path is tested with."""
    return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                and "No module named 'kernels'" in record.getMessage())


def _deepspeed_in_use_or_other(record) -> bool:
    """DeepSpeed 0.19 warns "Setting accelerator to CPU" whenever a library imports it on a machine without a GPU
    (transformers and accelerate do, to check that it is there); it applies only to a DeepSpeed launch."""
    return (not str(record.msg).startswith("Setting accelerator to CPU")
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true")


_NEW_HEAD_ROW = re.compile(r"^(\S+)\s*\|\s*MISSING\s*\|")
_head_to_be_replaced = False  # set by head_replaced_on_load()


@contextmanager
def head_replaced_on_load():
    """While a model is built whose new score head the trained one replaces at once (the base a LoRA adapter is
    merged into at save): the load report's line would say the opposite of what happens, so it is not shown."""
    global _head_to_be_replaced
    _head_to_be_replaced = True
    try:
        yield
    finally:
        _head_to_be_replaced = False


def _new_score_head_as_one_line(record) -> bool:
    """transformers 5.23 prints a LOAD REPORT table when a sequence classifier is built from a causal LM, its one
    row `score.weight | MISSING ... Consider training on your downstream task`: for a reward or value model a new
    score head is exactly the intent. Such a report (every row a MISSING `score.*`) becomes one line; any other
    report stays whole."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines() if "|" in line
            and not line.startswith(("Key", "-"))]
    keys = [match.group(1) for match in map(_NEW_HEAD_ROW.match, rows) if match]
    if not rows or len(keys) != len(rows) or not all(key.startswith("score.") for key in keys):
        return True
    if _head_to_be_replaced:
        return False
    source = message.split(" from: ", 1)[1].splitlines()[0] if " from: " in message else "the checkpoint"
    record.msg, record.args = f"{source}: new score head ({', '.join(keys)}), initialised for this recipe to train", ()
    return True


def quiet_library_logs() -> None:
    """The logger filters that keep lines that do not apply off the console, by their exact text; other lines of
    the same loggers stay. Installed when this module is imported, which a recipe does first, before its libraries:
    bitsandbytes logs its line at its import, which trl's import triggers, long before run() starts."""
    filters = {"bitsandbytes.backends.cpu.ops": _not_kernels_missing, "DeepSpeed": _deepspeed_in_use_or_other,
               "transformers.modeling_utils": _new_score_head_as_one_line}
    for name, keep in filters.items():
        logging.getLogger(name).addFilter(keep)  # a filter already there is not added twice


def quiet_warnings_that_do_not_apply() -> None:
    """Silence, by their exact text, library warnings that every run would print and that do not apply to what
    the recipes do (a new user takes them for failures). Others stay.
    - the logger filters of quiet_library_logs (also installed at this module's import);
    - transformers 5.23 warns that `is_gradient_checkpointing` is deprecated when TRL and PEFT read it: their code,
      not the user's."""
    quiet_library_logs()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


quiet_library_logs()

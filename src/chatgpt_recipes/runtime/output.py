"""A run's output, once: under a multi-process launch (DDP, DeepSpeed, FSDP) every process runs the same code, so a
plain print shows each event once per process. `say` prints on the main process only; with RECIPES_DEBUG_RANKS=1
every process prints, its lines prefixed with its rank (per-rank detail when a multi-process run misbehaves)."""

import os
import sys

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


def quiet_warnings_that_do_not_apply() -> None:
    """Silence, by their exact text, library warnings that every run would print and that do not apply to what
    the recipes do (a new user takes them for failures). Others stay.
    - bitsandbytes 0.50, on CPUs with AVX512-BF16, logs at import that its optional `kernels` package is missing;
      it then uses its own CPU kernel, which the recipes' QLoRA path is tested with.
    - transformers 5.23 warns that `is_gradient_checkpointing` is deprecated when TRL and PEFT read it: their code,
      not the user's."""
    import logging
    import warnings

    def not_kernels_missing(record) -> bool:
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    and "No module named 'kernels'" in record.getMessage())

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(not_kernels_missing)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

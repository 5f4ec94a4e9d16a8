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

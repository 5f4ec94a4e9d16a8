"""The cache of converted models and prepared datasets: where it lives, and one process filling an entry while
the others wait for it."""

import os
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live: $RECIPES_CACHE, else ~/.cache/chatgpt-recipes."""
    return Path(os.environ.get("RECIPES_CACHE", Path.home() / ".cache" / "chatgpt-recipes"))


@contextmanager
def _cache_entry_lock(out_dir: Path):
    """Held while one process fills `out_dir`: several processes (the ranks of `accelerate launch`, parallel test
    workers) may ask for the same model at once, and the others then wait and read the finished directory."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; a lost race still ends with one complete directory (see below)
        yield
        return
    with open(out_dir.parent / f"{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fill_cache_entry_once(out_dir: Path, fill) -> Path:
    """`out_dir`, made by `fill(out_dir)` unless it is already complete (has config.json); the process that takes
    the entry's lock first fills it and the others wait for it and then read it."""
    if not (out_dir / "config.json").exists():
        with _cache_entry_lock(out_dir):
            if not (out_dir / "config.json").exists():
                fill(out_dir)
    return out_dir

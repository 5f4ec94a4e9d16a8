"""Model weight files checked before anything reads them: a truncated safetensors or torch file is found from its
own header or trailer (an interrupted save or download), without loading the weights."""

import json
import zipfile
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, bad header), or None. Reads only the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as error:
        return f"{path.name} is unreadable ({error})"
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if size >= 8 + header_len + data_end else f"{path.name} is truncated"


def torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose central directory comes last: a truncated file is not a zip."""
    return None if zipfile.is_zipfile(path) else f"{path.name} is truncated or not a torch file"


def weights_problem(checkpoint: Path) -> str | None:
    """Why the model or adapter weights in `checkpoint` are unusable (missing, truncated), or None."""
    for index_name in ("model.safetensors.index.json", "adapter_model.safetensors.index.json"):
        index = checkpoint / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return f"{index_name} is unreadable"
            for shard in shards:
                if not (checkpoint / shard).is_file():
                    return f"weight shard {shard} is missing"
                problem = safetensors_problem(checkpoint / shard)
                if problem:
                    return problem
            return None
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (checkpoint / name).is_file():
            return safetensors_problem(checkpoint / name)
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        if (checkpoint / name).is_file():
            return torch_file_problem(checkpoint / name)
    if any(checkpoint.glob("global_step*")):  # DeepSpeed keeps the weights in its own folder
        return None
    return "no model weights"

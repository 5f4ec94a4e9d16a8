"""SFT's held-out split, recorded once and read by every later stage. SFT writes the rows it held out
(`sft_split.json` next to `stage_info.json`: row numbers in the data file, the file's fingerprint, the prompt
format). The comparison data, PPO/PPO-ptx/RLOO/GRPO, the evaluation and the race read that record from the model
directory they are given (the RL stages and DPO copy it into their own output), so a changed `eval_split_size` at SFT
reaches them all with no second setting. A model without a record (a hub model, one trained elsewhere) falls back to
the split recomputed from the stage's own size option and seed, and says so in one line."""

import json
import os
import shutil
from pathlib import Path

from chatgpt_recipes.data.rows import source_fingerprint
from chatgpt_recipes.data.sft import numbered_sft_examples, sft_split
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.output import say

SPLIT_FILE = "sft_split.json"


def record_sft_split(output_dir: str, training: tuple[str, str], held_out: tuple[str, str], rows: list[int],
                     prompt_format: str, eval_split_size: float, seed: int) -> None:
    """Write what SFT held out: `rows` (row numbers) of the `held_out` (source, split), trained on `training`."""
    record = {
        "training": {"source": training[0], "split": training[1], "fingerprint": source_fingerprint(*training)},
        "held_out": {"source": held_out[0], "split": held_out[1], "fingerprint": source_fingerprint(*held_out),
                     "rows": sorted(int(row) for row in rows)},
        "prompt_format": prompt_format, "eval_split_size": eval_split_size, "seed": seed,
    }
    Path(output_dir, SPLIT_FILE).write_text(json.dumps(record, indent=1))


def read_sft_split(model_dir: str | None) -> dict | None:
    """The split a model directory's SFT recorded, or None (a hub name, a directory without a record)."""
    if not model_dir:
        return None
    path = Path(model_dir, SPLIT_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def carry_sft_split(from_dir: str, to_dir: str) -> None:
    """A stage trained from an SFT model passes its record on, so that whatever evaluates the new model finds it."""
    source = Path(from_dir, SPLIT_FILE)
    if source.is_file() and os.path.realpath(from_dir) != os.path.realpath(to_dir):
        shutil.copyfile(source, Path(to_dir, SPLIT_FILE))


def sft_held_out_rows(model_dirs: list[str], source: str, split: str, size_option: str, size: float,
                      seed: int) -> frozenset[int]:
    """The row numbers of `source` that SFT held out, from the record in `model_dirs` (the SFT model, or models
    trained from it). Without a record: recomputed from `size_option`=`size` and `seed` (0: nothing held out), with
    one line saying so. The file SFT recorded, changed since, is a ConfigError (its row numbers would name other
    examples); other data than SFT's has no rows SFT held out."""
    records = [(folder, record) for folder in model_dirs if (record := read_sft_split(folder)) is not None]
    if not records:
        if not size:
            return frozenset()
        names = ", ".join(str(folder) for folder in model_dirs) or "no model"
        say(f"[split] no {SPLIT_FILE} in {names} (a hub model, or one trained elsewhere): SFT's held-out rows of "
            f"{source} recomputed from {size_option}={size:g}, seed={seed}", flush=True)
        return frozenset(row for row, _ in sft_split(source, split, size, seed)[1])
    fingerprint = source_fingerprint(source, split)
    found = set()
    for folder, record in records:
        if fingerprint == record["held_out"]["fingerprint"]:
            found.add(frozenset(record["held_out"]["rows"]))
        elif fingerprint == record["training"]["fingerprint"]:
            found.add(frozenset())  # SFT held out rows of a separate eval file, none of this one
        elif any(_same_source(source, split, record[part]) for part in ("held_out", "training")):
            raise ConfigError(
                f"{source} has changed since SFT recorded the rows it held out of it ({Path(folder, SPLIT_FILE)}: "
                f"content {record['held_out']['fingerprint'][:17]}..., now {fingerprint[:17]}...), so those row numbers "
                "would name other examples: use the file SFT trained on, unchanged, or train SFT again on this one")
        else:
            say(f"[split] {source} is not the data SFT held rows out of ({record['held_out']['source']}, "
                f"{Path(folder, SPLIT_FILE)}): none of its rows is held out", flush=True)
            found.add(frozenset())
    if len(found) > 1:
        raise ConfigError(f"the models {[folder for folder, _ in records]} record different SFT held-out rows of "
                          f"{source} ({SPLIT_FILE}): they come from different SFT runs; use models of one run")
    rows = found.pop()
    if rows:
        say(f"[split] SFT's {len(rows)} held-out rows of {source}, as recorded in {Path(records[0][0], SPLIT_FILE)}",
            flush=True)
    return rows


def _same_source(source: str, split: str, recorded: dict) -> bool:
    """`source` names the recorded file (or hub dataset and split), whatever its content now."""
    return os.path.realpath(source) == os.path.realpath(recorded["source"]) and split == recorded["split"]


def split_examples(source: str, split: str, held_out: frozenset[int]) -> tuple[list, list]:
    """(training, held-out) SFT examples of `source`, each as (row number, example), in file order."""
    numbered = numbered_sft_examples(source, split)
    return [item for item in numbered if item[0] not in held_out], [item for item in numbered if item[0] in held_out]

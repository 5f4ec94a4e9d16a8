"""Rows of a dataset, for every loader: a hub dataset or a local json / jsonl / csv / parquet file (optionally
gzipped) read to rows, the errors and counted skips of bad rows, and the cache of prepared datasets.

The row-level policy, the same for every loader (SFT in chatgpt_recipes.data.sft; reward model and DPO in
chatgpt_recipes.data.preferences; PPO/RLOO prompts in chatgpt_recipes.rl.inputs; pretraining in chatgpt_recipes.data.text):
  - problems of the file are errors (DataError) naming the file, the row and the field: not JSON, not UTF-8, no
    rows, an unknown shape or a missing field in most rows;
  - defects of single rows (an empty answer, chosen == rejected, a null or non-text value, roles out of order) are
    skipped and counted (SkipLog): printed, written to skipped_rows.jsonl in the output directory and summarised in
    report.md. When more than `max_skipped_fraction` of the rows are defective the file is an error that says so.
Rows that are fine but unusable for this run (longer than max_length, a multi-turn chat in the Alpaca format, an
exact duplicate) are skipped and recorded the same way but do not count towards that fraction.

Recipes prepare data with `sft_data.prepare_sft` (and its siblings): `datasets` map with `dataset_num_proc` workers, the
result saved under a key of the file's content, the tokenizer and the options, so a rerun or a resume loads it
instead of tokenising again; under a multi-process launch the main process builds it and the others wait."""

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from chatgpt_recipes.runtime.cache import cache_dir
from chatgpt_recipes.runtime.errors import ConfigError, DataError, RowError
from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
DEFECT, UNUSABLE = "defect", "unusable"  # skip kinds: only defects count towards max_skipped_fraction
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
# their source is part of every cache key
_CODE_FILES = ("data/rows.py", "data/sft.py", "data/preferences.py", "rl/inputs.py", "data/templates.py")


class SkipLog(Counter):
    """Skipped rows: a Counter of reasons plus one record per row {source, row, field, reason, kind}."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    def add(self, source: str, row: int | None, field: str | None, reason: str, kind: str = DEFECT) -> None:
        self[reason] += 1
        self.records.append({"source": source, "row": row, "field": field, "reason": reason, "kind": kind})

    def extend(self, other: "SkipLog") -> "SkipLog":
        for record in other.records:
            self.add(**record)
        return self

    def report(self, source: str, total: int) -> None:
        """Print one line per reason of `source`'s skips."""
        counts = Counter(r["reason"] for r in self.records if r["source"] == source)
        for reason, count in counts.most_common():
            say(f"[data] {source}: skipped {count} of {total} rows: {reason}", flush=True)

    def check_fraction(self, source: str, total: int, max_fraction: float) -> None:
        """DataError when more than `max_fraction` of `source`'s rows are defective, showing the first ones."""
        defects = [r for r in self.records if r["source"] == source and r["kind"] == DEFECT]
        if total and len(defects) > max_fraction * total:
            reasons = Counter(r["reason"] for r in defects).most_common(3)
            first = "; ".join(f"{source}: row {r['row']}: {r['reason']}" for r in defects[:3])
            raise DataError(
                f"{source}: {len(defects)} of {total} rows ({len(defects) / total:.0%}) are defective, more than "
                f"max_skipped_fraction={max_fraction}: the file is mostly not in a shape this recipe reads. First: "
                f"{first}. Most common: {', '.join(f'{reason} ({count})' for reason, count in reasons)}"
                + (". If the fields have other names, map them with columns: {recipe_field: file_field}"
                   if any("missing field" in r or "unknown" in r for r, _ in reasons) else ""))

    def write(self, output_dir: str) -> Path:
        """skipped_rows.jsonl in output_dir (empty when nothing was skipped)."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(output_dir) / SKIPPED_ROWS_FILE
        with open(path, "w") as file:
            for record in self.records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path

    def markdown(self) -> str:
        """The summary for report.md: skips per source, reason and kind."""
        if not self.records:
            return "No rows skipped."
        counts = Counter((r["source"], r["reason"], r["kind"]) for r in self.records)
        lines = [f"{len(self.records)} rows skipped, listed in `{SKIPPED_ROWS_FILE}` (source, row, field, reason). "
                 "Defects count towards `max_skipped_fraction`; unusable rows (too long, another prompt format, "
                 "duplicates) do not.", "", "| source | reason | kind | rows |", "|---|---|---|---|"]
        lines += [f"| {source} | {reason.replace('|', '/')} | {kind} | {count} |"
                  for (source, reason, kind), count in counts.most_common()]
        return "\n".join(lines)


SkipCounter = SkipLog  # the earlier name


# ---------------------------------------------------------------- reading files

def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: not a readable gzip file ({error})") from error
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); re-save the file as UTF-8") from error


def _data_suffix(path: Path) -> str:
    """.json / .jsonl / .csv / .parquet, looking through a .gz."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _is_jsonl(path: Path, text: str) -> bool:
    return _data_suffix(path) == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text)


def _json_lines(path: Path, text: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a jsonl text and their line numbers (JSON is parsed later, per row)."""
    lines, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            lines.append(line)
            numbers.append(number)
    return lines, numbers


def _json_list(path: Path, text: str) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        (field, value), = rows.items()
        if any(isinstance(item, dict) and ("role" in item or "from" in item) for item in value):
            raise DataError(f"{path}: holds one chat object ({{\"{field}\": [turns]}}), not a list of rows: write it "
                            f"as [{{\"{field}\": [...]}}], or one object per line in a .jsonl file")
        rows = value  # {"data": [...]}
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, found a {type(rows).__name__}")
    return rows


def _parse_line(source: str, line: str, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}: line {number}: not valid JSON ({error.msg}, column {error.colno})") from None


def directory_is_no_dataset(source: str) -> str | None:
    """Why the local directory `source` is not a dataset the loaders read (they read one file or a hub id), listing
    the data files it holds; None when `source` is no directory."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _data_suffix(p) in LOCAL_FORMATS)
    found = f"data files in it: {files[:5]}{' ...' if len(files) > 5 else ''}" if files else \
        f"it holds no {'/'.join(sorted(LOCAL_FORMATS))} file"
    return f"{source} is a directory, not a data file: name one file in it ({found})"


def _local_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir():  # never passed on to the hub loader, which would blame the network
        raise DataError(directory_is_no_dataset(source))
    if path.is_file():
        if _data_suffix(path) not in LOCAL_FORMATS:
            raise DataError(f"{source}: unknown data file type '{path.suffix}'; use {sorted(LOCAL_FORMATS)} "
                            "(optionally .gz)")
        return path
    if _data_suffix(path) in LOCAL_FORMATS or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    return None


def _load_hub(source: str, split: str, streaming: bool = False):
    try:
        return load_dataset(source, split=split, streaming=streaming)
    except Exception as error:
        raise DataError(
            f"could not load dataset '{source}' (split '{split}'): not a local file, and the hub did not serve it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _check_objects(source: str, rows: list) -> None:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {number}: expected an object with fields, found {type(row).__name__}")
    if not rows:
        raise DataError(f"{source}: the file holds no rows")


def read_rows(source: str, split: str = "train") -> list[dict]:
    """All rows of a local file or a hub dataset split, as dicts. Rows are numbered from 1 in errors
    (the line number for jsonl)."""
    path = _local_path(source)
    if path is None:
        return _load_hub(source, split).to_list()
    if LOCAL_FORMATS[_data_suffix(path)] == "json":
        text = _open_text(path)
        if _is_jsonl(path, text):
            rows = [_parse_line(source, line, number) for line, number in zip(*_json_lines(path, text))]
        else:
            rows = _json_list(path, text)
    else:
        rows = load_dataset(LOCAL_FORMATS[_data_suffix(path)], data_files=str(path), split="train").to_list()
    _check_objects(source, rows)
    return rows


def raw_dataset(source: str, split: str = "train") -> Dataset:
    """A file or hub split as a Dataset the preparation maps read: local JSON rows as one text column `json`
    (parsed per row in the workers, so a value of another type in one row does not break Arrow's typing of the
    column) and their row (jsonl: line) numbers in `row`; csv, parquet and hub data with their own columns."""
    path = _local_path(source)
    if path is None:
        dataset = _load_hub(source, split)
    elif LOCAL_FORMATS[_data_suffix(path)] == "json":
        text = _open_text(path)
        if _is_jsonl(path, text):
            lines, numbers = _json_lines(path, text)
        else:
            rows = _json_list(path, text)
            _check_objects(source, rows)
            lines, numbers = [json.dumps(row, ensure_ascii=False) for row in rows], list(range(1, len(rows) + 1))
        del text
        dataset = Dataset.from_dict({"json": lines, "row": numbers})
    else:
        dataset = load_dataset(LOCAL_FORMATS[_data_suffix(path)], data_files=str(path), split="train")
    if len(dataset) == 0:
        raise DataError(f"{source}: the file holds no rows")
    if "row" not in dataset.column_names:
        dataset = dataset.add_column("row", list(range(1, len(dataset) + 1)))
    return dataset


def rows_of_batch(batch: dict, columns: dict[str, str], source: str):
    """(row number, row dict with `columns` applied) for each row of a batch of `raw_dataset`. A jsonl line that is
    not JSON, or not an object, is a DataError: the file is broken, not one row."""
    numbers = batch["row"]
    if "json" in batch:
        rows = []
        for line, number in zip(batch["json"], numbers):
            row = _parse_line(source, line, number)
            if not isinstance(row, dict):
                raise DataError(f"{source}: row {number}: expected an object with fields, found {type(row).__name__}")
            rows.append(row)
    else:
        names = [name for name in batch if name != "row"]
        rows = [{name: batch[name][i] for name in names} for i in range(len(numbers))]
    for number, row in zip(numbers, rows):
        yield number, apply_columns(row, columns)


def apply_columns(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped field read from its column: {"instruction": "question"} reads `question`."""
    if not columns:
        return row
    row = dict(row)
    for name, column in columns.items():
        row[name] = row.pop(column) if column in row else _MappedMissing(column)
    return row


class _MappedMissing:
    """Marks a field whose mapped column is absent from a row, so the message names the column."""

    def __init__(self, column: str):
        self.column = column


# ---------------------------------------------------------------- rows to SFT examples

def _text_field(row: dict, field: str, where: str, required: bool = True) -> str:
    value = row.get(field)
    if isinstance(value, _MappedMissing):
        raise RowError(where, field, f"missing column '{value.column}' (read as field '{field}'; fields present: "
                                     f"{sorted(k for k, v in row.items() if not isinstance(v, _MappedMissing))})")
    if value is None:
        if field in row:
            if required:
                raise RowError(where, field, f"field '{field}' is null")
            return ""
        if required:
            raise RowError(where, field, f"missing field '{field}' (fields present: {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise RowError(where, field, f"field '{field}' must be text, found {type(value).__name__}")
    return value


def content_text(content, where: str, field: str, label: str | None = None) -> str:
    """A turn's content as text: a string, or OpenAI-style parts [{"type": "text", "text": ...}] joined by newlines
    (parts that are not text, such as images, are a RowError of `field`; `label` names the turn in the message)."""
    label = label or field
    if not isinstance(content, list):
        if not isinstance(content, str):
            raise RowError(where, field, f"{label}: content must be text, found {type(content).__name__}")
        return content
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowError(where, field, f"{label}: content part {index} is not text (type {kind!r}); the recipes "
                                         "train on text only")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """Chat turns as [{role, content}], ShareGPT's {from, value} accepted, content given as text or as OpenAI-style
    text parts; roles must alternate user/assistant after an optional leading system turn."""
    if not isinstance(messages, list) or not messages:
        raise RowError(where, field, f"field '{field}' must be a non-empty list of turns"
                       + (", found null" if messages is None else ""))
    turns = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise RowError(where, field, f"{field}[{index}] must be an object with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in SHAREGPT_ROLES:
            raise RowError(where, field, f"{field}[{index}]: unknown role {role!r} (use system, user or assistant)")
        text = content_text(content, where, field, f"{field}[{index}]")
        turns.append({"role": SHAREGPT_ROLES[role], "content": text})
    expected = "user"
    for index, turn in enumerate(turns):
        if index == 0 and turn["role"] == "system":
            continue
        if turn["role"] != expected:
            raise RowError(
                where, field, f"{field}[{index}]: roles must alternate user/assistant (after an optional system "
                              f"turn), found '{turn['role']}' where '{expected}' was expected")
        expected = "assistant" if expected == "user" else "user"
    return turns


# ---------------------------------------------------------------- tokenisation


def check_overlong(overlong: str) -> None:
    if overlong not in ("drop", "truncate"):
        raise ConfigError(f"overlong must be 'drop' or 'truncate', not {overlong!r}")


def fit_length(item: dict, max_length: int, overlong: str) -> tuple[dict, str | None]:
    """(item, None) when it fits or is truncated with an answer token left, else (item, why it is skipped)."""
    if len(item["input_ids"]) <= max_length:
        return item, None
    if overlong == "drop":
        return item, f"longer than max_length={max_length} tokens"
    item = {key: value[:max_length] for key, value in item.items()}
    if all(label == -100 for label in item["labels"]):
        return item, f"truncated to max_length={max_length} tokens, no answer token left"
    return item, None


def split_train_eval(examples: list, eval_size: float | int, seed: int) -> tuple[list, list]:
    """A seeded held-out split: eval_size is a fraction (< 1) or a row count."""
    count = int(round(len(examples) * eval_size)) if eval_size < 1 else int(eval_size)
    if count <= 0:
        return examples, []
    if count >= len(examples):
        raise DataError(f"eval split of {count} rows leaves nothing to train on ({len(examples)} rows)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


# ---------------------------------------------------------------- prepared (cached) datasets

def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how a tokenizer turns text into ids: its serialised Rust tokenizer, chat template and
    special tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    for value in (tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                  getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)):
        digest.update(repr(value).encode())
    return digest.hexdigest()


def source_fingerprint(source: str, split: str) -> str:
    """The content of a local file (sha256), or a hub dataset split's own fingerprint."""
    path = _local_path(source)
    if path is not None:
        return "file:" + _hash_file(path)
    return f"hub:{source}:{split}:{_load_hub(source, split)._fingerprint}"


def cache_key(*parts) -> str:
    code = "".join((Path(__file__).parents[1] / name).read_text() for name in _CODE_FILES)
    return hashlib.sha256(json.dumps([code, *parts], sort_keys=True, default=repr).encode()).hexdigest()[:24]


def data_cache_dir() -> Path:
    """Where prepared datasets live: $RECIPES_DATA_CACHE, else <RECIPES_CACHE>/prepared-data."""
    return Path(os.environ.get("RECIPES_DATA_CACHE", cache_dir() / "prepared-data"))


def main_process_first():
    """Under a multi-process launch the main process prepares the data and the others wait, then read its cache."""
    from accelerate import PartialState

    return PartialState().main_process_first()


def cached_dataset(key: str, build, what: str) -> Dataset:
    """The dataset saved under `key`, else `build()` saved there first (written to a temporary directory and
    renamed, so an interrupted run never leaves half a cache behind)."""
    path = data_cache_dir() / key
    with main_process_first():
        if (path / "dataset_info.json").is_file():
            say(f"[data] {what}: prepared dataset read from the cache ({path}); nothing tokenised", flush=True)
            return load_from_disk(str(path))
        dataset = build()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another run (a second launch on the same cache) saved the same key first: it is read
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"[data] {what}: prepared and cached in {path}", flush=True)
        return load_from_disk(str(path))


def column(dataset: Dataset, name: str) -> list:
    """A column of an unindexed dataset as a list, straight from Arrow (no per-row formatting)."""
    return dataset.data.column(name).to_pylist()


def skips_of(dataset: Dataset, source: str) -> SkipLog:
    """The skip records a prepared dataset carries in its skip_reason / skip_field / skip_kind columns."""
    skips = SkipLog()
    reasons = column(dataset, "skip_reason")
    flagged = [i for i, reason in enumerate(reasons) if reason]
    if flagged:
        rows, fields, kinds = column(dataset, "row"), column(dataset, "skip_field"), column(dataset, "skip_kind")
        for i in flagged:
            skips.add(source, rows[i], fields[i] or None, reasons[i], kinds[i])
    return skips


def kept_indices(dataset: Dataset) -> list[int]:
    return [i for i, reason in enumerate(column(dataset, "skip_reason")) if not reason]


def _skip_columns(out: dict, field=None, reason: str = "", kind: str = "") -> None:
    out["skip_field"].append(field or "")
    out["skip_reason"].append(reason)
    out["skip_kind"].append(kind)


def num_proc_for(num_proc: int | None, rows: int) -> int | None:
    """dataset_num_proc, but one process for small data (starting workers costs more than it saves)."""
    return num_proc if num_proc and num_proc > 1 and rows >= 2000 else None


def eval_source(config) -> tuple[str, str] | None:
    """(source, split) of separate eval data (eval_dataset_name / eval_split), or None for a seeded carve-out of
    the training data."""
    if not config.eval_dataset_name and not config.eval_split:
        return None
    source = config.eval_dataset_name or config.dataset_name
    split = config.eval_split or config.dataset_split
    if not config.eval_dataset_name and _local_path(source) is not None:
        raise ConfigError(f"eval_split: {source} is a local file, which has no splits; set eval_dataset_name to "
                          "the eval file")
    if source == config.dataset_name and split == config.dataset_split:
        raise ConfigError(f"eval_dataset_name/eval_split name the training data itself ({source}, split {split})")
    return source, split


def iter_rows(source: str, split: str, columns: dict[str, str]):
    """(row number, row) of a local file read line by line, or of a streamed hub dataset: memory does not grow
    with the data."""
    path = _local_path(source)
    if path is None:
        stream = _load_hub(source, split, streaming=True)
        for number, row in enumerate(stream, start=1):
            yield number, apply_columns(row, columns)
        return
    if LOCAL_FORMATS[_data_suffix(path)] != "json":
        raise ConfigError(f"streaming reads jsonl files and hub datasets; {source} is {_data_suffix(path)}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as file:
        try:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    row = _parse_line(source, line, number)
                    if not isinstance(row, dict):
                        raise DataError(f"{source}: row {number}: expected an object, found {type(row).__name__}")
                    yield number, apply_columns(row, columns)
        except UnicodeDecodeError as error:
            raise DataError(f"{source}: not UTF-8 text (byte {error.start}); re-save the file as UTF-8") from error


def train_and_eval(config, train_data, prepare_eval):
    """The held-out part of a run: the eval file's own split when the config names one (`eval_dataset_name`,
    prepared by `prepare_eval(source, split)`), else a seeded carve-out of the training examples; then
    `max_train_samples` applied. Returns (eval data, training examples, eval examples, the skips of both files,
    the eval source or None)."""
    separate = eval_source(config)
    if separate:
        eval_data = prepare_eval(*separate)
        train_examples, eval_examples = train_data.examples, eval_data.examples
    else:
        eval_data = train_data
        train_examples, eval_examples = split_train_eval(train_data.examples, config.eval_split_size, config.seed)
    if config.max_train_samples:
        train_examples = train_examples[: config.max_train_samples]
    skips = SkipLog().extend(train_data.skips)
    if eval_data is not train_data:
        skips.extend(eval_data.skips)
    return eval_data, train_examples, eval_examples, skips, separate

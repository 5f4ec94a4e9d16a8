"""Data loading: a hub dataset or a local json / jsonl / csv / parquet file to rows, each known instruction shape
normalised into the formats TRL's trainers take, with errors that name the file, row and field, and the SFT
tokenisation that decides which tokens are trained."""

import json
import logging
from collections import Counter
from pathlib import Path

from datasets import Dataset, load_dataset

from common.config import RecipeError
from common.templates import alpaca_prompt

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


class DataError(RecipeError, ValueError):
    """Bad input data; the message names the file, row and field."""


class SkipCounter(Counter):
    """Counts rows skipped per reason, and logs a summary so that no row is dropped silently."""

    def report(self, source: str, total: int) -> None:
        for reason, count in self.items():
            logger.warning("%s: skipped %d of %d rows: %s", source, count, total, reason)
            print(f"[data] {source}: skipped {count} of {total} rows: {reason}", flush=True)


def _read_json_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); re-save the file as UTF-8") from error


def _read_json_rows(path: Path) -> list:
    text = _read_json_text(path)
    if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text):
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {line_number}: not valid JSON ({error.msg}, column {error.colno})")
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"data": [...]}
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, found a {type(rows).__name__}")
    return rows


def read_rows(source: str, split: str = "train") -> list[dict]:
    """All rows of a local file or a hub dataset split, as dicts. Rows are numbered from 1 in errors
    (the line number for jsonl)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise DataError(f"{source}: unknown data file type '{path.suffix}'; use {sorted(LOCAL_FORMATS)}")
        if LOCAL_FORMATS[path.suffix] == "json":
            rows = _read_json_rows(path)
        else:
            rows = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train").to_list()
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{source}: row {number}: expected an object with fields, found {type(row).__name__}")
        if not rows:
            raise DataError(f"{source}: the file holds no rows")
        return rows
    if path.suffix in LOCAL_FORMATS or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    try:
        return load_dataset(source, split=split).to_list()
    except Exception as error:
        raise DataError(
            f"could not load dataset '{source}' (split '{split}'): not a local file, and the hub did not serve it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _text_field(row: dict, field: str, where: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{field}' (fields present: {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be text, found {type(value).__name__}")
    return value


def normalize_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """Chat turns as [{role, content}], ShareGPT's {from, value} accepted; roles must alternate user/assistant
    after an optional leading system turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of turns")
    turns = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}[{index}] must be an object with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: {field}[{index}]: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{index}]: content must be text")
        turns.append({"role": SHAREGPT_ROLES[role], "content": content})
    expected = "user"
    for index, turn in enumerate(turns):
        if index == 0 and turn["role"] == "system":
            continue
        if turn["role"] != expected:
            raise DataError(
                f"{where}: {field}[{index}]: roles must alternate user/assistant (after an optional system turn), "
                f"found '{turn['role']}' where '{expected}' was expected"
            )
        expected = "assistant" if expected == "user" else "user"
    return turns


def row_shape(row: dict) -> str:
    """Which SFT shape a row has: "chat" (messages / ShareGPT conversations), "alpaca" (instruction, input,
    output), "prompt_completion", or "unknown"."""
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return "unknown"


def prompt_format(rows: list[dict]) -> str:
    """How prompts must be written to a model tuned on these rows: "alpaca" (the Alpaca template), "chat" (the
    tokenizer's chat template) or "plain" (prompt/completion rows: the prompt text as is). Mixed files: "chat"."""
    shapes = {row_shape(row) for row in rows}
    if shapes == {"alpaca"}:
        return "alpaca"
    if shapes == {"prompt_completion"}:
        return "plain"
    return "chat"


def sft_rows(rows: list[dict], source: str) -> tuple[list[dict], SkipCounter]:
    """Instruction rows to SFT examples. Alpaca {instruction, input, output} becomes {prompt, completion} with the
    Alpaca template; chat {messages} or ShareGPT {conversations} becomes {messages}; {prompt, completion} passes.
    Rows with an empty response and exact duplicates are skipped and counted; malformed rows raise DataError."""
    examples, skipped = [], SkipCounter()
    for number, row in enumerate(rows, start=1):
        where = f"{source}: row {number}"
        shape = row_shape(row)
        if shape == "chat":
            field = "messages" if "messages" in row else "conversations"
            turns = normalize_messages(row[field], where, field)
            answers = [t for t in turns if t["role"] == "assistant"]
            if not answers:
                skipped["chat without an assistant turn"] += 1
                continue
            if any(not t["content"].strip() for t in answers):
                skipped["empty assistant turn"] += 1
                continue
            examples.append({"messages": turns})
        elif shape == "alpaca":
            instruction = _text_field(row, "instruction", where)
            output = _text_field(row, "output", where)
            if not instruction.strip():
                skipped["empty instruction"] += 1
                continue
            if not output.strip():
                skipped["empty output"] += 1
                continue
            examples.append({"prompt": alpaca_prompt(instruction, _text_field(row, "input", where, False)),
                             "completion": output})
        elif shape == "prompt_completion":
            prompt, completion = _text_field(row, "prompt", where), _text_field(row, "completion", where)
            if not completion.strip():
                skipped["empty completion"] += 1
                continue
            examples.append({"prompt": prompt, "completion": completion})
        else:
            raise DataError(
                f"{where}: unknown row shape with fields {sorted(row)}; expected Alpaca (instruction, input, output), "
                "chat (messages) or ShareGPT (conversations), or prompt/completion"
            )
    unique = list({json.dumps(example, sort_keys=True): example for example in examples}.values())
    if len(unique) < len(examples):  # duplicates would leak into the held-out split
        skipped["exact duplicate of an earlier row"] += len(examples) - len(unique)
        examples = unique
    skipped.report(source, len(rows))
    if not examples:
        raise DataError(f"{source}: no usable rows")
    return examples, skipped


def prompt_of(example: dict, tokenizer) -> str:
    """The text a model is prompted with for an SFT example: everything up to the last assistant answer."""
    if "prompt" in example:
        return example["prompt"]
    turns = example["messages"]
    last_answer = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return tokenizer.apply_chat_template(turns[:last_answer], tokenize=False, add_generation_prompt=True)


def tokenize_example(example: dict, tokenizer, where: str = "") -> dict:
    """input_ids and labels of one example: prompt tokens are -100; the response and the EOS (or the chat
    template's end-of-turn token) that ends it are trained. In a chat every assistant turn is trained and
    nothing else. The chat's assistant spans come from rendering the conversation turn by turn, so any
    prefix-preserving chat template works, without `{% generation %}` markers."""
    if "prompt" in example:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}

    turns = example["messages"]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    spans = []
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(turns[: index + 1], tokenize=False)
        if not (text.startswith(start) and text.startswith(end)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn "
                            "(it is not prefix-preserving); use another chat template")
        spans.append((len(start), len(end.rstrip())))  # up to its end-of-turn token, not the newline after it
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= char_start < end for start, end in spans) else -100
        for token, (char_start, _) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return {"input_ids": encoding["input_ids"], "labels": labels}


def tokenize_sft(examples: list[dict], tokenizer, max_length: int, overlong: str = "drop",
                 source: str = "data") -> Dataset:
    """Tokenised SFT dataset (input_ids, labels). Examples longer than max_length are dropped (default: a
    truncated answer would teach the model not to stop) or truncated, and counted either way."""
    if overlong not in ("drop", "truncate"):
        raise DataError(f"overlong must be 'drop' or 'truncate', not {overlong!r}")
    tokenized, too_long, no_answer_left = [], 0, 0
    for number, example in enumerate(examples, start=1):
        item = tokenize_example(example, tokenizer, f"{source}: example {number}")
        if len(item["input_ids"]) > max_length:
            too_long += 1
            if overlong == "drop":
                continue
            item = {key: value[:max_length] for key, value in item.items()}
            if all(label == -100 for label in item["labels"]):
                no_answer_left += 1
                continue
        tokenized.append(item)
    if too_long:
        print(f"[data] {source}: {too_long} of {len(examples)} examples are longer than max_length={max_length} "
              f"tokens and were {'dropped' if overlong == 'drop' else 'truncated'}", flush=True)
    if no_answer_left:
        print(f"[data] {source}: {no_answer_left} truncated examples kept no answer token and were dropped", flush=True)
    if not tokenized:
        raise DataError(f"{source}: every example is longer than max_length={max_length}")
    return Dataset.from_list(tokenized)


def split_train_eval(examples: list, eval_size: float | int, seed: int) -> tuple[list, list]:
    """A seeded held-out split: eval_size is a fraction (< 1) or a row count."""
    import random

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

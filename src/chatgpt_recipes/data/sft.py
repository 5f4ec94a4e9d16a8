"""SFT data: each known instruction shape (Alpaca, chat messages, ShareGPT, prompt/completion) normalised into
the formats TRL's SFTTrainer takes, and the tokenisation that decides which tokens are trained (the
response and its EOS, never the prompt). `prepare_sft` maps, caches and reports it; `streamed_sft` does the
same for a dataset read as a stream. The row policy is common to every loader: see rows.py."""

import hashlib
import json
from collections import Counter

from datasets import Dataset

from chatgpt_recipes.data.rows import (DEFECT, UNUSABLE, SkipLog, _skip_columns, _text_field, cache_key, cached_dataset,
                                       check_overlong, column, fit_length, iter_rows, normalize_messages, num_proc_for,
                                       raw_dataset, rows_of_batch, skips_of, source_fingerprint, split_train_eval,
                                       tokenizer_fingerprint)
from chatgpt_recipes.data.templates import render_prompt
from chatgpt_recipes.runtime.errors import DataError, PromptFormatError, RowError
from chatgpt_recipes.runtime.output import say


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


SHAPE_FORMAT = {"alpaca": "alpaca", "chat": "chat", "prompt_completion": "plain"}


def majority_format(shape_counts: Counter) -> str:
    """The prompt format of a file from its row shapes: the most common shape's ("alpaca", "chat" or "plain");
    rows of other shapes are rendered in it (see `to_format`). Ties go to chat, which renders every shape."""
    known = {shape: count for shape, count in shape_counts.items() if shape in SHAPE_FORMAT}
    if not known:
        return "chat"
    order = ["chat", "alpaca", "prompt_completion"]
    return SHAPE_FORMAT[max(order, key=lambda shape: (known.get(shape, 0), shape == "chat"))]


def prompt_format(rows: list[dict]) -> str:
    """How prompts must be written to a model tuned on these rows: "alpaca" (the Alpaca template), "chat" (the
    tokenizer's chat template) or "plain" (prompt/completion rows: the prompt text as is), by the majority of
    the rows' shapes."""
    return majority_format(Counter(row_shape(row) for row in rows))


def sft_example(row: dict, where: str) -> dict:
    """One instruction row as an SFT example: Alpaca {instruction, input, output} becomes {prompt, completion} with
    the Alpaca template (and keeps its pieces under `alpaca`, for rendering in another format); chat {messages} or
    ShareGPT {conversations} becomes {messages}; {prompt, completion} passes. RowError for a defective row."""
    shape = row_shape(row)
    if shape == "chat":
        field = "messages" if "messages" in row else "conversations"
        turns = normalize_messages(row[field], where, field)
        answers = [t for t in turns if t["role"] == "assistant"]
        if not answers:
            raise RowError(where, field, "chat without an assistant turn")
        if any(not t["content"].strip() for t in answers):
            raise RowError(where, field, "empty assistant turn")
        return {"messages": turns}
    if shape == "alpaca":
        instruction = _text_field(row, "instruction", where)
        output = _text_field(row, "output", where)
        text_input = _text_field(row, "input", where, False)
        if not instruction.strip():
            raise RowError(where, "instruction", "empty instruction")
        if not output.strip():
            raise RowError(where, "output", "empty output")
        pieces = {"instruction": instruction, "input": text_input}
        return {"prompt": render_prompt(pieces, None, "alpaca"), "completion": output, "alpaca": pieces}
    if shape == "prompt_completion":
        prompt, completion = _text_field(row, "prompt", where), _text_field(row, "completion", where)
        if not completion.strip():
            raise RowError(where, "completion", "empty completion")
        return {"prompt": prompt, "completion": completion, "plain": True}
    raise RowError(where, None, f"unknown row shape with fields {sorted(row)}; expected Alpaca (instruction, input, "
                                "output), chat (messages) or ShareGPT (conversations), or prompt/completion")


def to_format(example: dict, data_format: str) -> dict:
    """An SFT example rendered in the file's prompt format: an Alpaca or prompt/completion row becomes one user
    turn in a chat file; a single-turn chat becomes an Alpaca prompt or plain text. PromptFormatError for a
    multi-turn chat in the alpaca or plain format."""
    if "messages" in example:
        if data_format == "chat":
            return example
        turns = example["messages"]
        prompt = render_prompt(turns[:-1], None, data_format)
        return {"prompt": prompt, "completion": turns[-1]["content"]}
    pieces = example.get("alpaca")
    if data_format == "chat":
        user = render_prompt(pieces, None, "plain") if pieces else example["prompt"]
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": example["completion"]}]}
    if pieces and data_format == "plain":
        return {"prompt": render_prompt(pieces, None, "plain"), "completion": example["completion"]}
    return {"prompt": example["prompt"], "completion": example["completion"]}


def _example_key(example: dict) -> str:
    """What makes two rows exact duplicates: their normalised example, as `prepare_sft` stores it."""
    return hashlib.sha1(json.dumps(example, ensure_ascii=False).encode()).hexdigest()


def sft_rows(rows: list[dict], source: str, max_skipped_fraction: float = 0.05) -> tuple[list[dict], SkipLog]:
    """Instruction rows to SFT examples (see `sft_example`), in the majority prompt format. Defective rows,
    rows the format cannot render and exact duplicates are skipped and counted; a file with more than
    `max_skipped_fraction` defective rows is a DataError."""
    skips, examples, keys, shapes = SkipLog(), [], set(), Counter()
    normalised = []
    for number, row in enumerate(rows, start=1):
        try:
            example = sft_example(row, f"{source}: row {number}")
        except RowError as error:
            skips.add(source, number, error.field, error.reason)
            continue
        shapes[row_shape(row)] += 1
        normalised.append((number, example))
    data_format = majority_format(shapes)
    for number, example in normalised:
        key = _example_key(example)
        try:
            example = to_format(example, data_format)
        except PromptFormatError as error:
            skips.add(source, number, None, str(error), UNUSABLE)
            continue
        if key in keys:  # duplicates would leak into the held-out split
            skips.add(source, number, None, "exact duplicate of an earlier row", UNUSABLE)
            continue
        keys.add(key)
        examples.append(example)
    skips.report(source, len(rows))
    skips.check_fraction(source, len(rows), max_skipped_fraction)
    if not examples:
        raise DataError(f"{source}: no usable rows")
    return examples, skips


def numbered_sft_examples(source: str, split: str) -> list[tuple[int, dict]]:
    """Every usable SFT example of a file, as (its row number, example) in file order: numbered as SFT numbers
    rows (a jsonl file: its line numbers), with the rows `sft_rows` skips left out."""
    numbered = list(rows_of_batch(raw_dataset(source, split).to_dict(), {}, source))
    examples, skips = sft_rows([row for _, row in numbered], source)
    skipped = {record["row"] for record in skips.records}  # sft_rows counts positions from 1
    return list(zip([number for position, (number, _) in enumerate(numbered, start=1) if position not in skipped],
                    examples))


def sft_split(source: str, split: str, eval_size: float, seed: int) -> tuple[list[tuple[int, dict]], list]:
    """(training, held-out) SFT examples of a file as SFT splits them when it holds rows out of its own file
    (chatgpt_recipes.data.rows.split_train_eval with its eval_split_size and seed), each as (row number, example).
    Later stages read SFT's record instead (chatgpt_recipes.data.sft_split); this is their fallback."""
    return split_train_eval(numbered_sft_examples(source, split), eval_size, seed)


def _chat_text_and_spans(turns: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
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
    return text, spans


def _chat_labels(encoding, spans) -> list[int]:
    return [token if any(start <= char_start < end for start, end in spans) else -100
            for token, (char_start, _) in zip(encoding["input_ids"], encoding["offset_mapping"])]


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
    text, spans = _chat_text_and_spans(example["messages"], tokenizer, where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return {"input_ids": encoding["input_ids"], "labels": _chat_labels(encoding, spans)}


def tokenize_examples(examples: list[dict], tokenizer, where: str = "") -> list[dict]:
    """`tokenize_example` of many examples, with one batched tokenizer call per kind (the Rust tokenizer then
    works on the whole batch at once)."""
    items: list[dict | None] = [None] * len(examples)
    plain = [i for i, e in enumerate(examples) if "prompt" in e]
    if plain:
        prompts = tokenizer([examples[i]["prompt"] for i in plain])["input_ids"]
        completions = tokenizer([examples[i]["completion"] for i in plain], add_special_tokens=False)["input_ids"]
        for i, prompt_ids, completion_ids in zip(plain, prompts, completions):
            completion_ids = completion_ids + [tokenizer.eos_token_id]
            items[i] = {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}
    chats = [i for i, e in enumerate(examples) if "prompt" not in e]
    if chats:
        rendered = [_chat_text_and_spans(examples[i]["messages"], tokenizer, where) for i in chats]
        encodings = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, (_, spans)) in enumerate(zip(chats, rendered)):
            encoding = {"input_ids": encodings["input_ids"][n], "offset_mapping": encodings["offset_mapping"][n]}
            items[i] = {"input_ids": encoding["input_ids"], "labels": _chat_labels(encoding, spans)}
    return items


def example_chars(example: dict) -> int:
    if "prompt" in example:
        return len(example["prompt"]) + len(example["completion"])
    return sum(len(turn["content"]) for turn in example["messages"])


def length_advice(lengths: list[int], chars: list[int], max_length: int) -> str:
    """What the length report adds when rows are too long: the tokenizer's tokens per character on this data
    (English text is about 0.25; Chinese or code with an English tokenizer often 1 or more) and the max_length
    that keeps 95% of the rows."""
    ratio = sum(lengths) / max(sum(chars), 1)
    keep = sorted(lengths)[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    suggested = -(-keep // 64) * 64
    return (f"this tokenizer spends {ratio:.2f} tokens per character on this data (English prose: about 0.25); "
            f"max_length={suggested} keeps 95% of the rows")


def tokenize_sft(examples: list[dict], tokenizer, max_length: int, overlong: str = "drop",
                 source: str = "data") -> Dataset:
    """Tokenised SFT dataset (input_ids, labels). Examples longer than max_length are dropped (default: a
    truncated answer would teach the model not to stop) or truncated, and counted either way."""
    check_overlong(overlong)
    items = tokenize_examples(examples, tokenizer, source)
    tokenized, skips = [], SkipLog()
    for number, item in enumerate(items, start=1):
        item, reason = fit_length(item, max_length, overlong)
        if reason:
            skips.add(source, number, None, reason, UNUSABLE)
            continue
        tokenized.append(item)
    report_lengths(source, [len(i["input_ids"]) for i in items], [example_chars(e) for e in examples],
                   max_length, overlong)
    skips.report(source, len(examples))
    if not tokenized:
        raise DataError(f"{source}: every example is longer than max_length={max_length}")
    return Dataset.from_list(tokenized)


def report_lengths(source: str, lengths: list[int], chars: list[int], max_length: int, overlong: str) -> None:
    too_long = sum(length > max_length for length in lengths)
    if too_long:
        say(f"[data] {source}: {too_long} of {len(lengths)} examples are longer than max_length={max_length} "
            f"tokens and were {'dropped' if overlong == 'drop' else 'truncated'} ({too_long / len(lengths):.0%}); "
            f"{length_advice(lengths, chars, max_length)}", flush=True)


def _normalise_sft_batch(batch, columns, source):
    out = {"row": [], "shape": [], "example": [], "key": [], "skip_field": [], "skip_reason": [], "skip_kind": []}
    for number, row in rows_of_batch(batch, columns, source):
        out["row"].append(number)
        try:
            text = json.dumps(sft_example(row, f"row {number}"), ensure_ascii=False)
            out["shape"].append(row_shape(row))
            out["example"].append(text)
            out["key"].append(hashlib.sha1(text.encode()).hexdigest())
            _skip_columns(out)
        except RowError as error:
            out["shape"].append("")
            out["example"].append("")
            out["key"].append("")
            _skip_columns(out, error.field, error.reason, DEFECT)
    return out


def _tokenise_sft_batch(batch, tokenizer, data_format, max_length, overlong):
    size = len(batch["row"])
    out = {"input_ids": [[] for _ in range(size)], "labels": [[] for _ in range(size)], "length": [0] * size,
           "chars": [0] * size, "skip_reason": list(batch["skip_reason"]), "skip_kind": list(batch["skip_kind"])}
    todo, examples = [], []
    for i in range(size):
        if out["skip_reason"][i]:
            continue
        try:
            example = to_format(json.loads(batch["example"][i]), data_format)
        except PromptFormatError as error:
            out["skip_reason"][i], out["skip_kind"][i] = str(error), UNUSABLE
            continue
        todo.append(i)
        examples.append(example)
    for i, example, item in zip(todo, examples, tokenize_examples(examples, tokenizer)):
        out["length"][i], out["chars"][i] = len(item["input_ids"]), example_chars(example)
        item, reason = fit_length(item, max_length, overlong)
        if reason:
            out["skip_reason"][i], out["skip_kind"][i] = reason, UNUSABLE
            continue
        out["input_ids"][i], out["labels"][i] = item["input_ids"], item["labels"]
    return out


class PreparedSFT:
    """A prepared SFT source: `dataset` (every row: input_ids, labels, example, ...; skipped rows flagged), the
    prompt format and the skips. `examples` are the row indices a held-out split is drawn from (every usable
    row, as `sft_rows` returns them, so evaluation reproduces the split); `fits` those within max_length."""

    def __init__(self, source: str, dataset: Dataset, data_format: str, max_skipped_fraction: float,
                 max_length: int, overlong: str):
        self.source, self.dataset, self.prompt_format = source, dataset, data_format
        self.total = len(dataset)
        self.skips = skips_of(dataset, source)
        self.examples, fits, seen = [], set(), set()
        lengths, rows = column(dataset, "length"), column(dataset, "row")
        for i, (key, reason, length) in enumerate(zip(column(dataset, "key"), column(dataset, "skip_reason"), lengths)):
            if reason and not length:  # a defect or another format: never tokenised
                continue
            if key in seen:  # duplicates would leak into the held-out split
                self.skips.add(source, rows[i], None, "exact duplicate of an earlier row", UNUSABLE)
                continue
            seen.add(key)
            self.examples.append(i)
            if not reason:
                fits.add(i)
        self.fits = fits
        self.skips.report(source, self.total)
        self.skips.check_fraction(source, self.total, max_skipped_fraction)
        if any(lengths):
            report_lengths(source, [n for n in lengths if n], [n for n in column(dataset, "chars") if n], max_length,
                           overlong)
        if not fits:
            raise DataError(f"{source}: no usable rows (see the skip counts above)")

    def select(self, indices: list[int]) -> Dataset:
        """The rows at `indices` that fit max_length, as the trainer's dataset: input_ids and labels."""
        return self.dataset.select([i for i in indices if i in self.fits]).select_columns(["input_ids", "labels"])

    def example(self, index: int) -> dict:
        """The SFT example of row `index`, in the prompt format it was tokenised in."""
        return to_format(json.loads(self.dataset[index]["example"]), self.prompt_format)


def prepare_sft(source: str, split: str, tokenizer, max_length: int, overlong: str = "drop",
                columns: dict | None = None, num_proc: int | None = None, max_skipped_fraction: float = 0.05,
                data_format: str | None = None) -> PreparedSFT:
    """SFT data of `source`, tokenised once and cached (see module docstring). The prompt format follows the
    majority of the rows' shapes unless `data_format` is given (an eval file is rendered as its training file)."""
    check_overlong(overlong)
    columns = columns or {}
    key = cache_key("sft", source_fingerprint(source, split), tokenizer_fingerprint(tokenizer), max_length, overlong,
                    columns, data_format)

    def build() -> Dataset:
        raw = raw_dataset(source, split)
        workers = num_proc_for(num_proc, len(raw))
        rows = raw.map(_normalise_sft_batch, batched=True, batch_size=500, num_proc=workers,
                       remove_columns=raw.column_names, fn_kwargs={"columns": columns, "source": source},
                       new_fingerprint=key + "-rows", desc="Normalising rows")
        rows_format = data_format or majority_format(Counter(shape for shape in rows["shape"] if shape))
        return rows.map(_tokenise_sft_batch, batched=True, batch_size=500, num_proc=workers,
                        fn_kwargs={"tokenizer": tokenizer, "data_format": rows_format, "max_length": max_length,
                                   "overlong": overlong},
                        new_fingerprint=key + "-tokens", desc="Tokenising")

    dataset = cached_dataset(key, build, source)
    found = data_format or majority_format(Counter(shape for shape in column(dataset, "shape") if shape))
    return PreparedSFT(source, dataset, found, max_skipped_fraction, max_length, overlong)


def streamed_sft(source: str, split: str, tokenizer, max_length: int, overlong: str, columns: dict,
                 skips: SkipLog, data_format: str | None = None, skip_rows: int = 0, take_rows: int | None = None,
                 probe_rows: int = 200):
    """(IterableDataset of input_ids/labels tokenised as training reads it, prompt format). The format follows
    the first `probe_rows` rows; skips are recorded into `skips` as they are met."""
    from datasets import IterableDataset

    check_overlong(overlong)
    if data_format is None:
        shapes = Counter()
        for _, row in zip(range(probe_rows), iter_rows(source, split, columns)):
            shapes[row_shape(row[1])] += 1
        data_format = majority_format(shapes)

    def examples():
        for index, (number, row) in enumerate(iter_rows(source, split, columns)):
            if index < skip_rows:
                continue
            if take_rows is not None and index >= skip_rows + take_rows:
                return
            try:
                example = to_format(sft_example(row, f"{source}: row {number}"), data_format)
            except RowError as error:
                skips.add(source, number, error.field, error.reason)
                continue
            except PromptFormatError as error:
                skips.add(source, number, None, str(error), UNUSABLE)
                continue
            item, reason = fit_length(tokenize_example(example, tokenizer, f"{source}: row {number}"), max_length,
                                      overlong)
            if reason:
                skips.add(source, number, None, reason, UNUSABLE)
                continue
            yield item

    return IterableDataset.from_generator(examples), data_format

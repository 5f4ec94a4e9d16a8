"""chatgpt_recipes/data/sft.py: exact label masks (Alpaca with and without input, multi-turn chat; ChatML and the fallback
template), the EOS label surviving collation, and a clear message for each kind of bad input."""

import json

import pytest
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from chatgpt_recipes.data.rows import read_rows, split_train_eval
from chatgpt_recipes.data.sft import prompt_format, sft_rows, tokenize_example, tokenize_sft
from chatgpt_recipes.modeling.loading import load_tokenizer
from chatgpt_recipes.runtime.errors import DataError

# stanford_alpaca's PROMPT_DICT, written out here independently of chatgpt_recipes/data/templates.py
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module", params=["chatml", "fallback"])
def tokenizer(request, tiny_llama_dir, tiny_gpt2_dir):
    """SmolLM2's tokenizer (ChatML, eos <|im_end|>) and the GPT-2 style one (no template: the fallback)."""
    return load_tokenizer(tiny_llama_dir if request.param == "chatml" else tiny_gpt2_dir)


def trained_runs(item, tokenizer) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("row, prompt, answer", [
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, ALPACA_WITH_INPUT, "5"),
    ({"instruction": "Name a color.", "input": "", "output": "Blue is a color."}, ALPACA_NO_INPUT, "Blue is a color."),
    ({"instruction": "Name a color.", "output": "Blue is a color."}, ALPACA_NO_INPUT, "Blue is a color."),
])
def test_alpaca_label_mask(tokenizer, row, prompt, answer):
    (example,), _ = sft_rows([row], "rows.json")
    item = tokenize_example(example, tokenizer)
    prompt_length = len(tokenizer(prompt)["input_ids"])
    assert tokenizer.decode(item["input_ids"][:prompt_length]) == prompt
    assert item["labels"][:prompt_length] == [-100] * prompt_length
    assert trained_runs(item, tokenizer) == [answer + tokenizer.eos_token]
    assert item["labels"][-1] == tokenizer.eos_token_id


def test_multi_turn_chat_label_mask(tokenizer):
    (example,), _ = sft_rows([{"messages": CHAT}], "chat.jsonl")
    item = tokenize_example(example, tokenizer)
    end_of_turn = tokenizer.eos_token  # <|im_end|> for ChatML, <|endoftext|> in the fallback template
    assert trained_runs(item, tokenizer) == ["Hello!" + end_of_turn, "4" + end_of_turn]
    text = tokenizer.decode(item["input_ids"])
    if tokenizer.eos_token == "<|im_end|>":
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there")
    else:  # the documented fallback template
        assert text == ("Be brief.\n\n### User:\nHi there\n\n### Assistant:\nHello!<|endoftext|>\n\n"
                        "### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>\n\n")


def test_sharegpt_conversations_are_chat_rows(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}
    (example,), _ = sft_rows([row], "sharegpt.json")
    assert example == {"messages": [{"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Hello!"}]}
    assert trained_runs(tokenize_example(example, tokenizer), tokenizer) == ["Hello!" + tokenizer.eos_token]


@pytest.mark.parametrize("padding_free", [False, True])
def test_pad_is_not_eos_and_the_final_eos_label_survives_collation(tokenizer, padding_free):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = [{"instruction": "Name a color.", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five, because two plus three is five."}]
    examples, _ = sft_rows(rows, "rows.json")
    dataset = tokenize_sft(examples, tokenizer, max_length=256)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
    batch = collator([dataset[0], dataset[1]])
    labels = batch["labels"].reshape(-1).tolist()
    trained = [label for label in labels if label != -100]
    assert trained.count(tokenizer.eos_token_id) == 2  # each example's EOS is a label, padding is not
    if not padding_free:
        short = batch["labels"][0].tolist()
        assert short[len(dataset[0]["input_ids"]) - 1] == tokenizer.eos_token_id
        assert set(short[len(dataset[0]["input_ids"]):]) <= {-100}


def test_prompt_format_follows_the_rows():
    assert prompt_format([{"instruction": "a", "output": "b"}]) == "alpaca"
    assert prompt_format([{"messages": CHAT}]) == "chat"
    assert prompt_format([{"prompt": "a", "completion": "b"}]) == "plain"


def test_the_bundled_alpaca_files_read(tiny_llama_dir):
    from conftest import REPO

    path = REPO / "data" / "alpaca_en_demo.json"
    examples, skipped = sft_rows(read_rows(str(path)), str(path))
    assert len(examples) + sum(skipped.values()) == 999
    train, held_out = split_train_eval(examples, 40, seed=42)
    assert len(held_out) == 40 and len(train) == len(examples) - 40
    assert not {e["prompt"] + e["completion"] for e in held_out} & {e["prompt"] + e["completion"] for e in train}


# --- bad input: each yields a message naming the file, row and field, or a counted skip ---

@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"rows.json: row 2: missing field 'output'"),
    ([{"output": "b"}], r"rows.json: row 1: missing field 'instruction'"),
    ([{"instruction": "a", "output": 3}], r"rows.json: row 1: field 'output' must be text"),
    ([{"text": "no known fields"}], r"rows.json: row 1: unknown row shape with fields \['text'\]"),
    ([{"messages": []}], r"rows.json: row 1: field 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
     r"rows.json: row 1: messages\[1\]: roles must alternate .* found 'user' where 'assistant' was expected"),
    ([{"messages": [{"role": "assistant", "content": "a"}]}], r"row 1: messages\[0\]: roles must alternate"),
    ([{"messages": [{"role": "wizard", "content": "a"}]}], r"row 1: messages\[0\]: unknown role 'wizard'"),
])
def test_malformed_rows_name_file_row_and_field(rows, message):
    with pytest.raises(DataError, match=message):
        sft_rows(rows, "rows.json")


GOOD = [{"instruction": f"Name colour number {i}.", "output": f"Colour {i} is blue."} for i in range(40)]


def test_empty_responses_are_counted_skips(capsys):
    rows = GOOD + [{"instruction": "c", "output": "  "},
                   {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    examples, skipped = sft_rows(rows, "rows.json", max_skipped_fraction=0.1)
    assert len(examples) == 40 and skipped == {"empty output": 1, "empty assistant turn": 1}
    assert [(r["row"], r["field"]) for r in skipped.records] == [(41, "output"), (42, "messages")]
    out = capsys.readouterr().out
    assert "rows.json: skipped 1 of 42 rows: empty output" in out
    assert "rows.json: skipped 1 of 42 rows: empty assistant turn" in out
    with pytest.raises(DataError, match="no usable rows"):
        sft_rows([{"instruction": "c", "output": ""}], "rows.json", max_skipped_fraction=1.0)


def test_non_json_line_in_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{instruction: oops}\n")
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: not valid JSON"):
        read_rows(str(path))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.json"):
        read_rows(str(tmp_path / "nope.json"))
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        read_rows(str(tmp_path / "rows.txt"))


def test_overlong_examples_are_counted(tokenizer, capsys):
    rows = [{"instruction": "Name a color.", "output": "Blue."},
            {"instruction": "Write a story.", "output": "Once upon a time " * 40}]
    examples, _ = sft_rows(rows, "rows.json")
    limit = len(tokenize_example(examples[0], tokenizer)["input_ids"]) + 10
    assert len(tokenize_sft(examples, tokenizer, max_length=limit, overlong="drop", source="rows.json")) == 1
    out = capsys.readouterr().out
    assert f"rows.json: 1 of 2 examples are longer than max_length={limit} tokens and were dropped" in out
    truncated = tokenize_sft(examples, tokenizer, max_length=limit, overlong="truncate", source="rows.json")
    assert [len(ids) for ids in truncated["input_ids"]][1] == limit
    assert "were truncated" in capsys.readouterr().out
    with pytest.raises(DataError, match="every example is longer than max_length=5"):
        tokenize_sft(examples, tokenizer, max_length=5, source="rows.json")


# --- the row-level policy on prepared (cached) datasets: every quirk a counted skip with its row recorded ---

QUIRKS = [  # (row, field, reason) for rows 41.. of a file whose first 40 rows are good
    ({"instruction": "a", "output": None}, "output", "field 'output' is null"),
    ({"instruction": "a", "output": ["x", "y"]}, "output", "field 'output' must be text, found list"),
    ({"instruction": "a", "output": 7}, "output", "field 'output' must be text, found int"),
    ({"instruction": "a", "output": ""}, "output", "empty output"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
     "roles must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "messages",
     "empty assistant turn"),
    ({"text": "an odd row"}, None, "unknown row shape"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_prepared_sft_skips_every_quirk_and_records_it(tiny_llama_dir, tmp_path, data_cache):
    from chatgpt_recipes.data.sft import prepare_sft

    tokenizer = load_tokenizer(tiny_llama_dir)
    path = write_jsonl(tmp_path / "rows.jsonl", GOOD + [row for row, _, _ in QUIRKS])
    prepared = prepare_sft(path, "train", tokenizer, 256, max_skipped_fraction=0.2)
    assert len(prepared.fits) == 40 and prepared.total == 47
    log = prepared.skips.write(str(tmp_path / "out"))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in records] == [(41 + i, field) for i, (_, field, _) in enumerate(QUIRKS)]
    for record, (_, _, reason) in zip(records, QUIRKS):
        assert reason in record["reason"] and record["source"] == path and record["kind"] == "defect"
    with pytest.raises(DataError, match=r"7 of 47 rows \(15%\) are defective, more than max_skipped_fraction=0.05.*"
                                        r"row 41: field 'output' is null"):
        prepare_sft(path, "train", tokenizer, 256)  # the default guard; the cache does not hide it


def test_mixed_file_takes_the_majority_format(tiny_llama_dir, tmp_path, data_cache):
    from chatgpt_recipes.data.sft import prepare_sft

    single = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}
    multi = {"messages": single["messages"] * 2}
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD + [single, multi])
    prepared = prepare_sft(path, "train", load_tokenizer(tiny_llama_dir), 256)
    assert prepared.prompt_format == "alpaca" and prompt_format(GOOD + [single, multi]) == "alpaca"
    last = prepared.example(max(prepared.fits))  # the single-turn chat, as an Alpaca prompt
    assert last["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:\n") and last["completion"] == "Hi."
    assert [(r["row"], r["kind"]) for r in prepared.skips.records] == [(42, "unusable")]
    assert "multi-turn" in prepared.skips.records[0]["reason"]


def test_rerun_reads_the_cache_without_tokenising(tiny_llama_dir, tmp_path, data_cache, monkeypatch, capsys):
    import chatgpt_recipes.data.sft
    from chatgpt_recipes.data.sft import prepare_sft

    tokenizer = load_tokenizer(tiny_llama_dir)
    path = write_jsonl(tmp_path / "rows.jsonl", GOOD)
    first = prepare_sft(path, "train", tokenizer, 256)
    assert "prepared and cached" in capsys.readouterr().out

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(chatgpt_recipes.data.sft, "tokenize_examples", no_tokenising)
    again = prepare_sft(path, "train", tokenizer, 256)
    assert "read from the cache" in capsys.readouterr().out
    assert list(again.dataset["input_ids"]) == list(first.dataset["input_ids"])
    with pytest.raises(AssertionError, match="tokenised again"):  # other options: another key, tokenised anew
        prepare_sft(path, "train", tokenizer, 128)
    write_jsonl(tmp_path / "rows.jsonl", GOOD[:-1])  # other content: another key
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_sft(path, "train", tokenizer, 256)


def test_a_cache_saved_meanwhile_by_another_run_is_kept(data_cache):
    """Two runs preparing the same data at once (two launches on one cache): the one that finishes second reads
    the first one's copy and removes nothing a reader may have open."""
    from datasets import Dataset

    from chatgpt_recipes.data.rows import cached_dataset

    first_copy = []

    def other_run_wins():
        cached_dataset("key", lambda: Dataset.from_dict({"x": [1, 2]}), "first")
        first_copy.append((data_cache / "key").stat().st_ino)
        return Dataset.from_dict({"x": [1, 2]})

    assert cached_dataset("key", other_run_wins, "second")["x"] == [1, 2]
    assert (data_cache / "key").stat().st_ino == first_copy[0]  # the first run's directory, not replaced
    assert not list(data_cache.glob("key.tmp*"))


def test_num_proc_gives_the_same_dataset(tiny_llama_dir, tmp_path, data_cache):
    from chatgpt_recipes.data.sft import prepare_sft

    tokenizer = load_tokenizer(tiny_llama_dir)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}"} for i in range(2100)]
    one = prepare_sft(write_jsonl(tmp_path / "a.jsonl", rows), "train", tokenizer, 128)
    two = prepare_sft(write_jsonl(tmp_path / "b.jsonl", rows + [GOOD[0]]), "train", tokenizer, 128, num_proc=2)
    assert list(two.dataset["input_ids"])[:2100] == list(one.dataset["input_ids"])


def test_column_mapping(tiny_llama_dir, tmp_path, data_cache):
    from chatgpt_recipes.data.options import parse_columns
    from chatgpt_recipes.data.sft import prepare_sft

    columns = parse_columns("instruction=question,output=answer")
    assert columns == parse_columns({"instruction": "question", "output": "answer"})
    rows = [{"question": row["instruction"], "answer": row["output"]} for row in GOOD]
    prepared = prepare_sft(write_jsonl(tmp_path / "qa.jsonl", rows), "train", load_tokenizer(tiny_llama_dir), 256,
                           columns=columns)
    assert len(prepared.fits) == 40 and prepared.prompt_format == "alpaca"
    assert prepared.example(0)["completion"] == "Colour 0 is blue."
    with pytest.raises(DataError, match=r"missing column 'question' \(read as field 'instruction'"):
        prepare_sft(write_jsonl(tmp_path / "plain.jsonl", GOOD), "train", load_tokenizer(tiny_llama_dir), 256,
                    columns=columns)


def test_long_rows_report_tokens_per_character(tiny_llama_dir, tmp_path, data_cache, capsys):
    from chatgpt_recipes.data.sft import prepare_sft

    chinese = [{"instruction": f"请用中文写一段关于春天的短文，第{i}篇。", "output": "春天来了，万物复苏。" * (8 + i % 30)}
               for i in range(60)]
    prepare_sft(write_jsonl(tmp_path / "zh.jsonl", chinese), "train", load_tokenizer(tiny_llama_dir), 256)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "examples are longer than max_length=256" in line)
    ratio = float(line.split("spends ")[1].split(" tokens per character")[0])
    suggested = int(line.split("max_length=")[-1].split(" keeps")[0])
    assert ratio > 0.6 and suggested > 256 and "keeps 95% of the rows" in line

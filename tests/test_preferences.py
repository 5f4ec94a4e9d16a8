"""common/preferences.py: every preference shape to rankings, K-wise expansion, HH splitting, the prompt rendering
shared by SFT/RM/PPO, and the bad rows that must fail with a message naming the row and field."""

import json
from math import comb

import pytest

from common.data import DataError, read_rows, tokenize_example
from common.preferences import (PromptFormatError, encode_prompt, encode_response, ranking_of, ranking_pairs,
                                read_rankings, render_prompt, split_hh_transcript, tokenize_rankings)
from common.reward import PromptGroupedBatchSampler
from conftest import REPO


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from common.models import load_tokenizer

    return load_tokenizer(tiny_llama_dir)


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_kwise_expansion_counts_and_weights(k):
    pairs = ranking_pairs(k)
    assert len(pairs) == comb(k, 2)
    assert all(better < worse for better, worse, _ in pairs)  # best-to-worst order: lower index wins
    assert sum(weight for *_, weight in pairs) == pytest.approx(1.0)  # every prompt counts once
    assert len({(b, w) for b, w, _ in pairs}) == len(pairs)


def test_kwise_pairs_of_a_prompt_share_a_step(tokenizer):
    rankings = [{"prompt": f"question {i}", "responses": [f"answer {j} to {i}" for j in range(k)]}
                for i, k in enumerate([4, 2, 3, 5, 2, 4])]
    rows, _ = tokenize_rankings(rankings, tokenizer, "alpaca", None, "synthetic")
    assert len(rows) == sum(comb(len(r["responses"]), 2) for r in rankings)
    groups = [row["group"] for row in rows]
    sampler = PromptGroupedBatchSampler(groups, prompts_per_batch=2, seed=0)
    for epoch in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3
        for batch in batches:
            batch_groups = {groups[i] for i in batch}
            assert len(batch_groups) <= 2
            for group in batch_groups:  # every pair of each prompt in this batch, none elsewhere
                assert {i for i in batch if groups[i] == group} == {i for i, g in enumerate(groups) if g == group}
        assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    weights = {}
    for row in rows:
        weights[row["group"]] = weights.get(row["group"], 0) + row["weight"]
    assert all(total == pytest.approx(1.0) for total in weights.values())


def test_ranks_field_orders_responses():
    ranking = ranking_of({"prompt": "p", "responses": ["mid", "worst", "best"], "ranks": [2, 3, 1]}, "f: row 1")
    assert ranking["responses"] == ["best", "mid", "worst"]


def test_hh_transcript_split():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit\n\nAssistant: Apple."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit\n\nAssistant: No."
    ranking = ranking_of({"chosen": chosen, "rejected": rejected}, "hh: row 1")
    assert ranking["prompt"] == [{"role": "user", "content": "Hi there"},
                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Name a fruit"}]
    assert ranking["responses"] == ["Apple.", "No."]
    with pytest.raises(DataError, match="hh: row 2: 'chosen' and 'rejected' transcripts differ"):
        ranking_of({"chosen": chosen, "rejected": "\n\nHuman: Other\n\nAssistant: No."}, "hh: row 2")


def test_all_pair_shapes_and_real_sharegpt_file(tokenizer):
    standard = ranking_of({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "r")
    conversational = ranking_of({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
                                 "rejected": [{"role": "user", "content": "Q?"},
                                              {"role": "assistant", "content": "bad"}]}, "r")
    assert standard["responses"] == conversational["responses"] == ["good", "bad"]
    rankings = read_rankings(read_rows(str(REPO / "data" / "dpo_en_demo.json")), "dpo_en_demo.json")
    assert len(rankings) == 300 and all(len(r["responses"]) == 2 for r in rankings)
    assert rankings[0]["prompt"][0]["role"] == "user"


def test_rendering_matches_sft(tokenizer):
    """The RM/PPO prompt tokens are exactly the prompt tokens SFT trains after, in both formats."""
    alpaca = {"instruction": "Name a color.", "input": ""}
    text = render_prompt(alpaca, tokenizer, "alpaca")
    sft = tokenize_example({"prompt": text, "completion": "Blue."}, tokenizer)
    prompt_ids = encode_prompt(text, tokenizer, "alpaca")
    assert sft["input_ids"] == prompt_ids + encode_response("Blue.", tokenizer)
    assert sft["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    turns = [{"role": "user", "content": "Name a color."}]
    chat = render_prompt(turns, tokenizer, "chat")
    sft_chat = tokenize_example({"messages": turns + [{"role": "assistant", "content": "Blue."}]}, tokenizer)
    chat_ids = encode_prompt(chat, tokenizer, "chat")
    assert sft_chat["input_ids"][: len(chat_ids)] == chat_ids
    assert render_prompt(alpaca, tokenizer, "chat") == chat
    assert render_prompt(alpaca, tokenizer, "plain") == "Name a color."
    with pytest.raises(PromptFormatError, match="multi-turn"):
        render_prompt(turns + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                      tokenizer, "alpaca")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "row 3: 'chosen' and 'rejected' are the same text"),
    ({"prompt": "Q", "chosen": "ok", "rejected": "  "}, "row 3: field 'rejected' is an empty response"),
    ({"prompt": "Q", "responses": ["only one"]}, "row 3: field 'responses' must rank at least 2 responses"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [1, 2, 2]}, "row 3: field 'ranks' has ties"),
    ({"prompt": "Q", "responses": ["a", "a"]}, "row 3: field 'responses' ranks the same text twice"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more?", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "row 3: field 'chosen' is an HH transcript with no final Assistant turn"),
    ({"question": "Q", "answer": "A"}, "row 3: unknown preference row"),
])
def test_bad_preference_rows(tmp_path, row, message):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, row]) + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_rankings(read_rows(str(path)), str(path))
    assert str(path) in str(error.value)


def test_split_hh_without_assistant():
    with pytest.raises(DataError, match="no final Assistant turn"):
        split_hh_transcript("\n\nHuman: hello", "f: row 1", "chosen")

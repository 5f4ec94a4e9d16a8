"""chatgpt_recipes/data/preferences.py: every preference shape to rankings, K-wise expansion, HH splitting, and the bad rows that
must fail with a message naming the row and field; chatgpt_recipes/data/templates.py: one prompt rendering for SFT, RM and PPO."""

import json
import re
from math import comb

import pytest
from conftest import REPO

from chatgpt_recipes.data.preferences import (dpo_pairs, encode_response, ranking_of, ranking_pairs, ranking_sequences,
                                              read_rankings, split_hh_transcript, tokenize_rankings)
from chatgpt_recipes.data.rows import raw_dataset, read_rows
from chatgpt_recipes.data.sft import sft_rows, tokenize_example
from chatgpt_recipes.data.templates import encode_prompt, example_prompt, render_prompt
from chatgpt_recipes.rl.inputs import prompt_dataset
from chatgpt_recipes.runtime.errors import DataError, PromptFormatError
from chatgpt_recipes.training.reward import PromptGroupedBatchSampler


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from chatgpt_recipes.modeling.loading import load_tokenizer

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
    # ranks are numbers, even when a file writes them as text or floats: "10" is after "2"
    for ranks in (["2", "10", "1"], [2.0, 10.0, 1.0], [2, 10, 1]):
        ranking = ranking_of({"prompt": "p", "responses": ["mid", "worst", "best"], "ranks": ranks}, "f: row 1")
        assert ranking["responses"] == ["best", "mid", "worst"]


def test_a_null_rank_is_a_counted_skip_with_its_row_number_in_a_prepared_file(tmp_path, tokenizer, data_cache):
    """A K-wise row with a null rank once aborted the whole file (a TypeError in sorting, no row number)."""
    from chatgpt_recipes.data.preferences import prepare_rankings

    rows = [{"prompt": f"Q{i}", "responses": ["best", "mid", "worst"], "ranks": [1, 2, 3]} for i in range(30)]
    rows[6]["ranks"] = [1, None, 3]
    rows[9]["ranks"] = ["3", "10", "2"]  # "10" as text sorted before "2": read as numbers
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    for purpose in ("reward", "dpo"):
        prepared = prepare_rankings(str(path), "train", tokenizer, "alpaca", purpose, max_skipped_fraction=0.1)
        (record,) = prepared.skips.records
        assert (record["row"], record["field"], record["kind"]) == (7, "ranks", "defect")
        assert "must hold integers, found None at position 1" in record["reason"]
        assert len(prepared.fits) == 29
    pairs = prepared.dpo_dataset(prepared.examples)
    tenth = [pair for pair in pairs if "Q9" in pair["prompt"]]
    assert [(pair["chosen"][:4], pair["rejected"][:4]) for pair in tenth] == [
        ("wors", "best"), ("wors", "mid<"), ("best", "mid<")]


ULTRAFEEDBACK_ROW = {  # HuggingFaceH4/ultrafeedback_binarized's shape: the prompt repeated in both transcripts
    "prompt": "Name a color.", "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
    "chosen": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Table."}],
    "messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
}


@pytest.mark.parametrize("row", [
    ULTRAFEEDBACK_ROW,
    {key: ULTRAFEEDBACK_ROW[key] for key in ("chosen", "rejected")},  # no prompt field
    {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}],  # OpenAI content parts
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Table."}]}]},
    {"prompt": "Name a color.", "chosen": {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
     "rejected": {"role": "assistant", "content": "Table."}},
])
def test_conversational_pair_shapes_read_as_one_prompt_and_two_answers(row):
    ranking = ranking_of(row, "prefs.json: row 1")
    assert ranking["responses"] == ["Blue.", "Table."] and "response_prompts" not in ranking
    prompt = ranking["prompt"]
    assert prompt in ("Name a color.", [{"role": "user", "content": "Name a color."}])


@pytest.mark.parametrize("prompt_format", ["chat", "alpaca"])
def test_ultrafeedback_binarized_rows_train_the_reward_model_and_dpo(tmp_path, tokenizer, data_cache, prompt_format):
    """The shapes of the most used public preference sets go through the prepared (cached) path the recipes use,
    every row kept, and score the same tokens as the standard shape of the same pair."""
    from chatgpt_recipes.data.preferences import prepare_rankings

    multi_part = {"prompt": "Name a color.",
                  "chosen": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
                  "rejected": ULTRAFEEDBACK_ROW["rejected"]}
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [ULTRAFEEDBACK_ROW, multi_part] * 5) + "\n")
    reward = prepare_rankings(str(path), "train", tokenizer, prompt_format, "reward")
    assert not reward.skips.records and len(reward.fits) == 10
    pairs = reward.reward_pairs(reward.examples)
    standard = ranking_of({"prompt": [{"role": "user", "content": "Name a color."}], "chosen": "Blue.",
                           "rejected": "Table."}, "r")
    (chosen, rejected), _ = ranking_sequences(standard, tokenizer, prompt_format, None, "drop")
    assert all(p["chosen_ids"] == chosen and p["rejected_ids"] == rejected for p in pairs)
    dpo = prepare_rankings(str(path), "train", tokenizer, prompt_format, "dpo")
    assert list(dpo.dpo_dataset(dpo.examples)) == dpo_pairs(standard, tokenizer, prompt_format) * 10


def test_sft_chat_rows_read_openai_content_parts_as_text():
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                          {"role": "user", "content": [{"type": "text", "text": "Name"},
                                                       {"type": "text", "text": "a color."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
    (example,), _ = sft_rows([parts], "chat.json")
    assert example["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Name\na color."},
                                   {"role": "assistant", "content": "Blue."}]


def test_a_json_file_holding_one_chat_object_is_an_error_not_a_list_of_turns(tmp_path):
    """Once read as a list of rows, each turn a row; the file is the error (as any JSON object is, README), the
    message says how to write it."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "one.json").write_text(json.dumps(chat))
    for read in (read_rows, raw_dataset):
        with pytest.raises(DataError, match=r"one.json: holds one chat object \(\{\"messages\": \[turns\]\}\), not a "
                                            r"list of rows: write it as \[\{\"messages\": \[...\]\}\]"):
            read(str(tmp_path / "one.json"))
    (tmp_path / "sharegpt.json").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}]}))
    with pytest.raises(DataError, match="holds one chat object"):
        read_rows(str(tmp_path / "sharegpt.json"))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [chat, chat]}))  # rows under one key: still read
    assert read_rows(str(tmp_path / "wrapped.json")) == [chat, chat]


def test_hh_transcript_split():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit\n\nAssistant: Apple."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit\n\nAssistant: No."
    ranking = ranking_of({"chosen": chosen, "rejected": rejected}, "hh: row 1")
    assert ranking["prompt"] == [{"role": "user", "content": "Hi there"},
                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Name a fruit"}]
    assert ranking["responses"] == ["Apple.", "No."] and "response_prompts" not in ranking


def test_hh_transcripts_that_differ_before_the_last_turn_are_scored_whole(tokenizer):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit\n\nAssistant: Apple."
    rejected = "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Name a fruit\n\nAssistant: No."
    ranking = ranking_of({"chosen": chosen, "rejected": rejected}, "hh: row 2")
    assert ranking["prompt"] == [{"role": "user", "content": "Hi"}]  # the longest common prefix ending with a user turn
    assert ranking["responses"] == ["Apple.", "No."]
    assert [p[1]["content"] for p in ranking["response_prompts"]] == ["Hello!", "Go away."]
    (chosen_ids, rejected_ids), _ = ranking_sequences(ranking, tokenizer, "chat", None, "drop")
    assert tokenizer.decode(chosen_ids) == tokenizer.apply_chat_template(
        [*ranking["response_prompts"][0], {"role": "assistant", "content": "Apple."}], tokenize=False).rstrip("\n")
    (pair,) = dpo_pairs(ranking, tokenizer, "chat")
    assert pair["prompt"] == render_prompt(ranking["prompt"], tokenizer, "chat")
    assert pair["chosen"].startswith("Hello!") and pair["chosen"].endswith("Apple." + tokenizer.eos_token)
    assert pair["rejected"].startswith("Go away.") and pair["rejected"].endswith("No." + tokenizer.eos_token)


def test_hh_consecutive_assistant_turns_are_one_turn():
    text = "\n\nHuman: Key?\n\nAssistant: Here it is:\n\nAssistant:  ABC.\n\nHuman: Thanks\n\nAssistant: Bye."
    prompt, answer = split_hh_transcript(text, "hh: row 1", "chosen")
    assert [t["role"] for t in prompt] == ["user", "assistant", "user"] and answer == "Bye."
    assert prompt[1]["content"] == "Here it is:\n\nABC."


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
    assert sft["input_ids"] == prompt_ids + encode_response("Blue.", tokenizer, "alpaca")
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


SFT_ROWS = {  # one conversation, "Name a color." answered "Blue.", as a row of each format's own shape
    "alpaca": {"instruction": "Name a color.", "input": "", "output": "Blue."},
    "chat": {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    "plain": {"prompt": "Name a color.", "completion": "Blue."},
}


@pytest.mark.parametrize("prompt_format", sorted(SFT_ROWS))
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir"])  # a chat template; the fallback template
def test_sft_reward_model_and_ppo_render_the_same_prompt(prompt_format, model, request, tmp_path):
    """The cross-stage promise: the prompt SFT trains after is, as text and as tokens, what the reward model
    scores after (a preference row on the same conversation) and what PPO/RLOO generate from (the same row)."""
    from chatgpt_recipes.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(request.getfixturevalue(model))
    row = SFT_ROWS[prompt_format]
    (example,), _ = sft_rows([row], "sft.json")
    sft_prompt = example_prompt(example, tokenizer)
    sft = tokenize_example(example, tokenizer)
    sft_prompt_ids = sft["input_ids"][: next(i for i, label in enumerate(sft["labels"]) if label != -100)]

    preference = {"prompt": [{"role": "user", "content": "Name a color."}], "chosen": "Blue.", "rejected": "Red."}
    ranking = ranking_of(preference, "preferences.json: row 1")
    (rm_pair,) = dpo_pairs(ranking, tokenizer, prompt_format)
    (rm_chosen, _), _ = ranking_sequences(ranking, tokenizer, prompt_format, None, "drop")

    (tmp_path / "prompts.json").write_text(json.dumps([row]))
    ppo = prompt_dataset(str(tmp_path / "prompts.json"), tokenizer, prompt_format, 128)
    rloo = prompt_dataset(str(tmp_path / "prompts.json"), tokenizer, prompt_format, 128, tokenized=False)

    assert sft_prompt == rm_pair["prompt"] == rloo[0]["prompt"]
    assert sft_prompt_ids == rm_chosen[: len(sft_prompt_ids)] == ppo[0]["input_ids"]
    if prompt_format == "alpaca":
        assert sft_prompt.startswith("Below is an instruction") and sft_prompt.endswith("### Response:\n")


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "'chosen' and 'rejected' are the same text"),
    ({"prompt": "Q", "chosen": "ok", "rejected": "  "}, "rejected", "field 'rejected' is an empty response"),
    ({"prompt": "Q", "chosen": None, "rejected": "no"}, "chosen", "field 'chosen' is null"),
    ({"prompt": "Q", "chosen": 3, "rejected": "no"}, "chosen", "field 'chosen' must be text, found int"),
    ({"prompt": "Q", "responses": ["only one"]}, "responses", "field 'responses' must rank at least 2 responses"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [1, 2, 2]}, "ranks", "field 'ranks' has ties"),
    ({"prompt": "Q", "responses": ["a", "a"]}, "responses", "field 'responses' ranks the same text twice"),
    ({"prompt": "Q", "chosen": "Paris is  the capital.", "rejected": "Paris is the\ncapital. "}, "rejected",
     "'chosen' and 'rejected' are the same text"),  # equal once whitespace is normalised
    ({"prompt": "Q", "responses": ["a b", "c", "a  b"]}, "responses", "field 'responses' ranks the same text twice"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [1, None, 2]}, "ranks",
     "field 'ranks' must hold integers, found None at position 1"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": ["first", "second"]}, "ranks",
     "field 'ranks' must hold integers, found 'first' at position 0"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": ["+-1", "2"]}, "ranks", "field 'ranks' must hold integers"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": [1.5, 2]}, "ranks", "field 'ranks' must hold integers"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": [True, False]}, "ranks", "field 'ranks' must hold integers"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [1, 2]}, "ranks",
     "field 'ranks' must give one rank per response (3), found 2"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": None}, "ranks",
     "field 'ranks' must give one rank per response (2), found NoneType"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": ["1", 1]}, "ranks", "field 'ranks' has ties [1, 1]"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "image_url"}]}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no"}]}, "chosen",
     "chosen[1]: content part 0 is not text (type 'image_url')"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more?", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "chosen", "field 'chosen' is an HH transcript with no final Assistant turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "chosen", "field 'chosen' has an empty final Assistant turn"),
    ({"question": "Q", "answer": "A"}, None, "unknown preference row"),
])
def test_bad_preference_row_is_a_recorded_skip_and_a_mostly_bad_file_an_error(tmp_path, row, field, message):
    from chatgpt_recipes.data.rows import SkipLog

    path = tmp_path / "prefs.jsonl"
    good = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in good + [row]) + "\n")
    skips = SkipLog()
    assert len(read_rankings(read_rows(str(path)), str(path), skips=skips)) == 40
    (record,) = skips.records
    assert (record["row"], record["field"], record["kind"]) == (41, field, "defect") and message in record["reason"]
    path.write_text("\n".join(json.dumps(r) for r in good[:2] + [row]) + "\n")
    with pytest.raises(DataError, match="row 3: " + re.escape(message)) as error:
        read_rankings(read_rows(str(path)), str(path))
    assert str(path) in str(error.value) and "max_skipped_fraction=0.05" in str(error.value)


def test_split_hh_without_assistant():
    with pytest.raises(DataError, match="no final Assistant turn"):
        split_hh_transcript("\n\nHuman: hello", "f: row 1", "chosen")

"""Left truncation of long preference conversations (issue 28): the oldest turns go first, the final exchange
stays whole, chosen and rejected keep identical prompt tokens, and no row is dropped for length. Issue 34: a pair
that a cut makes identical is skipped and counted, and DPO prompts are cut by us like the reward model's, with what
TRL still cuts counted."""

import gzip
import json

import pytest
from conftest import REPO

from chatgpt_recipes.data.preferences import (SkipRanking, dpo_pairs, dpo_rows, encode_response, fit_dpo_pairs,
                                              prepare_rankings, ranking_of, ranking_sequences, render_prompt,
                                              tokenize_rankings)
from chatgpt_recipes.data.templates import encode_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from chatgpt_recipes.modeling.loading import load_tokenizer

    return load_tokenizer(tiny_llama_dir)


def hh_transcript(exchanges: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {user}\n\nAssistant: {answer}" for user, answer in exchanges)


OLD = [(f"Old question number {i} about the weather in a town far away?",
        f"Old answer number {i}: it rains there most days of the year, they say.") for i in range(6)]


def prompt_length(sequence, answer, tokenizer):
    return len(sequence) - len(encode_response(answer, tokenizer, "chat"))


def test_long_conversation_keeps_its_final_exchange_and_drops_its_oldest_turns(tokenizer):
    row = {"chosen": hh_transcript(OLD + [("Name a fruit", "Apple, a sweet one.")]),
           "rejected": hh_transcript(OLD + [("Name a fruit", "No.")])}
    ranking = ranking_of(row, "hh: row 1")
    (whole, _), _ = ranking_sequences(ranking, tokenizer, "chat", None, "truncate")
    max_length = len(whole) // 2
    (chosen, rejected), cut = ranking_sequences(ranking, tokenizer, "chat", max_length, "truncate")

    assert len(chosen) <= max_length and len(rejected) <= max_length
    assert cut["turns_dropped"] >= 2 and cut["turns_dropped"] % 2 == 0
    assert cut["prompt_tokens_cut"] == cut["answers_cut"] == 0
    kept = ranking["prompt"][cut["turns_dropped"]:]
    assert kept[-1] == {"role": "user", "content": "Name a fruit"} and kept[0]["role"] == "user"
    expected_prompt = encode_prompt(render_prompt(kept, tokenizer, "chat"), tokenizer, "chat")
    assert chosen == expected_prompt + encode_response("Apple, a sweet one.", tokenizer, "chat")
    assert rejected == expected_prompt + encode_response("No.", tokenizer, "chat")
    text = tokenizer.decode(chosen)
    assert "Old question number 0" not in text and "Old answer number 5" in text  # the newest history stays
    assert chosen[-1] == tokenizer.eos_token_id


def test_transcripts_that_differ_early_lose_the_same_oldest_turns(tokenizer):
    chosen_history = OLD[:3] + [("Hi", "Hello, how can I help you today?")] + OLD[3:]
    rejected_history = OLD[:3] + [("Hi", "Go away.")] + OLD[3:]
    row = {"chosen": hh_transcript(chosen_history + [("Name a fruit", "Apple.")]),
           "rejected": hh_transcript(rejected_history + [("Name a fruit", "No.")])}
    ranking = ranking_of(row, "hh: row 2")
    assert ranking.get("response_prompts")
    (whole, _), _ = ranking_sequences(ranking, tokenizer, "chat", None, "truncate")
    (chosen, rejected), cut = ranking_sequences(ranking, tokenizer, "chat", len(whole) - 40, "truncate")
    assert cut["turns_dropped"] >= 2
    assert "Hello, how can I help" in tokenizer.decode(chosen) and "Go away." in tokenizer.decode(rejected)
    shared = render_prompt(ranking["prompt"][cut["turns_dropped"]:], tokenizer, "chat")
    assert tokenizer.decode(chosen).startswith(shared.removesuffix("<|im_start|>assistant\n"))
    assert tokenizer.decode(rejected).startswith(shared.removesuffix("<|im_start|>assistant\n"))


def test_an_answer_is_cut_at_its_end_only_when_the_final_exchange_alone_does_not_fit(tokenizer):
    long_answer = " ".join(f"word{i}" for i in range(200))
    ranking = ranking_of({"chosen": hh_transcript(OLD + [("Name a fruit", long_answer)]),
                          "rejected": hh_transcript(OLD + [("Name a fruit", "No.")])}, "hh: row 3")
    (chosen, rejected), cut = ranking_sequences(ranking, tokenizer, "chat", 128, "truncate")
    assert cut["turns_dropped"] == len(OLD) * 2 and cut["answers_cut"] == 1 and cut["prompt_tokens_cut"] == 0
    assert len(chosen) == 128 and chosen[-1] == tokenizer.eos_token_id
    final_prompt = encode_prompt(render_prompt(ranking["prompt"][-1:], tokenizer, "chat"), tokenizer, "chat")
    assert chosen[: len(final_prompt)] == rejected[: len(final_prompt)] == final_prompt
    assert rejected == final_prompt + encode_response("No.", tokenizer, "chat")  # the short answer stays whole


def test_a_prompt_too_long_alone_is_cut_at_its_start_identically_on_both_sides(tokenizer):
    question = " ".join(f"detail{i}" for i in range(300)) + " So, which fruit?"
    ranking = ranking_of({"prompt": question, "chosen": "Apple.", "rejected": "A stone."}, "pairs: row 1")
    (chosen, rejected), cut = ranking_sequences(ranking, tokenizer, "chat", 64, "truncate")
    assert cut["prompt_tokens_cut"] > 0 and cut["answers_cut"] == 0
    assert len(chosen) <= 64 and len(rejected) <= 64
    assert chosen[: prompt_length(chosen, "Apple.", tokenizer)] == rejected[: prompt_length(rejected, "A stone.",
                                                                                               tokenizer)]
    assert tokenizer.decode(chosen).endswith("So, which fruit?<|im_end|>\n<|im_start|>assistant\nApple.<|im_end|>")


def test_kwise_ranking_prompts_are_cut_alike(tokenizer):
    prompt = [{"role": r, "content": c} for user, answer in OLD for r, c in (("user", user), ("assistant", answer))]
    prompt.append({"role": "user", "content": "Name a fruit"})
    ranking = ranking_of({"prompt": prompt, "responses": ["Apple.", "A pear.", "No."]}, "ranks: row 1")
    sequences, cut = ranking_sequences(ranking, tokenizer, "chat", 80, "truncate")
    assert cut["turns_dropped"] > 0 and all(len(s) <= 80 for s in sequences)
    prompts = {tuple(s[: prompt_length(s, a, tokenizer)]) for s, a in zip(sequences, ranking["responses"])}
    assert len(prompts) == 1


def test_system_prompt_replaces_the_chat_templates_default(tokenizer):
    ranking = ranking_of({"prompt": "Name a fruit", "chosen": "Apple.", "rejected": "No."}, "pairs: row 1")
    (default, _), _ = ranking_sequences(ranking, tokenizer, "chat", None, "truncate")
    (empty, _), _ = ranking_sequences(ranking, tokenizer, "chat", None, "truncate", system_prompt="")
    assert "You are a helpful AI assistant" in tokenizer.decode(default)
    assert "You are a helpful AI assistant" not in tokenizer.decode(empty) and len(empty) < len(default) - 10


def test_dpo_drops_the_same_oldest_turns(tokenizer):
    ranking = ranking_of({"chosen": hh_transcript(OLD + [("Name a fruit", "Apple.")]),
                          "rejected": hh_transcript(OLD + [("Name a fruit", "No.")])}, "hh: row 1")
    (whole,) = dpo_pairs(ranking, tokenizer, "chat")
    (pair,) = dpo_pairs(ranking, tokenizer, "chat", max_length=100)
    assert "Old question number 0" in whole["prompt"] and "Old question number 0" not in pair["prompt"]
    assert pair["prompt"].endswith("Name a fruit<|im_end|>\n<|im_start|>assistant\n")
    assert len(tokenizer(pair["prompt"] + pair["chosen"], add_special_tokens=False)["input_ids"]) <= 100


def differing_only_early() -> dict:
    """Transcripts that differ only in their opening exchange and end with the same answer (the full HH set has
    such pairs): a preference only while that opening exchange is kept."""
    return {"chosen": hh_transcript([("Hi", "Hello, how can I help you today?")] + OLD + [("Name a fruit", "Apple.")]),
            "rejected": hh_transcript([("Hi", "Go away.")] + OLD + [("Name a fruit", "Apple.")])}


def test_a_pair_the_cut_makes_identical_is_skipped_and_counted(tokenizer):
    ranking = ranking_of(differing_only_early(), "hh: row 1")  # kept: the transcripts differ
    (whole_chosen, whole_rejected), _ = ranking_sequences(ranking, tokenizer, "chat", None, "truncate")
    assert whole_chosen != whole_rejected
    with pytest.raises(SkipRanking, match="identical within max_length=100"):
        ranking_sequences(ranking, tokenizer, "chat", 100, "truncate")
    fine = ranking_of({"chosen": hh_transcript([("Name a fruit", "Apple.")]),
                       "rejected": hh_transcript([("Name a fruit", "No.")])}, "hh: row 2")
    rows, skipped = tokenize_rankings([ranking, fine], tokenizer, "chat", 100, "hh", overlong="truncate")
    assert len(rows) == 1 and rows[0]["group"] == 1
    assert [(r["row"], "identical" in r["reason"]) for r in skipped.records] == [(1, True)]
    # DPO alike: dropping the opening turns leaves the same prompt and the same answer
    with pytest.raises(SkipRanking, match="identical"):
        fit_dpo_pairs(ranking, tokenizer, "chat", 100)
    assert len(dpo_rows([ranking, fine], tokenizer, "chat", "hh", max_length=100)) == 1


def test_dpo_cuts_a_prompt_too_long_alone_at_its_start_and_counts_what_trl_still_cuts(tokenizer):
    question = " ".join(f"detail{i}" for i in range(300)) + " So, which fruit?"
    ranking = ranking_of({"prompt": question, "chosen": "Apple.", "rejected": "A stone."}, "pairs: row 1")
    (pair,), cut = fit_dpo_pairs(ranking, tokenizer, "chat", 64)
    assert cut["prompt_tokens_cut"] > 200 and cut["answers_cut"] == 0
    assert pair["prompt"].endswith("So, which fruit?<|im_end|>\n<|im_start|>assistant\n")
    for answer in (pair["chosen"], pair["rejected"]):  # nothing is left for TRL to cut
        assert len(tokenizer(pair["prompt"] + answer, add_special_tokens=False)["input_ids"]) <= 64
    long_answer = " ".join(f"word{i}" for i in range(200))
    ranking = ranking_of({"prompt": question, "chosen": long_answer, "rejected": "No."}, "pairs: row 2")
    (pair,), cut = fit_dpo_pairs(ranking, tokenizer, "chat", 64)
    assert cut["prompt_tokens_cut"] > 0 and cut["answers_cut"] == 1  # TRL cuts the long answer's end: counted
    assert len(tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]) <= 32  # half of max_length


def test_dpo_preparation_records_its_cuts(tokenizer, data_cache, tmp_path):
    rows = [{"chosen": hh_transcript(OLD + [("Name a fruit", "Apple.")]),
             "rejected": hh_transcript(OLD + [("Name a fruit", "No.")])}, differing_only_early(),
            {"chosen": hh_transcript([("Name a fruit", "Apple.")]),
             "rejected": hh_transcript([("Name a fruit", "No.")])}]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepared = prepare_rankings(str(tmp_path / "hh.jsonl"), "train", tokenizer, "chat", "dpo", max_length=100,
                                max_skipped_fraction=0.5)
    assert [r["row"] for r in prepared.skips.records] == [2]
    assert prepared.truncation(prepared.examples) == {"truncated": 1, "turns_dropped": 1, "prompt_cut": 0,
                                                      "answer_cut": 0}
    assert len(prepared.dpo_dataset(prepared.examples)) == 2


def test_no_row_of_the_real_hh_sample_is_dropped_for_length(tokenizer, data_cache, tmp_path):
    """400 rows of the shipped HH sample at max_length 128: every row is kept but the malformed ones, which stay
    recorded skips, and the cuts are counted."""
    lines = gzip.open(REPO / "data" / "hh_rlhf_harmless_sample.jsonl.gz", "rt").read().splitlines()[:400]
    (tmp_path / "hh.jsonl").write_text("\n".join(lines) + "\n")
    prepared = prepare_rankings(str(tmp_path / "hh.jsonl"), "train", tokenizer, "chat", "reward", max_length=128,
                                overlong="truncate")
    assert all("max_length" not in record["reason"] for record in prepared.skips.records)
    assert len(prepared.examples) + len(prepared.skips.records) == len(lines)
    assert prepared.usable(prepared.examples) == prepared.examples
    counts = prepared.truncation(prepared.examples)
    assert counts["truncated"] > 0.2 * len(lines) and counts["turns_dropped"] > 0, counts
    pairs = prepared.reward_pairs(prepared.examples).to_list()
    assert len(pairs) == len(prepared.examples)
    assert all(len(p["chosen_ids"]) <= 128 and len(p["rejected_ids"]) <= 128 for p in pairs)

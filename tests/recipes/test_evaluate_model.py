"""recipes/evaluate_model.py on tiny models: RM accuracy and margin against scores computed independently, a policy
against itself wins 50% within its interval, adapter and merged model measure the same, and the outputs."""

import json
import math

import pytest
import torch
from evaluate_model import EvaluationConfig, main

from chatgpt_recipes.data.rows import split_train_eval
from chatgpt_recipes.modeling.loading import ensure_pad_token, load_tokenizer

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

PREFERENCES = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
                "rejected": f"I think it might be {2 * i + 1}, or perhaps something else."} for i in range(10)]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_llama_dir) -> str:
    """A random 2-layer LLaMA with a one-output score head, saved the way recipes/reward_model.py saves one
    (pad token set, a centering offset in config.json)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = load_tokenizer(tiny_llama_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1)
    ensure_pad_token(tokenizer, model)
    model.config.reward_offset = 0.25
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def independent_score(model, tokenizer, prompt: str, answer: str) -> float:
    """One unpadded sequence, prompt (Alpaca format: verbatim text) + answer + EOS, scored at its last token."""
    ids = tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids + [tokenizer.eos_token_id]])).logits[0, 0].item()


def run(tmp_path, **overrides) -> dict:
    settings = dict(output_dir=str(tmp_path / "eval"), eval_split_size=8, num_prompts=8, max_new_tokens=8,
                    batch_size=8, preference_dataset=None, max_length=256)
    return main(EvaluationConfig(**{"dtype": "float32", **settings, **overrides}))  # fp32: compared with fp32 scores


def test_reward_model_accuracy_and_margin_match_independent_scores(tmp_path, tiny_llama_dir, tiny_reward_model):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFERENCES))
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps([{**row, "chosen": row["rejected"], "rejected": row["chosen"]}
                                   for row in PREFERENCES]))
    common = dict(models=[f"tiny={tiny_llama_dir}"], reward_model=tiny_reward_model, preference_eval_split_size=6,
                  num_prompts=2)
    result = run(tmp_path, preference_dataset=str(data), **common)["reward_model_accuracy"]
    mirrored = run(tmp_path / "swapped", preference_dataset=str(swapped), **common)["reward_model_accuracy"]

    tokenizer = load_tokenizer(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    _, held_out = split_train_eval(PREFERENCES, 6, 42)
    margins = [independent_score(model, tokenizer, r["prompt"], r["chosen"])
               - independent_score(model, tokenizer, r["prompt"], r["rejected"]) for r in held_out]
    assert result["pairs"] == 6
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)
    assert result["margin_mean"] == pytest.approx(sum(margins) / 6, abs=1e-4)  # the offset cancels in a margin
    assert mirrored["accuracy"] == pytest.approx(1 - result["accuracy"])
    assert mirrored["margin_mean"] == pytest.approx(-result["margin_mean"], abs=1e-4)


def test_policy_against_itself_wins_half_within_its_interval(tmp_path, tiny_llama_dir, tiny_reward_model):
    sampled = run(tmp_path, models=[f"a={tiny_llama_dir}", f"b={tiny_llama_dir}"], reward_model=tiny_reward_model)
    duel = sampled["win_rates"]["b vs a"]
    assert duel["n"] == 8 and duel["ties"] < 8  # different sampling seeds: real, different answers
    assert duel["ci_low"] <= 0.5 <= duel["ci_high"]
    assert sampled["models"]["a"]["perplexity"] == pytest.approx(sampled["models"]["b"]["perplexity"])

    greedy = run(tmp_path / "greedy", models=[f"a={tiny_llama_dir}", f"b={tiny_llama_dir}"],
                 reward_model=tiny_reward_model, temperature=0.0)["win_rates"]["b vs a"]
    assert (greedy["win_rate"], greedy["ties"]) == (0.5, 8)  # identical answers: every prompt a tie

    out = tmp_path / "eval"
    for name in ("report.md", "model_comparison.png", "win_rates.png", "samples.md", "samples.jsonl",
                 "eval_results.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "reference", "a", "b"} <= set(rows[0])
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["win_rates"]["b vs a"] == duel and "_evaluate_version" in saved
    assert "b vs a" in (out / "report.md").read_text()


def test_adapter_and_merged_model_have_the_same_perplexity(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(tiny_llama_dir).save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    load_tokenizer(tiny_llama_dir).save_pretrained(tmp_path / "merged")

    models = run(tmp_path, models=[f"base={tiny_llama_dir}", f"adapter={tmp_path / 'adapter'}",
                                   f"merged={tmp_path / 'merged'}"], num_prompts=1)["models"]
    assert models["adapter"]["perplexity"] == pytest.approx(models["merged"]["perplexity"], rel=1e-4)
    assert models["adapter"]["perplexity"] != pytest.approx(models["base"]["perplexity"], rel=1e-4)
    assert math.isfinite(models["base"]["perplexity"]) and models["base"]["scored_tokens"] > 100


def test_reference_logprobs_are_each_answers_log_likelihood_and_none_where_too_long(tmp_path, tiny_llama_dir):
    """eval_results.json's `reference_logprobs` (the race's reference-likelihood column): per answered prompt,
    log p(reference answer | prompt) under the model, as answer_logprobs computes it on its own; None exactly for the
    examples over max_length."""
    from chatgpt_recipes.data.sft import sft_split, tokenize_example
    from chatgpt_recipes.evaluation.metrics import answer_logprobs
    from chatgpt_recipes.modeling.loading import load_for_inference

    results = run(tmp_path, models=[f"tiny={tiny_llama_dir}"], eval_split_size=12, num_prompts=12, max_length=160)
    recorded = results["reference_logprobs"]["tiny"]
    config = EvaluationConfig()  # the defaults run() left: the data file, its split and seed
    tokenizer, model = load_for_inference(tiny_llama_dir)
    _, held_out = sft_split(config.dataset_name, config.dataset_split, 12, config.seed)  # no record: SFT's split
    tokenized = [tokenize_example(example, tokenizer) for _, example in held_out]
    starts = [next(i for i, label in enumerate(t["labels"]) if label != -100) for t in tokenized]
    recomputed = answer_logprobs(model, [t["input_ids"][:s] for t, s in zip(tokenized, starts)],
                                 [t["input_ids"][s:] for t, s in zip(tokenized, starts)], tokenizer.pad_token_id)
    scored = [i for i, value in enumerate(recorded) if value is not None]
    too_long = [i for i, t in enumerate(tokenized) if len(t["input_ids"]) > 160]
    assert scored and too_long and sorted(set(range(len(tokenized))) - set(scored)) == too_long
    assert [recorded[i] for i in scored] == pytest.approx([recomputed[i] for i in scored], rel=1e-3)


def test_judge_model_scores_every_models_answers_and_its_held_out_accuracy(tmp_path, tiny_llama_dir,
                                                                           tiny_reward_model):
    """`--judge_model PATH`: a second reward model scores each model's answers (judge_scores, the race's judge) and
    its accuracy is measured on the held-out rows of its own preference data; recomputed here from the model."""
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFERENCES))
    results = run(tmp_path, models=[f"a={tiny_llama_dir}", f"b={tiny_llama_dir}"], judge_model=tiny_reward_model,
                  judge_preference_dataset=str(data), judge_preference_eval_split_size=6, num_prompts=4,
                  kl_reference="a")
    tokenizer = load_tokenizer(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    _, held_out = split_train_eval(PREFERENCES, 6, 42)
    margins = [independent_score(model, tokenizer, r["prompt"], r["chosen"])
               - independent_score(model, tokenizer, r["prompt"], r["rejected"]) for r in held_out]
    assert results["judge_accuracy"]["pairs"] == 6
    assert results["judge_accuracy"]["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    for name in ("a", "b"):
        expected = [independent_score(model, tokenizer, row["prompt"], row[name]) - 0.25 for row in samples]  # offset
        assert results["judge_scores"][name] == pytest.approx(expected, abs=1e-4)
    assert results["judge_win_rates"]["b vs a"]["n"] == 4 and results["judge_model"] == tiny_reward_model
    assert "reward_scores" not in results  # no reward model given: the judge alone
    # the same weights sampled with another seed: the per-token k3 KL of identical distributions is exactly 0
    assert results["models"]["b"]["kl_to_reference"] == 0.0

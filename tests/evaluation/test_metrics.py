"""chatgpt_recipes.evaluation.metrics: every metric against a value computed independently or by hand."""

import math

import pytest
import torch

from chatgpt_recipes.data.sft import sft_rows, tokenize_example
from chatgpt_recipes.evaluation.metrics import (dataset_perplexity, distinct_n, pairwise_accuracy,
                                                recorded_pairwise_accuracy, reward_scores, sample_answers,
                                                token_entropies, wilson_interval, win_rate)
from chatgpt_recipes.modeling.loading import load_for_inference

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour of the sky."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
          {"instruction": "Say hello in French.", "input": "", "output": "Bonjour !"}]


def test_perplexity_is_exp_of_mean_response_token_loss(tiny_llama_dir):
    tokenizer, model = load_for_inference(tiny_llama_dir)
    examples, _ = sft_rows(ALPACA, "inline")
    tokenized = [tokenize_example(e, tokenizer) for e in examples]
    result = dataset_perplexity(model, tokenized, batch_size=2)  # batches of unequal lengths: padding must not count

    # Independently: the model's own loss (mean over scored tokens) of each example alone, weighted by its count
    total, count = 0.0, 0
    for item in tokenized:
        labels = torch.tensor([item["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([item["input_ids"]]), labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        total, count = total + loss * scored, count + scored
    assert result["scored_tokens"] == count
    assert count == sum(len(tokenizer(e["output"], add_special_tokens=False)["input_ids"]) + 1 for e in ALPACA)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_pairwise_accuracy_and_margin_on_known_scores():
    result = pairwise_accuracy([2.0, 1.0, 0.5, 3.0], [1.0, 2.0, 0.5, 0.0])
    assert result["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    assert result["margin_mean"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert result["pairs"] == 4 and result["correct"] == 2.5
    with pytest.raises(ValueError, match="equally many"):
        pairwise_accuracy([1.0], [1.0, 2.0])


def test_a_reward_models_recorded_evaluation_is_read_only_for_the_data_it_held_out():
    info = {"eval_dataset": "data/prefs.json", "eval_correct": 81, "eval_pairs": 263, "eval_margin": 0.4,
            "eval_margin_std": 1.5, "eval_accuracy": 81 / 263}
    recorded = recorded_pairwise_accuracy(info, "data/prefs.json")
    assert recorded["accuracy"] == pytest.approx(81 / 263) and recorded["pairs"] == 263
    assert (recorded["ci_low"], recorded["ci_high"]) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # Newcombe's
    assert (recorded["margin_mean"], recorded["margin_std"]) == (0.4, 1.5)
    assert recorded_pairwise_accuracy(info, "data/other.json") is None  # other data: scored, not read
    assert recorded_pairwise_accuracy(info, None) is None
    assert recorded_pairwise_accuracy({**info, "eval_correct": None}, "data/prefs.json") is None  # an older record


def test_reward_scores_read_at_the_last_real_token(tiny_llama_dir):
    """Batched (by length), right-padded scores equal each sequence scored alone, in the sequences' order: the pad
    token is never read."""
    from transformers import AutoModelForSequenceClassification

    from chatgpt_recipes.modeling.loading import load_tokenizer
    tokenizer = load_tokenizer(tiny_llama_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    sequences = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
                 for t in ["short", "a somewhat longer answer here", "mid length text"]]
    batched = reward_scores(model, sequences, tokenizer.pad_token_id, batch_size=2)
    alone = [reward_scores(model, [s], tokenizer.pad_token_id)[0] for s in sequences]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3


def test_answer_logprobs_in_length_batches_keep_the_answers_order(tiny_llama_dir):
    from chatgpt_recipes.evaluation.metrics import answer_logprobs

    tokenizer, model = load_for_inference(tiny_llama_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ["Hi", "A much longer prompt than the others", "Mid prompt"]]
    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["yes", "no", "a longer answer"]] + [[]]
    prompts.append(prompts[0])
    batched = answer_logprobs(model, prompts, answers, tokenizer.pad_token_id, batch_size=2)
    alone = [answer_logprobs(model, [p], [a], tokenizer.pad_token_id)[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert batched[3] == 0.0 and len(set(round(v, 4) for v in batched[:3])) == 3


def test_wilson_interval_matches_scipy_and_win_rate_counts_ties_half():
    # Published values: Newcombe (1998), Stat. Med. 17:857, Table I (81/263, 15/148); 0/10 has upper z^2/(n+z^2)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)

    result = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 0.0])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert result["ci_low"] < 0.625 < result["ci_high"]
    identical = win_rate([0.3, -1.0, 2.0], [0.3, -1.0, 2.0])
    assert identical["win_rate"] == 0.5 and identical["ties"] == 3


def test_distinct_n_by_hand():
    texts = ["the cat sat", "The cat ran"]
    # unigrams: the, cat, sat, the, cat, ran -> 4 distinct of 6; bigrams: the-cat x2, cat-sat, cat-ran -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["word"], 2) == 0.0  # no bigram at all


def test_token_entropy_of_hand_made_distributions():
    vocab = 8
    uniform = torch.zeros(1, 1, vocab)  # entropy log(8)
    one_hot = torch.full((1, 1, vocab), float("-inf"))
    one_hot[0, 0, 3] = 0.0  # entropy 0
    two_way = torch.full((1, 1, vocab), float("-inf"))
    two_way[0, 0, :2] = 0.0  # entropy log(2)
    logits = torch.cat([uniform, one_hot, two_way, uniform], dim=1)  # the last position is masked out
    total, count = token_entropies(logits, torch.tensor([[True, True, True, False]]))
    assert count == 3
    assert total == pytest.approx(math.log(8) + 0 + math.log(2))
    # temperature sharpens: logits (0, log 3) at T=1 give probabilities 1/4, 3/4
    pair = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_entropies(pair, torch.ones(1, 1))[0] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert token_entropies(pair, torch.ones(1, 1), temperature=1e-3)[0] == pytest.approx(0.0, abs=1e-6)


def test_sampled_answers_stop_at_eos_and_entropy_counts_answer_tokens(tiny_llama_dir):
    tokenizer, model = load_for_inference(tiny_llama_dir)
    prompts = ["Hello there", "A longer prompt to pad the batch"]
    greedy = sample_answers(model, tokenizer, prompts, [tokenizer.eos_token_id], max_new_tokens=6, temperature=0,
                            seed=0, batch_size=2)
    again = sample_answers(model, tokenizer, prompts, [tokenizer.eos_token_id], max_new_tokens=6, temperature=0,
                           seed=1, batch_size=1)
    assert greedy["answers"] == again["answers"]  # left padding does not change a greedy answer
    assert all(len(ids) <= 6 and tokenizer.eos_token_id not in ids for ids in greedy["answer_ids"])
    assert 0 < greedy["token_entropy"] <= math.log(len(tokenizer)) + 1e-4


def test_k3_kl_is_never_negative_and_averages_to_the_exact_kl():
    """Tokens drawn from p, scored by p and q: per answer, k1 (the summed log-ratio) goes negative on many answers
    while k3 never does, and k3's mean over answers matches the exact KL(p || q) per token times the answer length."""
    from chatgpt_recipes.evaluation.metrics import k3_kl

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p / q).log()).sum().item()
    answers = torch.multinomial(p, 4000 * 5, replacement=True).view(4000, 5)
    k3 = [k3_kl(p.log()[a].tolist(), q.log()[a].tolist()) for a in answers]
    k1 = [(p.log()[a] - q.log()[a]).sum().item() for a in answers]
    assert min(k3) >= 0.0 and sum(value < 0 for value in k1) > 100
    spread = torch.tensor(k3).std().item() / len(k3) ** 0.5
    assert abs(sum(k3) / len(k3) - 5 * exact) < 4 * spread
    assert k3_kl([-1.0, -2.0], [-1.0, -2.0]) == 0.0
    with pytest.raises(ValueError, match="one log-probability per answer token"):
        k3_kl([-1.0], [-1.0, -2.0])

"""Evaluation metrics: perplexity from token losses, reward-model pairwise accuracy and margin, RM-judged
win-rate with a Wilson interval, distinct-n of texts and per-token entropy of a policy.

Why these are written here and not loaded with `evaluate.load(...)`: every `evaluate` metric is a script hosted
on the Hugging Face Hub, so none loads offline (checked with evaluate 0.4.6 and HF_HUB_OFFLINE=1: `perplexity`
and `accuracy` both raise FileNotFoundError). Besides, its `perplexity` metric loads a hub model id itself and
scores whole texts (no prompt masking, no adapter or in-memory model, and it averages per-text perplexities
rather than exp of the mean token loss); distinct-n, win-rate intervals and RM pairwise
accuracy are not among its metrics. The results file is written with `evaluate.save` (see evaluate_model.py).
"""

import math

import torch
import torch.nn.functional as F

from chatgpt_recipes.runtime.output import say

# Perplexity ---------------------------------------------------------------------------------------------------

def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each row of a batch; labels are -100 where a token is not scored
    (prompt, padding), exactly as the trainers mask them."""
    shift_labels = labels[:, 1:]
    scored = shift_labels != -100  # only these rows of the (large) logits are softmaxed
    losses = F.cross_entropy(logits[:, :-1][scored].float(), shift_labels[scored], reduction="none")
    return torch.zeros(labels.shape[0], device=losses.device).index_add_(0, scored.nonzero()[:, 0], losses)


def perplexity(total_loss: float, token_count: int) -> float:
    """exp of the mean loss per scored token, over the whole set (not a mean of per-text perplexities)."""
    if token_count <= 0:
        raise ValueError("perplexity of zero tokens: every token was masked")
    return math.exp(total_loss / token_count)


# Reward model -------------------------------------------------------------------------------------------------

def pairwise_accuracy(chosen_scores, rejected_scores) -> dict:
    """Fraction of pairs the reward model ranks as the labels do (a tie counts half) with its 95% Wilson interval,
    and the mean and standard deviation of the margin score(chosen) - score(rejected)."""
    chosen = torch.as_tensor(chosen_scores, dtype=torch.float64)
    rejected = torch.as_tensor(rejected_scores, dtype=torch.float64)
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"need equally many chosen and rejected scores (got {chosen.numel()} and {rejected.numel()})")
    margin = chosen - rejected
    correct = (margin > 0).double() + 0.5 * (margin == 0).double()
    low, high = wilson_interval(correct.sum().item(), chosen.numel())
    return {"accuracy": correct.mean().item(), "ci_low": low, "ci_high": high, "margin_mean": margin.mean().item(),
            "margin_std": margin.std().item() if margin.numel() > 1 else 0.0, "pairs": chosen.numel(),
            "correct": correct.sum().item()}


def recorded_pairwise_accuracy(stage_info: dict, preference_dataset: str | None) -> dict | None:
    """pairwise_accuracy's figures as a reward model's stage_info.json recorded its final evaluation, when that
    evaluation was on the held-out pairs of `preference_dataset`; None when it was not (or the record predates
    `eval_correct`), and the pairs must be scored."""
    if (preference_dataset is None or stage_info.get("eval_dataset") != preference_dataset
            or stage_info.get("eval_correct") is None or not stage_info.get("eval_pairs")):
        return None
    correct, pairs = stage_info["eval_correct"], stage_info["eval_pairs"]
    low, high = wilson_interval(correct, pairs)
    return {"accuracy": correct / pairs, "ci_low": low, "ci_high": high, "margin_mean": stage_info["eval_margin"],
            "margin_std": stage_info.get("eval_margin_std", 0.0), "pairs": pairs, "correct": correct}


def wilson_interval(successes: float, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z=1.96). Written out because scipy's binomtest needs
    an integer count and a tie is counted as half a win."""
    if total <= 0:
        raise ValueError("a confidence interval needs at least one comparison")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def win_rate(scores_a, scores_b, z: float = 1.959964) -> dict:
    """How often a reward model prefers policy A's answer to policy B's on the same prompts: wins, ties (half
    a win each), losses, the win-rate and its Wilson interval."""
    a = torch.as_tensor(scores_a, dtype=torch.float64)
    b = torch.as_tensor(scores_b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need one score per prompt from both policies (got {a.numel()} and {b.numel()})")
    wins, ties = int((a > b).sum()), int((a == b).sum())
    rate = (wins + 0.5 * ties) / a.numel()
    low, high = wilson_interval(wins + 0.5 * ties, a.numel(), z)
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "wins": wins, "ties": ties,
            "losses": a.numel() - wins - ties, "n": a.numel()}


# Diversity ----------------------------------------------------------------------------------------------------

def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams, over all texts together. Words are
    lower-cased whitespace tokens, so models with different tokenizers are measured alike."""
    grams = [gram for text in texts for gram in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def token_entropies(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> tuple[float, int]:
    """Summed entropy (nats) of the policy's next-token distributions softmax(logits / temperature) at the
    positions where mask is true, and their count: the distribution each sampled token was drawn from.
    TRL's PPO logs the same quantity (objective/entropy) during training."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # 0 * log 0 = 0 for masked-out (-inf) logits
    mask = mask.bool()
    return entropy[mask].sum().item(), int(mask.sum())


# Measuring models: the loops that feed the metrics above --------------------------------------------------------

def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _batches_by_length(lengths: list[int], size: int):
    """Indices into the items in batches of similar length (longest first), so that a padded batch wastes little
    compute on padding; callers put results back in the items' order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return list(_batches(order, size))


def _pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s))
                         for s in sequences])


@torch.no_grad()
def dataset_perplexity(model, examples: list[dict], batch_size: int = 8, progress: str = "") -> dict:
    """Perplexity of a causal LM on tokenised examples {input_ids, labels} (labels -100 where not scored, e.g.
    from chatgpt_recipes.data.sft.tokenize_example, so exactly the tokens SFT trains on are measured), and each
    example's summed loss, -log p(its scored tokens), in the examples' order."""
    example_losses = [0.0] * len(examples)
    batches = _batches_by_length([len(e["input_ids"]) for e in examples], batch_size)
    for number, indices in enumerate(batches, start=1):
        batch = [examples[i] for i in indices]
        input_ids = _pad([e["input_ids"] for e in batch], 0).to(model.device)
        labels = _pad([e["labels"] for e in batch], -100).to(model.device)
        attention_mask = _pad([[1] * len(e["input_ids"]) for e in batch], 0).to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for index, loss in zip(indices, token_loss_sums(logits, labels).tolist()):
            example_losses[index] = loss
        if progress:
            say(f"[{progress}] perplexity batch {number}/{len(batches)}", flush=True)
    total_loss = sum(example_losses)
    total_tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    return {"perplexity": perplexity(total_loss, total_tokens), "mean_token_loss": total_loss / total_tokens,
            "scored_tokens": total_tokens, "example_losses": example_losses}


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int = 8, progress: str = "") -> dict:
    """One answer per prompt (sampled at `temperature`, greedy at 0), with the mean entropy of the
    distributions the answer tokens were drawn from (up to and including the stop token)."""
    torch.manual_seed(seed)
    answers, answer_ids, all_prompt_ids, entropy_sum, entropy_count = [], [], [], 0.0, 0
    for number, batch in enumerate(_batches(prompts, batch_size), start=1):
        has_bos = tokenizer.bos_token is not None and batch[0].startswith(tokenizer.bos_token)
        prompt_ids = [tokenizer(p, add_special_tokens=not has_bos)["input_ids"] for p in batch]
        all_prompt_ids += prompt_ids
        input_ids = _pad(prompt_ids, tokenizer.pad_token_id, left=True).to(model.device)
        attention_mask = _pad([[1] * len(p) for p in prompt_ids], 0, left=True).to(model.device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=None,
            top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
            return_dict_in_generate=True, output_logits=True)
        generated = output.sequences[:, input_ids.shape[1]:].cpu()
        is_stop = torch.isin(generated, torch.tensor(stop_ids))
        # a token belongs to the answer until the first stop token, which is included
        in_answer = (is_stop.long().cumsum(1) - is_stop.long()) == 0
        logits = torch.stack(output.logits, dim=1).cpu()
        total, count = token_entropies(logits, in_answer, temperature if temperature > 0 else 1.0)
        entropy_sum, entropy_count = entropy_sum + total, entropy_count + count
        for row, mask in zip(generated, in_answer):
            ids = row[mask].tolist()
            answer_ids.append([i for i in ids if i not in stop_ids])
            answers.append(tokenizer.decode(answer_ids[-1], skip_special_tokens=True).strip())
        if progress:
            say(f"[{progress}] sampled {min(number * batch_size, len(prompts))}/{len(prompts)} answers", flush=True)
    return {"answers": answers, "answer_ids": answer_ids, "prompt_ids": all_prompt_ids,
            "token_entropy": entropy_sum / max(entropy_count, 1)}


@torch.no_grad()
def answer_token_logprobs(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_token_id: int,
                          temperature: float = 1.0, batch_size: int = 8) -> list[list[float]]:
    """log p(token | prompt, earlier answer tokens) under `model` at `temperature` of each answer token, each
    sequence right-padded; an empty answer has none."""
    logprobs_of = [[] for _ in prompt_ids]
    for indices in _batches_by_length([len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)], batch_size):
        batch = [(prompt_ids[i], answer_ids[i]) for i in indices]
        sequences = [p + a for p, a in batch]
        input_ids = _pad(sequences, pad_token_id).to(model.device)
        attention_mask = _pad([[1] * len(s) for s in sequences], 0).to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logprobs = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
        for row, (index, (prompt, answer)) in enumerate(zip(indices, batch)):
            if answer:
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=logits.device)
                targets = torch.tensor(answer, device=logits.device)
                logprobs_of[index] = logprobs[row, positions, targets].tolist()
    return logprobs_of


def answer_logprobs(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_token_id: int,
                    temperature: float = 1.0, batch_size: int = 8) -> list[float]:
    """log p(answer | prompt) under `model` at `temperature`: the sum over the answer's tokens."""
    return [sum(tokens) for tokens in answer_token_logprobs(model, prompt_ids, answer_ids, pad_token_id, temperature,
                                                            batch_size)]


def k3_kl(own_logprobs: list[float], reference_logprobs: list[float]) -> float:
    """KL(policy || reference) of one answer sampled from the policy, estimated per token with Schulman's k3,
    (r - 1) - log r with r = p_ref / p_policy, summed over the answer's tokens. Each term is >= 0 (log r <= r - 1),
    so unlike k1 (log p - log p_ref, whose mean over few answers can go negative) the estimate never reads as
    negative; it is unbiased for the KL of each token's distribution given the tokens before it."""
    if len(own_logprobs) != len(reference_logprobs):
        raise ValueError(f"one log-probability per answer token from both models (got {len(own_logprobs)} and "
                         f"{len(reference_logprobs)})")
    log_ratios = torch.tensor(reference_logprobs, dtype=torch.float64) - torch.tensor(own_logprobs, dtype=torch.float64)
    return (torch.expm1(log_ratios) - log_ratios).sum().item()


@torch.no_grad()
def reward_scores(reward_model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> list[float]:
    """The reward model's scalar score of each token sequence (right-padded; transformers reads the score at
    the last non-pad token, which is why the pad token must differ from EOS)."""
    scores = [0.0] * len(sequences)
    for indices in _batches_by_length([len(s) for s in sequences], batch_size):
        batch = [sequences[i] for i in indices]
        input_ids = _pad(batch, pad_token_id).to(reward_model.device)
        attention_mask = _pad([[1] * len(s) for s in batch], 0).to(reward_model.device)
        logits = reward_model(input_ids=input_ids, attention_mask=attention_mask).logits
        for index, score in zip(indices, logits[:, 0].float().tolist()):
            scores[index] = score
    return scores

"""Each optimiser optimises: a reward model trained for real learns a preference, and PPO, RLOO and DPO move a
policy towards it; the KL penalty holds PPO's policy near its reference.

The task (tests/conftest.py): answers are 3-4 words from a small set, and answers that contain the marker word
"apple" are preferred. The starting policy (a 2-layer LLaMA taught that answer distribution) puts the marker in
about 30% of its answers. The reward model is recipes/reward_model.py trained on pairs of the same answer with and
without the marker. Every measurement is made here, not read from the recipes' logs: the marker rate of 256
sampled answers (8 to each of 32 held-out prompts that no stage trained on, temperature 1, seed 0) of the saved
model, against the starting policy's measured the same way. The recipes run with seed 42;
OPTIMISATION_SEED=<seed> runs them with another, GRPO's too (the bounds below were checked on 42, 1 and 2).

The recipes run in this process (their `main`, parsed as the command line would be), with full fine-tuning:
LoRA on a width-64 model learns the task too, but more slowly and less reliably at the same step count.
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import MARKER, MARKER_WORDS, marker_rate

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.modeling.loading import ModelArguments

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

# The marker rate must rise by at least this much over the starting policy's. The standard error of the difference
# of two rates measured on 256 answers each is at most sqrt(2 x 0.25 / 256) = 0.044, so 0.2 is over 4.5 standard
# errors: a policy that did not move passes by chance with probability below 1e-5. Observed gains (seeds 42, 1, 2)
# from a start of 0.31: PPO +0.47, +0.66, +0.32; RLOO +0.60, +0.55, +0.47; DPO +0.67, +0.61, +0.65.
MIN_MARKER_GAIN = 0.2
# PPO with kl_coef 3 must end at most half as far (KL to the reference, nats per answer) from the reference as the
# same run with kl_coef 0.01. Observed (seeds 42, 1, 2): 0.57 / 4.9, 0.77 / 5.4, 0.61 / 12.4 nats (ratios 0.12,
# 0.14, 0.05).
MAX_KL_RATIO = 0.5
SMALL_KL_COEF, LARGE_KL_COEF = 0.01, 3.0
SEED = int(os.environ.get("OPTIMISATION_SEED", 42))


@pytest.fixture(scope="module")
def start_rate(marker_policy_dir, marker_task):
    return marker_rate(marker_policy_dir, marker_task["held_out"])["marker_rate"]


def _run(module_name: str, config_class: str, default_yaml: str, args: list[str]) -> None:
    import importlib

    module = importlib.import_module(module_name)
    module.main(*parse_config((getattr(module, config_class), ModelArguments), default_yaml, [str(a) for a in args]))


def _common(policy, output_dir, seed=0):
    return ["--model_name_or_path", policy, "--output_dir", output_dir, "--use_peft", "false", "--dtype", "float32",
            "--bf16", "false", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--disable_tqdm", "true", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--seed", seed]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, marker_policy_dir, marker_reward_model_dir, marker_task):
    """Output dir of a PPO run with the given kl_coef (made on first use): 12 updates of 8 episodes, 4 PPO epochs,
    full fine-tuning at learning rate 1e-3, answers of at most 6 tokens sampled at temperature 1."""
    runs = {}

    def get(kl_coef):
        if kl_coef not in runs:
            out = tmp_path_factory.mktemp(f"ppo-kl-{kl_coef}")
            _run("ppo", "PPORecipeConfig", "ppo/smollm2_alpaca_lora.yaml", [
                *_common(marker_policy_dir, out, seed=SEED), "--reward_model_path", marker_reward_model_dir,
                "--dataset_name", marker_task["prompts"], "--eval_prompts", "4", "--response_length", "6",
                "--temperature", "1.0", "--per_device_train_batch_size", "8",
                "--local_rollout_forward_batch_size", "8", "--total_episodes", "96", "--num_ppo_epochs", "4",
                "--learning_rate", "1e-3", "--kl_coef", kl_coef, "--num_sample_generations", "0",
                "--sample_every", "0"])
            runs[kl_coef] = out
        return runs[kl_coef]

    return get


def test_reward_model_learns_the_marker_preference(marker_reward_model_dir, marker_task):
    """Held-out pairs (the recipe's 40) are ranked right (>= 0.9; observed 1.0), and so are answers it never saw
    as a pair: fresh 3-4 word answers with the marker against fresh ones without, to held-out prompts, every
    combination (>= 0.9; chance is 0.5)."""
    from chatgpt_recipes.data.preferences import encode_response
    from chatgpt_recipes.data.templates import encode_prompt, render_prompt
    from chatgpt_recipes.evaluation.metrics import reward_scores
    from chatgpt_recipes.modeling.loading import load_tokenizer
    from chatgpt_recipes.training.reward import load_reward_model

    info = json.loads((Path(marker_reward_model_dir) / "stage_info.json").read_text())
    assert info["eval_accuracy"] >= 0.9, info
    tokenizer, model = load_tokenizer(marker_reward_model_dir), load_reward_model(marker_reward_model_dir)
    rng = random.Random(1)

    def sequences(with_marker):
        answers = []
        for prompt in marker_task["held_out"]:
            words = [rng.choice(MARKER_WORDS) for _ in range(rng.randint(3, 4))]
            if with_marker:
                words[rng.randrange(len(words))] = MARKER
            answers.append(encode_prompt(render_prompt(prompt, tokenizer, "alpaca"), tokenizer, "alpaca")
                           + encode_response(" ".join(words), tokenizer, "alpaca"))
        return answers

    with torch.no_grad():
        marked = reward_scores(model, sequences(True), tokenizer.pad_token_id, 16)
        other = reward_scores(model, sequences(False), tokenizer.pad_token_id, 16)
    ranked_right = sum(a > b for a in marked for b in other) / (len(marked) * len(other))
    print(f"RM held-out pair accuracy {info['eval_accuracy']:.3f}, unpaired answers ranked right {ranked_right:.3f}")
    assert ranked_right >= 0.9, ranked_right


def test_ppo_raises_the_marker_rate(ppo_run, start_rate, marker_task):
    out = ppo_run(SMALL_KL_COEF)
    after = marker_rate(str(out), marker_task["held_out"])["marker_rate"]
    print(f"PPO marker rate {start_rate:.3f} -> {after:.3f}")
    assert after >= start_rate + MIN_MARKER_GAIN, (start_rate, after)
    results = json.loads((out / "ppo_results.json").read_text())
    assert results["updates"] == 12 and results["reference_max_logit_change"] == 0.0


def test_rloo_raises_the_marker_rate(tmp_path, marker_policy_dir, marker_reward_model_dir, marker_task, start_rate):
    """24 steps of 16 answers (4 prompts x 4 samples), full fine-tuning at learning rate 1e-3, beta 0.01."""
    _run("rloo", "RLOORecipeConfig", "rloo/smollm2_alpaca_lora.yaml", [
        *_common(marker_policy_dir, tmp_path, seed=SEED), "--reward_model_path", marker_reward_model_dir,
        "--dataset_name", marker_task["prompts"], "--eval_prompts", "4", "--max_completion_length", "6",
        "--temperature", "1.0", "--per_device_train_batch_size", "16", "--num_generations", "4",
        "--max_steps", "24", "--learning_rate", "1e-3", "--beta", "0.01"])
    after = marker_rate(str(tmp_path), marker_task["held_out"])["marker_rate"]
    print(f"RLOO marker rate {start_rate:.3f} -> {after:.3f}")
    assert after >= start_rate + MIN_MARKER_GAIN, (start_rate, after)


def test_dpo_raises_the_marker_rate(tmp_path, marker_policy_dir, marker_task, start_rate):
    """DPO on the reward model's pairs (no reward model, no sampling): 25 steps of 8 pairs, learning rate 1e-3,
    beta 0.1; its implicit reward must also rank the 40 held-out pairs right."""
    _run("dpo", "DPORecipeConfig", "dpo/smollm2_dpo_demo_lora.yaml", [
        *_common(marker_policy_dir, tmp_path, seed=SEED), "--dataset_name", marker_task["pairs"],
        "--eval_split_size", "40", "--max_length", "64", "--per_device_train_batch_size", "8", "--max_steps", "25",
        "--learning_rate", "1e-3", "--beta", "0.1"])
    after = marker_rate(str(tmp_path), marker_task["held_out"])["marker_rate"]
    print(f"DPO marker rate {start_rate:.3f} -> {after:.3f}")
    assert after >= start_rate + MIN_MARKER_GAIN, (start_rate, after)
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_rewards/accuracies"] >= 0.9


# GRPO's checks run on one seed, like PPO's and RLOO's (OPTIMISATION_SEED), beta 0.01 and beta 3 as PPO's kl_coef
# above. Observed with GRPO_STEPS = 12 from a start of 0.31: gains +0.27, +0.34, +0.29 (seeds 42, 1, 2); KL to the
# reference 0.57 (beta 0.01) against 0.056 (beta 3), ratio 0.10. With 24 steps: +0.55, +0.63, +0.47 and 2.54
# against 0.027.
GRPO_STEPS = 12


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, marker_policy_dir, marker_reward_model_dir, marker_task):
    """Output dir of a GRPO run with the given seed and beta (made on first use): GRPO_STEPS steps of 16 answers
    (4 prompts x a group of 4), full fine-tuning at learning rate 1e-3, answers of at most 6 tokens at
    temperature 1, TRL's default loss (dapo) and group-scaled advantages."""
    runs = {}

    def get(seed, beta):
        if (seed, beta) not in runs:
            out = tmp_path_factory.mktemp(f"grpo-{seed}-beta-{beta}")
            _run("grpo", "GRPORecipeConfig", "grpo/smollm2_alpaca_lora.yaml", [
                *_common(marker_policy_dir, out, seed=seed), "--reward_model_path", marker_reward_model_dir,
                "--dataset_name", marker_task["prompts"], "--eval_prompts", "4", "--max_completion_length", "6",
                "--temperature", "1.0", "--per_device_train_batch_size", "16", "--num_generations", "4",
                "--max_steps", GRPO_STEPS, "--learning_rate", "1e-3", "--beta", beta])
            runs[seed, beta] = out
        return runs[seed, beta]

    return get



def test_grpo_raises_the_marker_rate(grpo_run, start_rate, marker_task):
    out = grpo_run(SEED, SMALL_KL_COEF)
    after = marker_rate(str(out), marker_task["held_out"])["marker_rate"]
    print(f"GRPO (seed {SEED}) marker rate {start_rate:.3f} -> {after:.3f}")
    assert after >= start_rate + MIN_MARKER_GAIN, (start_rate, after)
    assert json.loads((out / "grpo_results.json").read_text())["steps"] == GRPO_STEPS


@torch.no_grad()
def kl_to_reference(policy_dir: str, reference_dir: str, prompts: list[str], samples: int = 8,
                    max_new_tokens: int = 6, seed: int = 0) -> float:
    """KL(policy || reference) per answer: the exact KL of the next-token distributions (full vocabulary, at
    temperature 1), summed over the tokens of answers sampled from the policy (up to EOS), averaged over answers."""
    from transformers import AutoModelForCausalLM

    from chatgpt_recipes.data.templates import encode_prompt, render_prompt
    from chatgpt_recipes.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for prompt in prompts:
        query = torch.tensor([encode_prompt(render_prompt(prompt, tokenizer, "alpaca"), tokenizer, "alpaca")])
        answers = policy.generate(input_ids=query, attention_mask=torch.ones_like(query), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                  num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)[:, query.shape[1]:]
        for answer in answers.tolist():
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            sequence = torch.tensor([query[0].tolist() + answer])
            positions = slice(query.shape[1] - 1, sequence.shape[1] - 1)  # those that predict the answer tokens
            log_p = torch.log_softmax(policy(input_ids=sequence).logits[0, positions].float(), -1)
            log_q = torch.log_softmax(reference(input_ids=sequence).logits[0, positions].float(), -1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += 1
    return total / count


def test_a_large_kl_coef_keeps_ppo_closer_to_the_reference(ppo_run, marker_policy_dir, marker_task):
    """The same PPO run (seed, prompts, hyperparameters) with kl_coef 3 and 0.01: the first must end at most
    MAX_KL_RATIO times as far from the reference (the starting policy) as the second, and the second must have
    moved (a KL of at least 0.2 nats per answer; the marker gain alone needs about 0.5)."""
    small = kl_to_reference(str(ppo_run(SMALL_KL_COEF)), marker_policy_dir, marker_task["held_out"])
    large = kl_to_reference(str(ppo_run(LARGE_KL_COEF)), marker_policy_dir, marker_task["held_out"])
    print(f"KL to the reference: kl_coef {SMALL_KL_COEF}: {small:.3f}, kl_coef {LARGE_KL_COEF}: {large:.3f}")
    assert small >= 0.2, small
    assert large <= MAX_KL_RATIO * small, (large, small)


def test_a_large_beta_keeps_grpo_closer_to_the_reference(grpo_run, marker_policy_dir, marker_task):
    """GRPO with beta 3 and 0.01 (seed 42, otherwise the same run): the first must end at most MAX_KL_RATIO times as
    far from the reference as the second, which must have moved (>= 0.2 nats per answer)."""
    small = kl_to_reference(str(grpo_run(SEED, SMALL_KL_COEF)), marker_policy_dir, marker_task["held_out"])
    large = kl_to_reference(str(grpo_run(SEED, LARGE_KL_COEF)), marker_policy_dir, marker_task["held_out"])
    print(f"GRPO KL to the reference: beta {SMALL_KL_COEF}: {small:.3f}, beta {LARGE_KL_COEF}: {large:.3f}")
    assert small >= 0.2, small
    assert large <= MAX_KL_RATIO * small, (large, small)

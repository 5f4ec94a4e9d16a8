"""recipes/grpo.py on a tiny policy and the reward model trained for real on the marker preference
(tests/conftest.py) through `accelerate launch`: its rewards (the reward model's score of the generated ids plus
rule rewards), its logged curves, and a clear error for a rule reward it does not know."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_recipe

from chatgpt_recipes.runtime.errors import ConfigError

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def test_grpo_runs_on_tiny_models_with_rule_rewards(tmp_path, marker_policy_dir, marker_reward_model_dir):
    out = tmp_path / "grpo"
    result = run_recipe("grpo.py", "--model_name_or_path", marker_policy_dir,
                        "--reward_model_path", marker_reward_model_dir, "--max_steps", "2", "--max_train_prompts", "4",
                        "--eval_prompts", "2", "--max_completion_length", "6", "--learning_rate", "1e-3",
                        "--rule_rewards", "length_penalty", "format_check", "--reward_weights", "1.0", "0.5", "0.5",
                        "--missing_eos_penalty", "1.0",
                        "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--output_dir", out)
    steps = [entry for entry in json.loads((out / "log_history.json").read_text()) if "reward" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert {"kl", "completions/mean_length", "group_reward_spread", "rewards/reward_model_score/mean",
                "rewards/length_penalty/mean", "rewards/format_check/mean"} <= set(entry)
        assert -1.0 <= entry["rewards/length_penalty/mean"] < 0.0
        # a mean of 0/1 scores over the step's 4 answers (per_device_train_batch_size in the recipe YAML)
        assert entry["rewards/format_check/mean"] * 4 == pytest.approx(round(entry["rewards/format_check/mean"] * 4))
    # sampled answers of one prompt differ and the reward model tells them apart: a group that teaches something
    assert any(entry["group_reward_spread"] > 0.01 for entry in steps)
    results = json.loads((out / "grpo_results.json").read_text())
    assert results["steps"] == 2 and results["kl_before"] == 0.0
    assert results["rule_rewards"] == ["length_penalty", "format_check"] and results["num_generations"] == 4
    assert results["missing_eos_penalty"] == 1.0
    assert (out / "rl_curves.png").is_file() and (out / "training_curves.png").is_file()
    assert "reward (centred)" in result.stdout


def test_group_spread_is_the_mean_within_group_std_of_the_weighted_total():
    from chatgpt_recipes.training.reward import logging_group_spread

    logged = []
    first = lambda completion_ids, **kwargs: [1.0, 3.0, 5.0, 5.0]  # noqa: E731
    second = lambda completion_ids, **kwargs: [0.0, 1.0, 0.0, 0.0]  # noqa: E731
    wrapped = logging_group_spread([first, second], [1.0, 2.0], num_generations=2)
    for function in wrapped:
        function(completion_ids=[[1]] * 4, log_metric=lambda name, value: logged.append((name, value)))
    totals = torch.tensor([[1.0, 5.0], [5.0, 5.0]], dtype=torch.float64)  # first + 2 x second, per group of 2
    assert logged == [("group_reward_spread", pytest.approx(totals.std(dim=1).mean().item()))]


def test_missing_eos_penalty_lowers_exactly_the_answers_cut_off(marker_policy_dir, marker_reward_model_dir):
    """RLOO's and GRPO's reward function applies PPO's missing_eos_penalty: an answer without the end-of-answer
    token loses the penalty, one that ends keeps the reward model's score."""
    from chatgpt_recipes.modeling.loading import load_tokenizer
    from chatgpt_recipes.training.reward import load_reward_model, reward_model_function

    tokenizer = load_tokenizer(marker_policy_dir)
    reward_model = load_reward_model(marker_reward_model_dir)
    words, eos = tokenizer(" red apple")["input_ids"], tokenizer.eos_token_id
    completions = dict(prompts=["Say something.", "Say something."], completions=["", ""],
                       completion_ids=[words + [eos], words])
    plain = reward_model_function(reward_model, tokenizer, "alpaca")(**completions)
    penalised = reward_model_function(reward_model, tokenizer, "alpaca", missing_eos_penalty=0.75,
                                      answer_end_id=eos)(**completions)
    assert penalised[0] == pytest.approx(plain[0]) and penalised[1] == pytest.approx(plain[1] - 0.75)


def test_rule_rewards_score_the_generated_ids(marker_policy_dir):
    from chatgpt_recipes.modeling.loading import load_tokenizer
    from chatgpt_recipes.training.reward import format_check, length_penalty

    tokenizer = load_tokenizer(marker_policy_dir)
    words, eos = tokenizer(" red apple")["input_ids"], tokenizer.eos_token_id
    assert length_penalty(tokenizer, 8)(completion_ids=[words + [eos], []]) == [-(len(words) + 1) / 8, 0.0]
    assert format_check(tokenizer, 8)(completion_ids=[words + [eos], words, [eos], []]) == [1.0, 0.0, 0.0, 0.0]


def test_an_unknown_rule_reward_is_a_clear_error_naming_the_option(tmp_path):
    import grpo

    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    config, model_args = parse_config((grpo.GRPORecipeConfig, ModelArguments), "grpo/smollm2_alpaca_lora.yaml",
                                      ["--rule_rewards", "length_penalty", "brevity", "--bf16", "false",
                                       "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"rule_rewards: .*format_check.*unknown: 'brevity'"):
        grpo.main(config, model_args)  # before any model or the (absent) reward model is looked at
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "grpo.py"), "--rule_rewards", "brevity",
                             "--bf16", "false", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: rule_rewards: ['brevity']")

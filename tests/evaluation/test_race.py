"""chatgpt_recipes/evaluation/race.py: the race table read from a written eval_results.json (the evaluation's
per-prompt scores) and the stages' records: each row's win-rates, verdicts, flags and figures come from its own
method's entries; each reward-hacking flag fires on an evaluation built to raise it and on no other; a judge below
0.65 on its held-out pairs calls nothing better or worse; budgets are counted over processes and iterations and the
race refuses unequal ones, and unequal treatments of an answer that does not end."""

import json

import pytest

from chatgpt_recipes.evaluation.metrics import win_rate
from chatgpt_recipes.evaluation.race import (check_equal_budgets, check_same_reward, generation_budget, race_table,
                                             write_race)
from chatgpt_recipes.runtime.errors import ConfigError

PROMPTS = 20
BUDGETS = {"ppo": {"answers": 48, "prompts": 48, "max_answer_tokens": 32},
           "rloo": {"answers": 48, "prompts": 12, "max_answer_tokens": 32},
           "dpo": {"answers": 0, "prompts": 0, "max_answer_tokens": 0}}


def accuracy(rate: float, pairs: int = 100) -> dict:
    return {"accuracy": rate, "pairs": pairs, "ci_low": rate - 0.09, "ci_high": rate + 0.09}


def written_evaluation(tmp_path, scores: dict, judge: dict | None, likelihoods: dict, tokens: dict, kls: dict,
                       rm_accuracy: float = 0.7, judge_accuracy: float = 0.7) -> None:
    """An evaluation directory as evaluate_model.py writes it, for the models in `scores`."""
    models = {name: {"path": str(tmp_path / name), "answer_tokens": tokens[name], "distinct_2": 0.5 + i / 10,
                     "rm_score_mean": sum(scores[name]) / PROMPTS, "kl_to_reference": kls.get(name)}
              for i, name in enumerate(scores)}
    results = {"models": models, "reward_scores": scores, "reference_logprobs": likelihoods,
               "reward_model_accuracy": accuracy(rm_accuracy),
               "win_rates": {f"{name} vs sft": win_rate(scores[name], scores["sft"])
                             for name in scores if name != "sft"}}
    if judge is not None:
        results.update(judge_scores=judge, judge_model="outputs/judge", judge_accuracy=accuracy(judge_accuracy, 50))
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "eval_results.json").write_text(json.dumps(results))


def test_each_row_is_its_own_methods_and_the_flags_follow_the_scores(tmp_path):
    # ppo: better by the reward model on every prompt, worse by the judge and the reference likelihood, answers
    # twice as long; dpo: better by all three; the last prompt of dpo too long for the likelihood pass (None)
    scores = {"sft": [0.0] * PROMPTS, "ppo": [1.0] * PROMPTS, "dpo": [0.5] * PROMPTS}
    judge = {"sft": [0.0] * PROMPTS, "ppo": [-1.0] * PROMPTS, "dpo": [0.3] * PROMPTS}
    likelihoods = {"sft": [-10.0] * PROMPTS, "ppo": [-12.0] * PROMPTS, "dpo": [-8.0] * (PROMPTS - 1) + [None]}
    written_evaluation(tmp_path, scores, judge, likelihoods, {"sft": 10.0, "ppo": 20.0, "dpo": 11.0},
                       {"ppo": 0.4, "dpo": 0.2})
    records = {"ppo": {"fingerprint": "f-ppo", "seconds": 120.0, "peak_rss_mb": 900.0}, "dpo": {"seconds": 60.0}}
    summary = write_race(tmp_path, ["ppo", "dpo"], "sft", BUDGETS, BUDGETS["ppo"], records,
                         {name: str(tmp_path / name) for name in scores})
    race = json.loads((tmp_path / "race.json").read_text())
    ppo, dpo = race["methods"]["ppo"], race["methods"]["dpo"]
    assert ppo["verdicts"] == {"reward_model": "better", "judge": "worse", "reference_likelihood": "worse"}
    assert ppo["prompts_rm_and_judge_disagree"] == 1.0 and ppo["length_ratio"] == 2.0
    assert len(ppo["reward_hacking_flags"]) == 2  # longer than 1.5x, and better by the reward model only
    assert dpo["verdicts"] == {"reward_model": "better", "judge": "better", "reference_likelihood": "better"}
    assert dpo["prompts_rm_and_judge_disagree"] == 0.0
    assert dpo["reward_hacking_flags"] == []
    assert dpo["win_rates_vs_start"]["reference_likelihood"]["wins"] == PROMPTS - 1
    assert (ppo["run"], ppo["stage_fingerprint"], ppo["wall_minutes"]) == (str(tmp_path / "ppo"), "f-ppo", 2.0)
    assert dpo["distinct_2"] == 0.7 and dpo["kl_to_start"] == 0.2  # the third model's entries, not the first's
    assert summary["methods"]["ppo"]["reward_hacking_suspected"] and not summary["methods"]["dpo"][
        "reward_hacking_suspected"]
    assert summary["judge_accuracy"] == 0.7 and summary["judge_model"] == "outputs/judge"
    table = (tmp_path / "race.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == ["ppo", "dpo"]
    assert "| ppo | 48 / 48 |" in table and "| dpo | 0 (comparison pairs) |" in table
    assert "reference likelihood (DPO and the reward model are trained towards references)" in table
    assert "Judge: `outputs/judge`, which no method optimised" in table and "70.0% on 50 held-out pairs" in table
    assert "inconclusive" not in table and (tmp_path / "race.png").stat().st_size > 10_000


# One evaluation per flag: a calm race (ppo no different from sft by every judge, same length, small KL), then one
# change that should raise exactly that flag
CALM = {"scores": [0.0, 1.0] * (PROMPTS // 2), "tokens": 10.0, "kl": 0.5}
FLAGS = {"length drift": ({"tokens": 16.0}, "answers 1.60x sft's length"),
         "better by the reward model only": ({"scores": [1.0] * PROMPTS}, "better than sft by the reward model only"),
         "KL blow-up": ({"kl": 25.0}, "KL to sft 25.0 nats per answer")}


@pytest.mark.parametrize("flag", [None, *FLAGS])
def test_each_flag_fires_on_the_evaluation_built_for_it_and_only_there(tmp_path, flag):
    ppo = {**CALM, **(FLAGS[flag][0] if flag else {})}
    sft_scores = [0.5] * PROMPTS
    written_evaluation(tmp_path, {"sft": sft_scores, "ppo": ppo["scores"]},
                       {"sft": sft_scores, "ppo": CALM["scores"]},  # the judge sees no difference
                       {"sft": [-10.0] * PROMPTS, "ppo": [-10.0] * PROMPTS},
                       {"sft": 10.0, "ppo": ppo["tokens"]}, {"ppo": ppo["kl"]})
    flags = race_table(tmp_path, ["ppo"], "sft", BUDGETS, {},
                       {"reward_model": {"sft": sft_scores, "ppo": ppo["scores"]},
                        "judge": {"sft": sft_scores, "ppo": CALM["scores"]},
                        "reference_likelihood": {"sft": [-10.0] * PROMPTS, "ppo": [-10.0] * PROMPTS}}
                       )["ppo"]["reward_hacking_flags"]
    assert len(flags) == (1 if flag else 0)
    if flag:
        assert flags[0].startswith(FLAGS[flag][1])


def test_a_judge_below_the_bar_calls_nothing_better_and_says_so_in_bold(tmp_path):
    scores = {"sft": [0.0] * PROMPTS, "ppo": [1.0] * PROMPTS}
    written_evaluation(tmp_path, scores, {"sft": [0.0] * PROMPTS, "ppo": [1.0] * PROMPTS},
                       {"sft": [-10.0] * PROMPTS, "ppo": [-10.0] * PROMPTS}, {"sft": 10.0, "ppo": 10.0}, {"ppo": 0.1},
                       rm_accuracy=0.56, judge_accuracy=0.6)
    summary = write_race(tmp_path, ["ppo"], "sft", BUDGETS, BUDGETS["ppo"], {},
                         {name: str(tmp_path / name) for name in scores})
    ppo = summary["methods"]["ppo"]
    assert ppo["verdicts"]["reward_model"] == "inconclusive" and ppo["verdicts"]["judge"] == "inconclusive"
    assert ppo["reward_hacking_flags"] == []  # an inconclusive reward model calls nothing better
    table = (tmp_path / "race.md").read_text()
    assert "**inconclusive: reward model at 56%**" in table and "**inconclusive: judge at 60%**" in table


def test_budgets_count_every_process_and_iteration():
    ppo = {"total_episodes": 48, "per_device_train_batch_size": 8, "response_length": 32}
    grpo = {"max_steps": 6, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 32}
    assert generation_budget("ppo", ppo, 1) == {"answers": 48, "prompts": 48, "max_answer_tokens": 32}
    # TRL's PPO runs whole updates: 48 episodes at a global batch of 16 x 2 processes is 2 updates of 32
    assert generation_budget("ppo", {**ppo, "gradient_accumulation_steps": 2}, 2)["answers"] == 64
    assert generation_budget("grpo", grpo, 1) == {"answers": 48, "prompts": 12, "max_answer_tokens": 32}
    assert generation_budget("grpo", grpo, 2)["answers"] == 96  # each process samples its own batch
    assert generation_budget("grpo", {**grpo, "num_iterations": 2}, 1)["answers"] == 24  # each batch used twice
    assert generation_budget("rloo", {**grpo, "num_generations": 2}, 1)["prompts"] == 24
    with pytest.raises(ConfigError, match="grpo must set max_steps > 0"):
        generation_budget("grpo", {**grpo, "max_steps": -1}, 1)
    assert check_equal_budgets({"ppo": generation_budget("ppo", ppo, 1), "grpo": generation_budget("grpo", grpo, 1),
                                "dpo": generation_budget("dpo", {}, 1)})["answers"] == 48
    with pytest.raises(ConfigError, match=r"same number of answers.*'ppo': \(48, 32\), 'grpo': \(96, 32\)"):
        check_equal_budgets({"ppo": generation_budget("ppo", ppo, 2), "grpo": generation_budget("grpo", grpo, 2)})


def test_the_race_refuses_unequal_treatments_of_an_answer_that_does_not_end():
    same = {"missing_eos_penalty": 1.0, "mask_truncated_completions": False}
    check_same_reward({"ppo": same, "rloo": dict(same), "grpo": dict(same)})
    with pytest.raises(ConfigError, match=r"one reward.*'grpo': \{'missing_eos_penalty': None"):
        check_same_reward({"ppo": same, "grpo": {"missing_eos_penalty": None, "mask_truncated_completions": False}})
    with pytest.raises(ConfigError, match="one reward"):
        check_same_reward({"ppo": same, "rloo": {**same, "mask_truncated_completions": True}})

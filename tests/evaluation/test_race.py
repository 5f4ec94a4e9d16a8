"""chatgpt_recipes/evaluation/race.py: the race table read from a written eval_results.json (the evaluation's per-prompt
scores) and the stages' records: each row's win-rates, verdicts, flags and figures come from its own method's
entries, and race.json, race.md and race.png are written."""

import json

from chatgpt_recipes.evaluation.metrics import win_rate
from chatgpt_recipes.evaluation.race import write_race

PROMPTS = 20


def written_evaluation(tmp_path, scores: dict, likelihoods: dict, tokens: dict) -> None:
    """An evaluation directory as evaluate_model.py writes it, for the models in `scores`."""
    models = {name: {"path": str(tmp_path / name), "answer_tokens": tokens[name], "distinct_2": 0.5 + i / 10,
                     "rm_score_mean": sum(scores[name]) / PROMPTS, "kl_to_reference": 0.1 * i}
              for i, name in enumerate(scores)}
    results = {"models": models, "reward_scores": scores, "reference_logprobs": likelihoods,
               "win_rates": {f"{name} vs sft": win_rate(scores[name], scores["sft"]) for name in scores if name != "sft"}}
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "eval_results.json").write_text(json.dumps(results))


def test_each_row_is_its_own_methods_and_the_flags_follow_the_scores(tmp_path):
    # ppo: better by the reward model on every prompt, worse by the reference likelihood, answers twice as long;
    # dpo: better by both judges; the last prompt of dpo too long for the likelihood pass (None)
    scores = {"sft": [0.0] * PROMPTS, "ppo": [1.0] * PROMPTS, "dpo": [0.5] * PROMPTS}
    likelihoods = {"sft": [-10.0] * PROMPTS, "ppo": [-12.0] * PROMPTS, "dpo": [-8.0] * (PROMPTS - 1) + [None]}
    written_evaluation(tmp_path, scores, likelihoods, {"sft": 10.0, "ppo": 20.0, "dpo": 11.0})
    budgets = {"ppo": {"answers": 48, "max_answer_tokens": 32}, "dpo": {"answers": 0, "max_answer_tokens": 0}}
    records = {"ppo": {"fingerprint": "f-ppo", "seconds": 120.0, "peak_rss_mb": 900.0}, "dpo": {"seconds": 60.0}}
    summary = write_race(tmp_path, ["ppo", "dpo"], "sft", budgets, budgets["ppo"], records,
                         {name: str(tmp_path / name) for name in scores})
    race = json.loads((tmp_path / "race.json").read_text())
    ppo, dpo = race["methods"]["ppo"], race["methods"]["dpo"]
    assert ppo["verdicts"] == {"reward_model": "better", "reference_likelihood": "worse"} and not ppo["judges_agree"]
    assert ppo["prompts_judges_disagree"] == 1.0 and ppo["length_ratio"] == 2.0
    assert len(ppo["reward_hacking_flags"]) == 2  # longer than 1.5x, and better by the reward model only
    assert dpo["verdicts"] == {"reward_model": "better", "reference_likelihood": "better"} and dpo["judges_agree"]
    assert dpo["reward_hacking_flags"] == [] and dpo["win_rate_vs_start_reference_likelihood"]["wins"] == PROMPTS - 1
    assert (ppo["run"], ppo["stage_fingerprint"], ppo["wall_minutes"]) == (str(tmp_path / "ppo"), "f-ppo", 2.0)
    assert (dpo["kl_to_start"], dpo["distinct_2"], dpo["generation_budget"]) == (0.2, 0.7, budgets["dpo"])
    assert summary["methods"]["ppo"]["reward_hacking_suspected"] and not summary["methods"]["dpo"][
        "reward_hacking_suspected"]
    table = (tmp_path / "race.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == ["ppo", "dpo"]
    assert "**disagree**" in table and (tmp_path / "race.png").stat().st_size > 10_000

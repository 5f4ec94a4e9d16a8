"""recipes/pipeline.py on tiny models, the way a user runs it: every stage through `accelerate launch`, each
output feeding the next, the report with its plots, a reward model that learns a preference whose answer is
known, and a rerun that skips the finished stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


MARKER = "Certainly"


def marker_preferences(path: Path, rows: int = 48) -> None:
    """Pairs whose chosen answer opens with a marker word and whose rejected answer does not: an RM can learn it."""
    topics = ["rivers", "bread", "stars", "trains", "music", "tea", "snow", "bees", "maps", "clocks", "glass", "salt"]
    data = [{"prompt": f"Tell me one fact about {topics[i % len(topics)]} number {i}.",
             "chosen": f"{MARKER}! Here is a fact about {topics[i % len(topics)]}.",
             "rejected": f"No. I will not talk about {topics[i % len(topics)]}."} for i in range(rows)]
    path.write_text(json.dumps(data))


def pipeline_config(tmp_path: Path, base_model: str, stages: list[str]) -> Path:
    marker_preferences(tmp_path / "prefs.json")
    quick = {"report_to": "none", "bf16": False, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no"}
    config = {
        "output_dir": str(tmp_path / "run"),
        "base_model": base_model,
        "stages": stages,
        "sft": {**quick, "learning_rate": 1.0e-3, "max_steps": 2, "max_train_samples": 16, "eval_split_size": 4,
                "max_length": 256,
                "per_device_train_batch_size": 4, "sample_max_new_tokens": 4},
        "reward_model": {**quick, "dataset_name": str(tmp_path / "prefs.json"), "eval_split_size": 8,
                         "use_peft": False, "learning_rate": 3.0e-3, "max_steps": 12, "per_device_train_batch_size": 8,
                         "centering_samples": 8, "warmup_steps": 0},
        "ppo": {**quick, "total_episodes": 8, "per_device_train_batch_size": 4, "local_rollout_forward_batch_size": 4,
                "response_length": 6, "num_ppo_epochs": 1, "eval_prompts": 2, "max_train_prompts": 8,
                "sample_every": 0, "max_prompt_length": 128},
        "evaluate": {"num_prompts": 4, "max_new_tokens": 6, "batch_size": 4},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_pipeline(config: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "pipeline.py"), "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"pipeline failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def test_pipeline_runs_every_stage_writes_the_report_and_resumes(tmp_path, tiny_llama_dir):
    stages = ["sft", "reward_model", "ppo", "evaluate"]
    config = pipeline_config(tmp_path, tiny_llama_dir, stages)
    first = run_pipeline(config)
    out = tmp_path / "run"
    for stage in stages:
        marker = json.loads((out / stage / "STAGE_DONE.json").read_text())
        assert marker["stage"] == stage and (out / "logs" / f"{stage}.log").is_file()
        assert f"=== {stage} ===" in first.stdout
    # outputs fed forward by path: the RM started from the SFT output, the evaluation compared base and SFT
    results = json.loads((out / "evaluate" / "eval_results.json").read_text())
    assert results["models"]["base"]["path"] == tiny_llama_dir
    assert results["models"]["sft"]["path"] == str(out / "sft")
    assert results["models"]["ppo"]["path"] == str(out / "ppo")
    assert set(results["win_rates"]) == {"sft vs base", "ppo vs base", "ppo vs sft"}
    # the reward model learnt the marker preference: its held-out accuracy is the known answer, 100%
    assert results["reward_model_accuracy"]["accuracy"] == pytest.approx(1.0)
    assert results["reward_model_accuracy"]["pairs"] == 8
    # reported from the RM's own final evaluation (its stage_info.json), not from a second scoring of those pairs
    recorded = json.loads((out / "reward_model" / "stage_info.json").read_text())
    assert (recorded["eval_correct"], recorded["eval_pairs"]) == (results["reward_model_accuracy"]["correct"], 8)
    assert "8 held-out pairs of" in first.stdout and "read from its stage_info.json" in first.stdout
    report = (out / "report.md").read_text()
    for picture in ("stage_comparison.png", "win_rates.png"):
        assert (out / picture).stat().st_size > 10_000 and f"({picture})" in report
    assert "ppo vs sft" in report and (out / "evaluate" / "samples.md").is_file()
    assert "(ppo/rl_curves.png)" in report or "(ppo/training_curves.png)" in report
    # summary.json: the demonstration's figures from the evaluation, each with its check
    summary = json.loads((out / "summary.json").read_text())
    models = results["models"]
    assert summary["rm_eval_accuracy"] == results["reward_model_accuracy"]["accuracy"]
    assert summary["ppo_win_rate_vs_sft"] == results["win_rates"]["ppo vs sft"]["win_rate"]
    assert summary["ppo_kl_to_sft"] == models["ppo"]["kl_to_reference"] and results["kl_reference"] == "sft"
    assert summary["ppo_length_ratio"] == pytest.approx(models["ppo"]["answer_tokens"] / models["sft"]["answer_tokens"])
    gain = models["ppo"]["rm_score_mean"] - models["sft"]["rm_score_mean"]
    assert summary["ppo_kl_bound"] == pytest.approx(max(gain, 0.0) / summary["ppo_kl_coef"])
    checks = {check["name"]: check for check in summary["checks"]}
    assert checks["rm_eval_accuracy"]["passed"] and not checks["rm_eval_pairs"]["passed"]  # 8 pairs are too few
    assert not checks["ppo_eval_prompts"]["passed"] and summary["all_passed"] is False
    assert "## Checks (summary.json)" in report and "rm_eval_pairs" in report

    second = run_pipeline(config)
    for stage in stages:
        assert f"{stage}: finished earlier" in second.stdout
        assert f"=== {stage} ===" not in second.stdout
    assert "skipped (finished earlier)" in (out / "report.md").read_text()


def test_pipeline_refuses_bad_stage_lists_and_wiring_overrides(tmp_path):
    from pipeline import PipelineConfig, main, stage_paths

    from chatgpt_recipes.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="distinct names"):
        main(PipelineConfig(output_dir=str(tmp_path), stages=["sft", "train_everything"]))
    with pytest.raises(ConfigError, match="set by the pipeline"):
        main(PipelineConfig(output_dir=str(tmp_path), stages=["sft"], sft={"model_name_or_path": "gpt2"}))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter_model.safetensors").write_text("someone else's run")
    with pytest.raises(ConfigError, match="not written by this pipeline"):
        main(PipelineConfig(output_dir=str(tmp_path), stages=["sft"]))
    wiring = stage_paths(PipelineConfig(output_dir="out", stages=["pretrain", "sft", "dpo", "evaluate"]))
    assert wiring["sft"]["model_name_or_path"] == os.path.join("out", "pretrain")
    assert wiring["dpo"]["model_name_or_path"] == os.path.join("out", "sft")
    assert wiring["evaluate"]["models"] == ["base=out/pretrain", "sft=out/sft", "dpo=out/dpo"]
    assert "reward_model" not in wiring["evaluate"]


def test_comparison_data_feeds_the_reward_model_and_every_stage_follows_sfts_data():
    """The later stages read SFT's data file and seed; the rows SFT held out they read from its sft_split.json
    (tests/recipes/test_sft_lora.py), so no split size is passed on."""
    from pipeline import PipelineConfig, derived_defaults, stage_paths

    config = PipelineConfig(output_dir="out", stages=["sft", "comparisons", "reward_model", "ppo", "evaluate"],
                            sft={"eval_split_size": 100, "seed": 7, "dataset_name": "data/chat_demo.jsonl"},
                            reward_model={"eval_split_size": 50})
    wiring = stage_paths(config)
    pairs = os.path.join("out", "comparisons", "comparisons.jsonl")
    assert wiring["comparisons"]["model_name_or_path"] == os.path.join("out", "sft")
    assert wiring["reward_model"]["dataset_name"] == pairs
    for stage in ("comparisons", "ppo"):
        assert derived_defaults(config, stage) == {"dataset_name": "data/chat_demo.jsonl", "seed": 7}
    evaluation = derived_defaults(config, "evaluate")
    assert evaluation["preference_dataset"] == pairs and evaluation["preference_eval_split_size"] == 50
    assert "eval_split_size" not in evaluation and evaluation["seed"] == 7 and evaluation["kl_reference"] == "sft"
    # without comparison data: the preference file the RM trains on, its recipe YAML's when the stage names none
    yaml_data = PipelineConfig(output_dir="out", stages=["sft", "reward_model", "evaluate"])
    assert derived_defaults(yaml_data, "evaluate")["preference_dataset"] == "data/dpo_en_demo.json"
    own_data = PipelineConfig(output_dir="out", stages=["sft", "reward_model", "evaluate"],
                              reward_model={"dataset_name": "prefs.jsonl"})
    assert derived_defaults(own_data, "evaluate")["preference_dataset"] == "prefs.jsonl"
    own_prompts = PipelineConfig(output_dir="out", stages=["sft", "ppo"], ppo={"dataset_name": "hh.jsonl"})
    assert derived_defaults(own_prompts, "ppo") == {}  # another prompt set: nothing of SFT's to follow


def test_the_race_refuses_unequal_budgets_and_quick_applies_its_options(tmp_path):
    from pipeline import PipelineConfig, main

    from chatgpt_recipes.runtime.errors import ConfigError

    stages = ["sft", "reward_model", "judge", "ppo", "grpo", "evaluate"]
    race = dict(output_dir=str(tmp_path / "run"), race=True, missing_eos_penalty=1.0,
                reward_model={"dataset_name": "pairs.jsonl"})  # not the judge's data/dpo_en_demo.json
    with pytest.raises(ConfigError, match="set evaluate.kl_reference to base"):
        main(PipelineConfig(stages=stages[1:], **race))
    unequal = PipelineConfig(stages=stages, **race, ppo={"total_episodes": 8, "response_length": 6},
                             grpo={"max_steps": 2, "per_device_train_batch_size": 4, "max_completion_length": 8})
    with pytest.raises(ConfigError, match=r"same number of answers.*'ppo': \(8, 6\), 'grpo': \(8, 8\)"):
        main(unequal)
    # equal on one process; on two (accelerate_configs/cpu.yaml) GRPO's processes each sample their own batch, while
    # PPO's total_episodes is global
    equal = dict(ppo={"total_episodes": 8, "response_length": 6, "per_device_train_batch_size": 4},
                 grpo={"max_steps": 2, "per_device_train_batch_size": 4, "max_completion_length": 6})
    with pytest.raises(ConfigError, match=r"'ppo': \(8, 6\), 'grpo': \(16, 6\)"):
        main(PipelineConfig(stages=stages, **race, **equal,
                            accelerate_config=str(REPO / "accelerate_configs" / "cpu.yaml")))
    quick = PipelineConfig(stages=stages, **race, quick=True, ppo={"total_episodes": 8, "response_length": 6},
                           grpo={"max_steps": 2, "per_device_train_batch_size": 4, "max_completion_length": 8},
                           quick_options={"grpo": {"max_completion_length": 6}, "ppo": {"total_episodes": 4}})
    with pytest.raises(ConfigError, match=r"'ppo': \(4, 6\), 'grpo': \(8, 6\)"):  # the quick options were applied
        main(quick)
    assert quick.output_dir == str(tmp_path / "run") + "-quick"
    assert not (tmp_path / "run").exists() and not (tmp_path / "run-quick").exists()  # refused before any stage


def test_the_race_refuses_unequal_rewards_and_a_judge_trained_towards(tmp_path):
    """One treatment of an answer that does not end, set once for the pipeline (PPO's recipe YAML sets
    missing_eos_penalty 1.0, RLOO's and GRPO's none, so the race must set it); a judge whose data a stage trains on
    is refused, and so is a race without a judge."""
    from pipeline import PipelineConfig, derived_defaults, main

    from chatgpt_recipes.runtime.errors import ConfigError

    stages = ["sft", "reward_model", "judge", "ppo", "rloo", "evaluate"]
    budgets = dict(ppo={"total_episodes": 8, "response_length": 6, "per_device_train_batch_size": 4},
                   rloo={"max_steps": 2, "per_device_train_batch_size": 4, "max_completion_length": 6})
    race = dict(output_dir=str(tmp_path / "run"), race=True, stages=stages, **budgets,
                reward_model={"dataset_name": "pairs.jsonl"})
    with pytest.raises(ConfigError, match="set missing_eos_penalty"):
        main(PipelineConfig(**race))
    with pytest.raises(ConfigError, match=r"one reward.*'rloo': \{'missing_eos_penalty': 1.0, "
                                          r"'mask_truncated_completions': True\}"):
        main(PipelineConfig(**{**race, "rloo": {**budgets["rloo"], "mask_truncated_completions": True}},
                            missing_eos_penalty=1.0))
    with pytest.raises(ConfigError, match=r"one reward.*'ppo': \{'missing_eos_penalty': 0.5, "
                                          r"'mask_truncated_completions': False\}"):
        main(PipelineConfig(**{**race, "ppo": {**budgets["ppo"], "missing_eos_penalty": 0.5}},
                            missing_eos_penalty=1.0))
    same = PipelineConfig(**race, missing_eos_penalty=0.0)
    assert derived_defaults(same, "rloo")["missing_eos_penalty"] == derived_defaults(same, "ppo")[
        "missing_eos_penalty"] == 0.0
    # the reward model's recipe YAML trains on data/dpo_en_demo.json when no comparisons stage replaces it
    with pytest.raises(ConfigError, match=r"judge's data data/dpo_en_demo.json is trained on by \['reward_model'\]"):
        main(PipelineConfig(**{**race, "reward_model": {}}, missing_eos_penalty=0.0))
    with pytest.raises(ConfigError, match=r"judge_model \(org/rm\) replaces the judge stage"):
        main(PipelineConfig(**race, missing_eos_penalty=1.0, judge_model="org/rm"))
    with pytest.raises(ConfigError, match="add the judge stage"):
        main(PipelineConfig(**{**race, "stages": [s for s in stages if s != "judge"]}, missing_eos_penalty=1.0))
    assert not (tmp_path / "run").exists()  # refused before any stage


def test_the_kl_bound_is_checked_only_where_it_holds(tmp_path):
    """KL <= reward gain / kl_coef follows for PPO and RLOO on raw rewards; GRPO (rewards divided by the group's
    spread, KL in the loss) and PPO-ptx (a language-model loss) get no such check, and summary.json says why."""
    from pipeline import PipelineConfig, pipeline_summary

    from chatgpt_recipes.evaluation.metrics import win_rate

    methods = ["ppo", "ppo_ptx", "rloo", "grpo"]
    config = PipelineConfig(output_dir=str(tmp_path), stages=["sft", "reward_model", *methods, "evaluate"])
    sft_scores, policy_scores = [0.0] * 8, [0.1] * 8  # every policy gains 0.1: bound 0.1 / 0.05 = 2 nats
    results = {"kl_reference": "sft",
               "win_rates": {f"{m} vs sft": win_rate(policy_scores, sft_scores) for m in methods},
               "models": {"sft": {"rm_score_mean": 0.0, "answer_tokens": 10.0},
                          **{m: {"rm_score_mean": 0.1, "answer_tokens": 10.0, "kl_to_reference": 3.0}
                             for m in methods}}}
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "eval_results.json").write_text(json.dumps(results))
    for method, results_file in [("ppo", "ppo_results.json"), ("ppo_ptx", "ppo_results.json"),
                                 ("rloo", "rloo_results.json"), ("grpo", "grpo_results.json")]:
        (tmp_path / method).mkdir()
        (tmp_path / method / results_file).write_text(json.dumps({"kl_coef": 0.05}))
    summary = pipeline_summary(config)
    checks = {check["name"]: check for check in summary["checks"]}
    for method in ("ppo", "rloo"):  # 3 nats over a bound of 2: the penalty did not hold them
        assert summary[f"{method}_kl_bound"] == pytest.approx(2.0) and checks[f"{method}_kl_to_sft"]["passed"] is False
    for method in ("ppo_ptx", "grpo"):
        assert f"{method}_kl_to_sft" not in checks and f"{method}_kl_bound" not in summary
    assert "group's spread" in summary["grpo_kl_bound_not_applied"]
    assert "language-model loss" in summary["ppo_ptx_kl_bound_not_applied"]


def test_a_check_on_a_stage_its_time_budget_stopped_is_not_reached_rather_than_failed(tmp_path):
    """The reward model stopped by max_train_minutes (the record recipes leave): its accuracy check and the
    policy's checks that stand on it are marked not reached, with the stop; counts are still judged. A stage
    option set to null reaches the recipe as `none` (no time budget)."""
    from pipeline import PipelineConfig, checks_markdown, command_line, pipeline_summary

    from chatgpt_recipes.training.time_budget import STOP_RECORD

    out = tmp_path / "run"
    (out / "evaluate").mkdir(parents=True)
    (out / "reward_model").mkdir()
    (out / "reward_model" / STOP_RECORD).write_text(
        json.dumps({"stopped_at_step": 53, "max_steps": 76, "max_train_minutes": 6}))
    win = {"win_rate": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": 100}
    model = {"rm_score_mean": 0.0, "answer_tokens": 40.0}
    (out / "evaluate" / "eval_results.json").write_text(json.dumps({
        "models": {"sft": model, "ppo": {**model, "rm_score_mean": 0.5}}, "win_rates": {"ppo vs sft": win},
        "reward_model_accuracy": {"accuracy": 0.62, "ci_low": 0.52, "ci_high": 0.71, "pairs": 100}}))
    summary = pipeline_summary(PipelineConfig(output_dir=str(out), stages=["sft", "reward_model", "ppo", "evaluate"]))
    checks = {check["name"]: check for check in summary["checks"]}
    stop = "reward_model stopped by max_train_minutes=6 at step 53 of 76"
    for name in ("rm_eval_accuracy", "ppo_win_rate_vs_sft"):
        assert checks[name]["passed"] is None and not checks[name]["reached"]
        assert checks[name]["not_reached_because"] == stop
    assert checks["rm_eval_pairs"]["passed"] is True and checks["ppo_eval_prompts"]["passed"] is True
    assert summary["time_budget_stops"] == {"reward_model": stop} and summary["all_passed"] is False
    assert f"| rm_eval_accuracy | 0.62 | >= 0.65 | not reached: {stop} |" in checks_markdown(summary)
    assert command_line({"max_train_minutes": None, "max_steps": 20}) == ["--max_train_minutes", "none",
                                                                          "--max_steps", "20"]


def test_a_failing_stage_shows_its_own_error_without_the_launchers_traceback(tmp_path, marker_policy_dir):
    path = pipeline_config(tmp_path, marker_policy_dir, ["evaluate"])
    config = yaml.safe_load(path.read_text())
    config["evaluate"]["kl_reference"] = "no-such-model"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "pipeline.py"), "--config", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "kl_reference: 'no-such-model' is not one of the models" in output
    assert "stage 'evaluate' failed" in output and str(tmp_path / "run" / "logs" / "evaluate.log") in output
    assert "Traceback" not in output and "CalledProcessError" not in output

"""The RL race end to end on tiny models through recipes/pipeline.py (its own file, so that it runs beside
test_pipeline.py's end-to-end run on another test worker). The race's table from written results:
tests/evaluation/test_race.py; its refusals: test_pipeline.py."""

import json

import pytest
import yaml
from test_pipeline import MARKER, pipeline_config, run_pipeline

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def test_the_race_on_tiny_models_passes_one_penalty_and_judges_with_a_judge_trained_apart(tmp_path, tiny_llama_dir):
    """The race end to end on tiny models: GRPO gets the pipeline's missing_eos_penalty, the judge stage learns a
    marker preference from its own file (no other stage trains on it) and the evaluation measures it on the pairs
    it held out, and the table counts GRPO's answers and prompts."""
    config_path = pipeline_config(tmp_path, tiny_llama_dir, [])
    config = yaml.safe_load(config_path.read_text())
    (tmp_path / "judge_prefs.json").write_text(json.dumps(  # the marker preference on other prompts and answers
        [{"prompt": f"Describe colour number {i} in one line.", "chosen": f"{MARKER}! Colour {i} is warm.",
          "rejected": f"Colour {i} is not something I describe."} for i in range(40)]))
    quick = {"report_to": "none", "bf16": False, "save_strategy": "no"}
    config.update(stages=["sft", "reward_model", "judge", "grpo", "dpo", "evaluate"], race=True,
                  missing_eos_penalty=1.0,
                  judge={**config["reward_model"], "dataset_name": str(tmp_path / "judge_prefs.json")},
                  grpo={**quick, "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                        "max_completion_length": 6, "max_train_prompts": 8, "eval_prompts": 2, "learning_rate": 1e-3,
                        "max_prompt_length": 128, "on_weak_reward_model": "warn"},
                  dpo={**quick, "dataset_name": str(tmp_path / "prefs.json"), "max_steps": 2,
                       "per_device_train_batch_size": 4, "max_length": 256},
                  evaluate={**config["evaluate"], "max_new_tokens": 12})
    config_path.write_text(yaml.safe_dump(config))
    run_pipeline(config_path)
    out = tmp_path / "run"
    assert json.loads((out / "grpo" / "grpo_results.json").read_text())["missing_eos_penalty"] == 1.0
    race = json.loads((out / "race.json").read_text())
    assert race["judge_model"] == str(out / "judge")
    assert race["judge"]["accuracy"] == pytest.approx(1.0) and race["judge"]["pairs"] == 8  # it learnt the marker
    assert race["methods"]["grpo"]["generation_budget"] == {"answers": 8, "prompts": 2, "max_answer_tokens": 6}
    assert set(race["per_prompt"]) == {"reward_model", "judge", "reference_likelihood"}
    assert len(race["per_prompt"]["judge"]["dpo"]) == 4
    table = (out / "race.md").read_text()
    assert f"Judge: `{out / 'judge'}`" in table and "| grpo | 8 / 2 |" in table

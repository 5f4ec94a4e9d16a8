"""recipes/rloo.py on a tiny policy and the reward model trained for real on the marker preference
(tests/conftest.py) through `accelerate launch`."""

import json

import pytest
from conftest import run_recipe

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def test_rloo_runs_on_tiny_models(tmp_path, marker_policy_dir, marker_reward_model_dir):
    out = tmp_path / "rloo"
    result = run_recipe("rloo.py", "--model_name_or_path", marker_policy_dir,
                        "--reward_model_path", marker_reward_model_dir, "--max_steps", "1", "--max_train_prompts", "4",
                        "--eval_prompts", "2", "--max_completion_length", "6", "--learning_rate", "1e-3",
                        "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--output_dir", out)
    steps = [entry for entry in json.loads((out / "log_history.json").read_text()) if "reward" in entry]
    assert len(steps) == 1 and all("kl" in entry for entry in steps)
    results = json.loads((out / "rloo_results.json").read_text())
    assert results["steps"] == 1 and results["kl_before"] == 0.0
    assert "reward (centred)" in result.stdout

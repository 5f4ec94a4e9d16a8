"""recipes/rloo.py on a tiny policy and reward model through `accelerate launch`."""

import json

from conftest import run_recipe
from test_ppo import make_reward_model


def test_rloo_runs_on_tiny_models(tmp_path, tiny_llama_dir):
    reward = make_reward_model(tiny_llama_dir, tmp_path / "rm")
    out = tmp_path / "rloo"
    result = run_recipe("rloo.py", "--model_name_or_path", tiny_llama_dir, "--reward_model_path", reward,
                        "--on_weak_reward_model", "warn", "--max_steps", "1", "--max_train_prompts", "4",
                        "--eval_prompts", "2", "--max_completion_length", "6", "--learning_rate", "1e-3",
                        "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--output_dir", out)
    steps = [entry for entry in json.loads((out / "log_history.json").read_text()) if "reward" in entry]
    assert len(steps) == 1 and all("kl" in entry for entry in steps)
    results = json.loads((out / "rloo_results.json").read_text())
    assert results["steps"] == 1 and results["kl_before"] == 0.0
    assert "reward (centred)" in result.stdout

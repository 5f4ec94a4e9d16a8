"""chatgpt_recipes.training.time_budget.TimeBudget: `max_train_minutes` ends training before the next step would pass it, with a
checkpoint that the same command resumes from."""

import json

from conftest import sft_config

from chatgpt_recipes.training.resume import last_complete_checkpoint
from chatgpt_recipes.training.time_budget import TimeBudget, budget_stop


def test_time_budget_stops_training_with_a_checkpoint(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import sft_lora
    from trl.trainer import sft_trainer

    monkeypatch.setattr(sft_trainer, "_chunked_cross_entropy_loss", sft_trainer._chunked_cross_entropy_loss)
    output_dir = tmp_path / "run"
    args = ["--model_name_or_path", tiny_llama_dir, "--max_train_samples", "64", "--eval_split_size", "4",
            "--max_length", "256", "--max_steps", "400", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--sample_max_new_tokens", "2", "--output_dir", str(output_dir),
            "--max_train_minutes", "0.05"]
    sft_lora.main(*sft_config(args))
    steps = json.loads((output_dir / "trainer_state.json").read_text())["global_step"]
    assert 1 <= steps < 400
    assert f"[time budget] stopping at step {steps} of 400" in capsys.readouterr().out
    checkpoint = last_complete_checkpoint(output_dir)
    assert checkpoint is not None and checkpoint.endswith(f"checkpoint-{steps}")  # saved although save_strategy is no
    assert budget_stop(output_dir) == {"stopped_at_step": steps, "max_steps": 400, "max_train_minutes": 0.05}


def test_a_later_run_without_a_budget_clears_the_stop_record(tmp_path):
    """The record says what the last run did: a rerun (budget or not) starts by removing it."""
    from types import SimpleNamespace

    from transformers import TrainerState

    (tmp_path / "time_budget_stop.json").write_text('{"stopped_at_step": 3, "max_steps": 9, "max_train_minutes": 1}')
    assert budget_stop(tmp_path)["stopped_at_step"] == 3
    TimeBudget(None).on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), None)
    assert budget_stop(tmp_path) is None

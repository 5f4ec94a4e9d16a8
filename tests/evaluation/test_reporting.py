"""chatgpt_recipes.evaluation.reporting: the report and the plots each kind of run gets, from logs shaped like TRL's."""

import json

import matplotlib.image

from chatgpt_recipes.evaluation.reporting import (evaluation_markdown, plot_model_comparison, plot_win_rates,
                                                  write_training_report)

SFT_LOG = [{"loss": 2.0 - 0.1 * s, "step": s, "epoch": s / 10} for s in range(1, 11)] + \
          [{"eval_loss": 1.9 - 0.05 * s, "step": s, "epoch": s / 10} for s in (5, 10)]
PPO_LOG = [{"objective/scores": 0.1 * s, "objective/rlhf_reward": 0.1 * s - 0.01 * s, "objective/kl": 0.01 * s,
            "objective/entropy": 2.0 - 0.05 * s, "response_length": 30 - s, "loss/value_avg": 0.3, "step": s}
           for s in range(1, 9)]
RM_LOG = [{"loss": 0.7 - 0.02 * s, "accuracy": 0.5 + 0.04 * s, "margin": 0.1 * s, "step": s} for s in range(1, 6)] + \
         [{"eval_accuracy": 0.8, "eval_margin": 0.6, "step": 5}]


def test_training_report_draws_loss_and_eval_loss_together(tmp_path):
    path = write_training_report(str(tmp_path), "SFT", SFT_LOG, {"train_loss": 1.5, "train_runtime": 12},
                                 {"Held-out prompt": "Say hi"})
    report = open(path).read()
    assert "| train_loss | 1.5 |" in report and "## Held-out prompt" in report
    assert "![training curves](training_curves.png)" in report
    assert matplotlib.image.imread(tmp_path / "training_curves.png").shape[1] < 700  # one panel, both curves
    assert not (tmp_path / "rl_curves.png").exists()  # no reward logged: no RL figure
    assert json.loads((tmp_path / "log_history.json").read_text()) == SFT_LOG


def test_ppo_log_gets_reward_kl_and_entropy_curves(tmp_path):
    report = open(write_training_report(str(tmp_path), "PPO", PPO_LOG, {})).read()
    assert "![Reward, KL, entropy and answer length per update](rl_curves.png)" in report
    height, width, _ = matplotlib.image.imread(tmp_path / "rl_curves.png").shape
    assert width > 2 * height  # three panels side by side
    assert "training_curves.png" not in report  # PPO logs no plain loss


def test_reward_model_log_and_the_legacy_plot_keys_list(tmp_path):
    report = open(write_training_report(str(tmp_path), "RM", RM_LOG, {},
                                        plot_keys=["loss", "eval_accuracy"])).read()  # a list of keys, as before
    assert "(training_curves.png)" in report and "(preference_curves.png)" in report
    assert matplotlib.image.imread(tmp_path / "training_curves.png").shape[1] > 900  # two panels


def test_evaluation_tables_and_plots(tmp_path):
    results = {
        "models": {"base": {"path": "b", "perplexity": 9.5, "distinct_1": 0.6, "distinct_2": 0.9, "token_entropy": 2.1},
                   "sft": {"path": "s", "perplexity": 5.25, "distinct_1": 0.5, "distinct_2": 0.8,
                           "token_entropy": 1.7}},
        "win_rates": {"sft vs base": {"win_rate": 0.75, "ci_low": 0.53, "ci_high": 0.89, "wins": 15, "ties": 0,
                                      "losses": 5, "n": 20}},
        "reward_model_accuracy": {"accuracy": 0.7, "margin_mean": 0.4, "margin_std": 0.2, "pairs": 40},
    }
    text = evaluation_markdown(results)
    assert "| sft | `s` | 5.25 | 0.5 | 0.8 | 1.7 |" in text
    assert "| sft vs base | 75.0% | 53.0% – 89.0% | 15 / 0 / 5 |" in text
    assert "accuracy 70.0%" in text
    assert plot_model_comparison(results["models"], str(tmp_path / "models.png"), "t")
    assert plot_win_rates(results["win_rates"], str(tmp_path / "wins.png"), "t")
    assert not plot_win_rates({}, str(tmp_path / "none.png"), "t") and not (tmp_path / "none.png").exists()
    assert matplotlib.image.imread(tmp_path / "models.png").shape[1] > 1000  # four panels

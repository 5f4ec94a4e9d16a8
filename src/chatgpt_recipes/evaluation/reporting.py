"""Reports: a markdown file and PNG plots next to each run's outputs. Training recipes call
write_training_report; evaluate_model.py and pipeline.py draw the across-models comparison with
plot_model_comparison / plot_win_rates and its tables with evaluation_markdown."""

import json
import os
from pathlib import Path

from chatgpt_recipes.runtime.cache import cache_dir

# matplotlib writes its font cache under ~/.cache and ~/.config; keep it in the cache the recipes name instead
os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Figures drawn automatically when their keys were logged: file -> (title, panels); a panel is a title and the
# keys drawn together on it (TRL's names: PPOTrainer objective/*, RLOOTrainer reward/kl/entropy, RewardTrainer
# accuracy/margin, DPOTrainer rewards/*). The RL figure needs a reward key, since SFT also logs `entropy`.
EXTRA_FIGURES = {
    "rl_curves.png": ("Reward, KL, entropy and answer length per update", [
        ("reward", ["objective/scores", "objective/rlhf_reward", "reward"]),
        ("KL to reference", ["objective/kl", "kl"]),
        ("policy entropy", ["objective/entropy", "entropy"]),
        ("answer length (tokens)", ["response_length", "completions/mean_length"]),
    ]),
    "preference_curves.png": ("Preference accuracy and margin", [
        ("pairwise accuracy", ["accuracy", "eval_accuracy", "rewards/accuracies", "eval_rewards/accuracies"]),
        ("margin", ["margin", "eval_margin", "rewards/margins", "eval_rewards/margins"]),
    ]),
}
REQUIRED_KEYS = {"rl_curves.png": ["objective/scores", "objective/rlhf_reward", "reward"]}


def _logged(log_history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(entry["step"], entry[key]) for entry in log_history
            if key in entry and "step" in entry and isinstance(entry[key], (int, float))]


def plot_series(log_history: list[dict], keys, path: str, title: str) -> bool:
    """One subplot per panel against the step: a panel is one key, or a (title, [keys]) pair drawn together
    (training and eval loss share one). False when none of the keys was logged."""
    panels = []
    for item in keys:
        name, group = (item, [item]) if isinstance(item, str) else (item[0], list(item[1]))
        present = [key for key in group if _logged(log_history, key)]
        if present:
            panels.append((name, present))
    if not panels:
        return False
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, present) in zip(axes.flat, panels):
        steps = set()
        for key in present:
            points = _logged(log_history, key)
            steps.update(p[0] for p in points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=key)
        if len(steps) <= 10:
            ax.set_xticks(sorted(steps))  # few updates: tick each one (a single step would get a fractional axis)
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(steps) > 10:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_training_report(output_dir: str, title: str, log_history: list[dict], metrics: dict,
                          sections: dict[str, str] | None = None,
                          plot_keys=(("loss", ["loss", "eval_loss"]),)) -> str:
    """report.md with the final metrics, extra sections (name -> markdown), a plot of the logged curves
    (`plot_keys`, see plot_series) and, when logged, the RL (reward, KL, entropy) and preference-accuracy curves."""
    os.makedirs(output_dir, exist_ok=True)
    lines = [f"# {title}", "", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in sorted(metrics.items())]
    if plot_series(log_history, list(plot_keys), os.path.join(output_dir, "training_curves.png"), title):
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    plotted = {key for item in plot_keys for key in ([item] if isinstance(item, str) else item[1])}
    for file_name, (figure_title, panels) in EXTRA_FIGURES.items():
        required = REQUIRED_KEYS.get(file_name)
        if required and not any(_logged(log_history, key) for key in required):
            continue
        if all(key in plotted for _, keys in panels for key in keys if _logged(log_history, key)):
            continue  # the caller's figure already shows every logged key of this one
        if plot_series(log_history, panels, os.path.join(output_dir, file_name), f"{title}: {figure_title}"):
            lines += ["", f"## {figure_title}", "", f"![{figure_title}]({file_name})"]
    for name, body in (sections or {}).items():
        lines += ["", f"## {name}", "", body]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "log_history.json"), "w") as f:
        json.dump(log_history, f, indent=1)
    return path


# Evaluation across models (evaluate_model.py) and stages (pipeline.py) -----------------------------------------

MODEL_COLUMNS = [("perplexity", "perplexity"), ("rm_score_mean", "mean RM score"), ("distinct_1", "distinct-1"),
                 ("distinct_2", "distinct-2"), ("token_entropy", "token entropy (nats)"),
                 ("answer_words", "mean answer words"), ("answer_tokens", "mean answer tokens"),
                 ("kl_to_reference", "KL to reference (nats)")]


def plot_model_comparison(models: dict[str, dict], path: str, title: str) -> bool:
    """Bars per model (in stage order) for each measured column: perplexity, RM score, diversity, entropy."""
    columns = [(key, label) for key, label in MODEL_COLUMNS if any(key in row for row in models.values())]
    if not columns:
        return False
    names = list(models)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    per_row = min(len(columns), 3)
    rows = -(-len(columns) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(max(3.6, 1.1 * len(names)) * per_row, 3.3 * rows + 0.4),
                             squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, columns):
        values = [models[name].get(key, float("nan")) for name in names]
        bars = ax.bar(names, values, color=[colors[i % len(colors)] for i in range(len(names))])
        ax.bar_label(bars, labels=[_format(v) for v in values], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelrotation=30 if len(names) > 3 else 0, labelsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_win_rates(win_rates: dict[str, dict], path: str, title: str) -> bool:
    """Horizontal bars of each 'A vs B' win-rate with its confidence interval and the 50% line."""
    if not win_rates:
        return False
    labels = list(win_rates)
    rates = [win_rates[k]["win_rate"] for k in labels]
    errors = [[r - win_rates[k]["ci_low"] for k, r in zip(labels, rates)],
              [win_rates[k]["ci_high"] - r for k, r in zip(labels, rates)]]
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.7 * len(labels)))
    ax.barh(labels, rates, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    for y, label in enumerate(labels):  # right of the interval, so it never sits on the bar's error line
        w = win_rates[label]
        ax.text(w["ci_high"] + 0.02, y, f"{w['win_rate']:.0%} (n={w['n']})", va="center", fontsize=9)
    ax.set_xlim(0, 1.2)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.invert_yaxis()
    ax.set_xlabel("fraction of prompts where the reward model prefers A (95% Wilson interval)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def evaluation_markdown(results: dict) -> str:
    """The evaluation tables: one row per model, one per win-rate pair, and the reward model's accuracy."""
    lines = []
    models = results.get("models", {})
    columns = [(key, label) for key, label in MODEL_COLUMNS if any(key in row for row in models.values())]
    if columns:
        lines += ["| model | path | " + " | ".join(label for _, label in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        lines += [f"| {name} | `{row['path']}` | " + " | ".join(_format(row.get(key, "")) for key, _ in columns) + " |"
                  for name, row in models.items()]
    if results.get("win_rates"):
        lines += ["", "| A vs B | win-rate of A | 95% interval | wins / ties / losses |", "|---|---|---|---|"]
        lines += [f"| {pair} | {w['win_rate']:.1%} | {w['ci_low']:.1%} – {w['ci_high']:.1%} | "
                  f"{w['wins']} / {w['ties']} / {w['losses']} |" for pair, w in results["win_rates"].items()]
    if results.get("reward_model_accuracy"):
        rm = results["reward_model_accuracy"]
        interval = f" (95% interval {rm['ci_low']:.1%} – {rm['ci_high']:.1%})" if "ci_low" in rm else ""
        lines += ["", f"Reward model on {rm['pairs']} held-out preference pairs: accuracy {rm['accuracy']:.1%}"
                  f"{interval}, margin {rm['margin_mean']:.3g} ± {rm['margin_std']:.3g}."]
    if results.get("kl_reference"):
        lines += ["", f"KL to reference: each model's mean KL to `{results['kl_reference']}` on its own sampled "
                  "answers, per token Schulman's k3, (r - 1) - log r with r = p_reference / p_model, summed over the "
                  "answer's tokens: never negative."]
    return "\n".join(lines)


def record_metrics(trainer, train_result, evaluate: bool) -> dict:
    """Log and save the train metrics, the final evaluation's (when there is an eval set; run here unless the
    trainer evaluated at the final step) and the trainer state; all metrics, for the report."""
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = dict(train_result.metrics)
    if evaluate:
        last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            # the evaluation the trainer ran at the final step: the same weights on the same rows
            eval_metrics = {key: value for key, value in last.items() if key != "step"}
        else:
            eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    return metrics


def save_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")

"""Reports: a markdown file and PNG plots next to each run's outputs."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_series(log_history: list[dict], keys: list[str], path: str, title: str) -> bool:
    """One subplot per logged key against the step; False when none of the keys was logged."""
    present = [key for key in keys if any(key in entry for entry in log_history)]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_training_report(output_dir: str, title: str, log_history: list[dict], metrics: dict,
                          sections: dict[str, str] | None = None,
                          plot_keys: list[str] = ("loss", "eval_loss")) -> str:
    """report.md with the final metrics, extra sections (name -> markdown) and a plot of the logged curves."""
    os.makedirs(output_dir, exist_ok=True)
    lines = [f"# {title}", "", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in sorted(metrics.items())]
    if plot_series(log_history, list(plot_keys), os.path.join(output_dir, "training_curves.png"), title):
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    for name, body in (sections or {}).items():
        lines += ["", f"## {name}", "", body]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "log_history.json"), "w") as f:
        json.dump(log_history, f, indent=1)
    return path

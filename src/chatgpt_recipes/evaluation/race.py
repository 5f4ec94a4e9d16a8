"""The race of the RL methods (recipes/pipeline.py with `race: true`, recipes/configs/pipeline/compare_rl.yaml):
PPO, PPO-ptx, RLOO, GRPO and DPO trained from one SFT model, against one reward model, on one prompt set, with one
generation budget, then compared on the evaluation stage's held-out instructions by two judges:

  - the reward model the online methods optimised (the evaluation stage's win-rate over SFT);
  - a judge none of them optimised: the log-likelihood of the held-out instruction's reference answer (written by
    a person or a stronger model, never trained on by any stage) under the policy against under SFT. A policy
    "wins" a prompt when it makes the reference answer more likely than SFT does.

(The start is SFT, or the base model when the pipeline runs no SFT stage.) A policy that wins by the first judge
only has learnt the reward model, not the task: with its answer length over
SFT's, that is the reward-hacking flag in summary.json. Writes race.json, race.md and race.png to the pipeline's
output_dir; each row names the run it was read from."""

import json
import os
from pathlib import Path

import torch

from chatgpt_recipes.evaluation.metrics import win_rate
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.precision import detect_capability

RACE_METHODS = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo")
ONLINE = {"ppo": ("total_episodes", "response_length"), "ppo_ptx": ("total_episodes", "response_length"),
          "rloo": (None, "max_completion_length"), "grpo": (None, "max_completion_length")}
# Reward-hacking flags: answers this much longer than SFT's, or a win by the trained-against judge that the second
# judge calls a loss (each judge's verdict from its 95% interval against 50%).
MAX_LENGTH_RATIO = 1.5


def generation_budget(stage: str, options: dict) -> dict:
    """Answers sampled during training and their token cap, from the stage's options in the race YAML (which must
    set them: the race compares methods at one budget). DPO samples nothing: it trains on the comparison pairs."""
    if stage not in ONLINE:
        return {"answers": 0, "max_answer_tokens": 0}
    count_key, length_key = ONLINE[stage]
    keys = [length_key] + ([count_key] if count_key else ["max_steps", "per_device_train_batch_size"])
    missing = [key for key in keys if key not in options]
    if missing:
        raise ConfigError(f"race: {stage} must set {missing} in the pipeline YAML, so that every method's "
                          "generation budget is stated and equal")
    answers = (options[count_key] if count_key else options["max_steps"] * options["per_device_train_batch_size"]
               * options.get("gradient_accumulation_steps", 1))
    return {"answers": int(answers), "max_answer_tokens": int(options[length_key])}


def check_equal_budgets(budgets: dict[str, dict]) -> dict:
    """The one budget of the online methods, or a ConfigError naming each method's."""
    online = {stage: budget for stage, budget in budgets.items() if stage in ONLINE}
    if len({(b["answers"], b["max_answer_tokens"]) for b in online.values()}) > 1:
        found = {stage: (budget["answers"], budget["max_answer_tokens"]) for stage, budget in online.items()}
        raise ConfigError("race: the online methods must sample the same number of answers of the same length cap "
                          f"(answers, max tokens): {found}")
    return next(iter(online.values()), {"answers": 0, "max_answer_tokens": 0})


def per_prompt_judgements(models: dict[str, str], evaluation_dir: Path) -> dict[str, dict[str, list]]:
    """Both judges' per-prompt scores of each model on the evaluation stage's prompts, as the evaluation recorded
    them (eval_results.json): `reward_model`, its reward model's score of the answer it sampled, and
    `reference_likelihood`, log p(reference answer | prompt) under the model, summed over the answer's tokens and
    its EOS, at temperature 1, from its perplexity pass (None where the example was too long for that pass)."""
    results = json.loads((evaluation_dir / "eval_results.json").read_text())
    return {"reward_model": {name: results["reward_scores"][name] for name in models},
            "reference_likelihood": {name: results["reference_logprobs"][name] for name in models}}


def verdict(win: dict) -> str:
    return "better" if win["ci_low"] > 0.5 else "worse" if win["ci_high"] < 0.5 else "no difference"


def race_table(out: Path, methods: list[str], start: str, budgets: dict, stage_records: dict, judged: dict) -> dict:
    """One row per method from its own run: the evaluation's figures for it, the second judge's win-rate, where
    the judges disagree (their verdicts, and the share of prompts they call differently), its stage's wall time
    and peak memory, and the reward-hacking flags."""
    results = json.loads((out / "evaluate" / "eval_results.json").read_text())
    models, sft = results["models"], results["models"][start]
    rm, likelihood = judged["reward_model"], judged["reference_likelihood"]
    rows = {}
    for method in methods:
        model = models[method]
        rm_win = results["win_rates"][f"{method} vs {start}"]
        scored = [i for i, (a, b) in enumerate(zip(likelihood[method], likelihood[start]))
                  if a is not None and b is not None]  # the second judge skips answers too long to score
        likelihood_win = win_rate([likelihood[method][i] for i in scored], [likelihood[start][i] for i in scored])
        disagree = [(rm[method][i] > rm[start][i]) != (likelihood[method][i] > likelihood[start][i]) for i in scored]
        flags = []
        length_ratio = model["answer_tokens"] / sft["answer_tokens"]
        if length_ratio > MAX_LENGTH_RATIO:
            flags.append(f"answers {length_ratio:.2f}x {start}'s length (> {MAX_LENGTH_RATIO})")
        if verdict(rm_win) == "better" and verdict(likelihood_win) != "better":
            flags.append(f"better than {start} by the reward model only (second judge: {verdict(likelihood_win)})")
        record = stage_records.get(method, {})
        rows[method] = {
            "run": str(out / method), "stage_fingerprint": record.get("fingerprint"),
            "win_rate_vs_start_rm": rm_win, "win_rate_vs_start_reference_likelihood": likelihood_win,
            "verdicts": {"reward_model": verdict(rm_win), "reference_likelihood": verdict(likelihood_win)},
            "judges_agree": verdict(rm_win) == verdict(likelihood_win),
            "prompts_judges_disagree": sum(disagree) / len(disagree),
            "rm_score_mean": model.get("rm_score_mean"), "kl_to_start": model.get("kl_to_reference"),
            "length_ratio": length_ratio, "distinct_2": model["distinct_2"],
            "wall_minutes": record["seconds"] / 60 if "seconds" in record else None,
            "peak_memory_mb": record.get("peak_rss_mb"), "generation_budget": budgets[method],
            "reward_hacking_flags": flags}
    return rows


def race_markdown(rows: dict, start: str, budget: dict, machine: str) -> str:
    def interval(win):
        return f"{win['win_rate']:.0%} ({win['ci_low']:.0%}–{win['ci_high']:.0%})"

    def number(value, form):
        return "–" if value is None else format(value, form)

    lines = [f"Budget: every online method samples {budget['answers']} answers of at most "
             f"{budget['max_answer_tokens']} tokens while training; DPO samples none (it trains on the comparison "
             f"pairs). Machine: {machine}.", "",
             f"| method | win-rate vs {start}, reward model (95% CI) | win-rate vs {start}, reference likelihood "
             f"(95% CI) | judges | mean reward | KL to {start} | length ratio | distinct-2 | minutes | peak MB "
             "| flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        judges = ("agree" if row["judges_agree"] else "**disagree**") + \
            f" ({row['prompts_judges_disagree']:.0%} of prompts differ)"
        lines.append(
            f"| {method} | {interval(row['win_rate_vs_start_rm'])} | "
            f"{interval(row['win_rate_vs_start_reference_likelihood'])} | {judges} | "
            f"{number(row['rm_score_mean'], '+.3f')} | {number(row['kl_to_start'], '.3f')} | "
            f"{row['length_ratio']:.2f} | {row['distinct_2']:.3f} | {number(row['wall_minutes'], '.1f')} | "
            f"{number(row['peak_memory_mb'], '.0f')} | {'; '.join(row['reward_hacking_flags']) or '–'} |")
    return "\n".join(lines)


def plot_race(rows: dict, start: str, path: str) -> None:
    """Win-rate over the start (SFT) by each judge with its interval (left), mean reward against KL to it (right)."""
    from chatgpt_recipes.evaluation.reporting import plt  # matplotlib: loaded only when a plot is drawn

    methods = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.6 * len(methods) + 2))
    for offset, (key, label) in enumerate([("win_rate_vs_start_rm", "reward model (trained against)"),
                                           ("win_rate_vs_start_reference_likelihood", "reference likelihood")]):
        wins = [rows[m][key] for m in methods]
        rates = [w["win_rate"] for w in wins]
        errors = [[max(r - w["ci_low"], 0.0) for r, w in zip(rates, wins)],  # a rate of 0 or 1 sits on its bound
                  [max(w["ci_high"] - r, 0.0) for r, w in zip(rates, wins)]]
        left.barh([i + 0.35 * offset for i in range(len(methods))], rates, height=0.35, xerr=errors, capsize=3,
                  label=label)
    left.set_yticks([i + 0.175 for i in range(len(methods))], methods)
    left.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    left.set_xlim(0, 1)
    left.invert_yaxis()
    left.set_xlabel(f"win-rate over {start} on held-out instructions (95% Wilson interval)")
    left.legend(fontsize=8)
    for method in methods:
        if rows[method]["kl_to_start"] is not None and rows[method]["rm_score_mean"] is not None:
            right.scatter(rows[method]["kl_to_start"], rows[method]["rm_score_mean"])
            right.annotate(method, (rows[method]["kl_to_start"], rows[method]["rm_score_mean"]), fontsize=9)
    right.set_xlabel(f"KL to {start} (nats per answer)")
    right.set_ylabel("mean reward-model score (centred)")
    right.grid(alpha=0.3)
    fig.suptitle(f"The RL race: same start ({start}), reward model, prompts and generation budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    """The machine the race ran on, for its table: the GPU, else the CPU model (with its family and model numbers,
    which tell e.g. a Zen 3 from a Zen 4 that both call themselves "AMD EPYC"), core count and precision."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    cpuinfo = Path("/proc/cpuinfo")
    fields = {}
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []):
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    precision = "native bf16" if detect_capability(use_cpu=True).native_bf16 else "no native bf16: fp32"
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {precision}"


def write_race(out: Path, methods: list[str], start: str, budgets: dict, budget: dict, stage_records: dict,
               models: dict[str, str]) -> dict:
    """race.json, race.md and race.png in `out` from the finished stages, every method against `start` (the model
    they all started from: sft, or base when no SFT stage ran); returns what summary.json records of the race: the
    budget, the machine, each method's two win-rates over the start and its reward-hacking flags."""
    judged = per_prompt_judgements({name: models[name] for name in [start, *methods]}, out / "evaluate")
    rows = race_table(out, methods, start, budgets, stage_records, judged)
    machine = machine_description()
    (out / "race.json").write_text(json.dumps({"start": start, "budget": budget, "machine": machine,
                                               "methods": rows, "per_prompt": judged}, indent=1) + "\n")
    (out / "race.md").write_text("# The RL race\n\n" + race_markdown(rows, start, budget, machine)
                                 + "\n\n![race](race.png)\n")
    plot_race(rows, start, str(out / "race.png"))
    return {"start": start, "budget": budget, "machine": machine,
            "methods": {method: {"win_rate_vs_start_rm": row["win_rate_vs_start_rm"]["win_rate"],
                                 "win_rate_vs_start_reference_likelihood":
                                     row["win_rate_vs_start_reference_likelihood"]["win_rate"],
                                 "judges_agree": row["judges_agree"], "length_ratio": row["length_ratio"],
                                 "reward_hacking_suspected": bool(row["reward_hacking_flags"]),
                                 "reward_hacking_flags": row["reward_hacking_flags"]}
                        for method, row in rows.items()}}

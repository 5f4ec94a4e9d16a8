"""The race of the RL methods (recipes/pipeline.py with `race: true`, recipes/configs/pipeline/compare_rl.yaml):
PPO, PPO-ptx, RLOO, GRPO and DPO trained from one SFT model, against one reward model with one treatment of an
answer that does not end, on one prompt set, with one generation budget counted as it is spent, then compared on
the evaluation stage's held-out instructions by three judges, none of them neutral in the same way:

  - the reward model the online methods optimised (trained on the comparison pairs, whose chosen answers are the
    reference answers; DPO trains on those same pairs);
  - the judge: a second reward model trained on human preference data that no stage of the race trains on
    (data/dpo_en_demo.json by default), or any reward model given by name (`judge_model`). No method optimised it;
    its accuracy on its own held-out pairs is in the table's header;
  - the reference likelihood: log p(reference answer | prompt) under the policy against under SFT. DPO and the
    reward model are trained towards the references, so it is a diagnostic, not an independent judge.

(The start is SFT, or the base model when the pipeline runs no SFT stage.) A judge whose held-out accuracy is below
MIN_JUDGE_ACCURACY calls no method better or worse ("inconclusive"). A policy better by the reward model and not by
the judge, one whose answers grew past 1.5x SFT's (the evaluation gives answers room beyond the training cap), and
one whose KL to SFT blew up are flagged (reward_hacking_flags in summary.json). Writes race.json, race.md and
race.png to the pipeline's output_dir; each row names the run it was read from."""

import json
import math
import os
from pathlib import Path

import torch

from chatgpt_recipes.evaluation.metrics import win_rate
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.precision import detect_capability

RACE_METHODS = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo")
ONLINE = ("ppo", "ppo_ptx", "rloo", "grpo")
# Reward-hacking flags: answers this much longer than SFT's; a KL to SFT above this many nats per answer (the
# policy's own answers became e^10 times likelier under it than under SFT: the KL penalty did not hold it).
MAX_LENGTH_RATIO, MAX_KL_NATS = 1.5, 10.0
# A judge (the reward model or the judge) below this accuracy on its held-out pairs calls nothing better or worse:
# the pipeline's check of the reward model (recipes/pipeline.py MIN_RM_ACCURACY).
MIN_JUDGE_ACCURACY = 0.65
LIKELIHOOD_LABEL = "reference likelihood (DPO and the reward model are trained towards references)"


def generation_budget(stage: str, settings: dict, num_processes: int) -> dict:
    """What an online method samples while training, counted as its trainer spends it, from the stage's settings
    (its recipe YAML under the race YAML's options): `answers`, all processes and iterations together; `prompts`,
    the prompt draws they answer (an RLOO/GRPO prompt is answered num_generations times); `max_answer_tokens`.
    PPO: TRL runs ceil(total_episodes / global batch) updates of one answer per prompt each (num_ppo_epochs reuses
    them). RLOO and GRPO: a generation batch of per_device_train_batch_size x processes x steps_per_generation
    answers every steps_per_generation x num_iterations micro-steps (num_iterations reuses it), over max_steps x
    gradient_accumulation_steps micro-steps. DPO samples nothing: it trains on the comparison pairs."""
    if stage not in ONLINE:
        return {"answers": 0, "prompts": 0, "max_answer_tokens": 0}
    accumulation = int(settings.get("gradient_accumulation_steps", 1))
    if stage in ("ppo", "ppo_ptx"):
        global_batch = int(settings["per_device_train_batch_size"]) * accumulation * num_processes
        answers = math.ceil(int(settings["total_episodes"]) / global_batch) * global_batch
        return {"answers": answers, "prompts": answers, "max_answer_tokens": int(settings["response_length"])}
    if int(settings.get("max_steps", -1)) <= 0:
        raise ConfigError(f"race: {stage} must set max_steps > 0 (its generation budget), not "
                          f"{settings.get('max_steps', -1)}")
    per_generation_steps = int(settings.get("steps_per_generation") or accumulation)
    generations = math.ceil(int(settings["max_steps"]) * accumulation
                            / (per_generation_steps * int(settings.get("num_iterations", 1))))
    answers = generations * int(settings["per_device_train_batch_size"]) * num_processes * per_generation_steps
    return {"answers": answers, "prompts": answers // int(settings["num_generations"]),
            "max_answer_tokens": int(settings["max_completion_length"])}


def check_equal_budgets(budgets: dict[str, dict]) -> dict:
    """The one budget of the online methods (answers sampled, all processes and iterations, and their length cap),
    or a ConfigError naming each method's. Prompts may differ: at equal answers a group method answers fewer."""
    online = {stage: budget for stage, budget in budgets.items() if stage in ONLINE}
    if len({(b["answers"], b["max_answer_tokens"]) for b in online.values()}) > 1:
        found = {stage: (budget["answers"], budget["max_answer_tokens"]) for stage, budget in online.items()}
        raise ConfigError("race: the online methods must sample the same number of answers (all processes and "
                          f"iterations) of the same length cap (answers, max tokens): {found}")
    return next(iter(online.values()), {"answers": 0, "prompts": 0, "max_answer_tokens": 0})


def check_same_reward(treatments: dict[str, dict]) -> None:
    """Every online method must treat an answer that does not end alike: the same missing_eos_penalty, and none
    masking truncated answers out of its loss (TRL's mask_truncated_completions, which PPO lacks). A ConfigError
    names each method's treatment."""
    if len({json.dumps(t, sort_keys=True) for t in treatments.values()}) > 1:
        raise ConfigError("race: the online methods must optimise one reward, with the same treatment of an answer "
                          f"that does not end (set missing_eos_penalty once, for the pipeline): {treatments}")


def per_prompt_judgements(models: dict[str, str], evaluation_dir: Path) -> dict[str, dict[str, list]]:
    """Each judge's per-prompt scores of each model on the evaluation stage's prompts, as the evaluation recorded
    them (eval_results.json): `reward_model`, the reward model's score of the answer the model sampled; `judge`, the
    judge's; `reference_likelihood`, log p(reference answer | prompt) under the model, summed over the answer's
    tokens and its EOS, at temperature 1, from its perplexity pass (None where the example was too long for it)."""
    results = json.loads((evaluation_dir / "eval_results.json").read_text())
    judged = {"reward_model": {name: results["reward_scores"][name] for name in models},
              "reference_likelihood": {name: results["reference_logprobs"][name] for name in models}}
    if "judge_scores" in results:
        judged["judge"] = {name: results["judge_scores"][name] for name in models}
    return judged


def verdict(win: dict, judge_accuracy: float | None = None) -> str:
    """better / worse / no difference from the win-rate's interval against 50%; inconclusive when the judge's
    held-out accuracy is known and below MIN_JUDGE_ACCURACY."""
    if judge_accuracy is not None and judge_accuracy < MIN_JUDGE_ACCURACY:
        return "inconclusive"
    return "better" if win["ci_low"] > 0.5 else "worse" if win["ci_high"] < 0.5 else "no difference"


def _scored_win(mine: list, theirs: list) -> tuple[dict, list[int]]:
    scored = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a is not None and b is not None]
    return win_rate([mine[i] for i in scored], [theirs[i] for i in scored]), scored


def race_table(out: Path, methods: list[str], start: str, budgets: dict, stage_records: dict, judged: dict) -> dict:
    """One row per method from its own run: each judge's win-rate over the start and verdict, the share of prompts
    the reward model and the judge call differently, its KL to the start, length and diversity, its stage's wall
    time and peak memory, its counted budget, and the reward-hacking flags."""
    results = json.loads((out / "evaluate" / "eval_results.json").read_text())
    models, sft = results["models"], results["models"][start]
    accuracy = {"reward_model": (results.get("reward_model_accuracy") or {}).get("accuracy"),
                "judge": (results.get("judge_accuracy") or {}).get("accuracy")}
    rows = {}
    for method in methods:
        model = models[method]
        wins = {judge: _scored_win(scores[method], scores[start])[0] for judge, scores in judged.items()}
        verdicts = {judge: verdict(win, accuracy.get(judge)) for judge, win in wins.items()}
        flags = []
        length_ratio = model["answer_tokens"] / sft["answer_tokens"]
        if length_ratio > MAX_LENGTH_RATIO:
            flags.append(f"answers {length_ratio:.2f}x {start}'s length (> {MAX_LENGTH_RATIO})")
        if verdicts["reward_model"] == "better" and verdicts.get("judge") != "better":
            flags.append(f"better than {start} by the reward model only (judge: {verdicts.get('judge', 'none')})")
        kl = model.get("kl_to_reference")
        if kl is not None and kl > MAX_KL_NATS:
            flags.append(f"KL to {start} {kl:.1f} nats per answer (> {MAX_KL_NATS:g}): the KL penalty did not hold")
        disagree = None
        if "judge" in judged:
            rm, judge = judged["reward_model"], judged["judge"]
            differs = [(rm[method][i] > rm[start][i]) != (judge[method][i] > judge[start][i])
                       for i in range(len(rm[start]))]
            disagree = sum(differs) / len(differs)
        record = stage_records.get(method, {})
        rows[method] = {
            "run": str(out / method), "stage_fingerprint": record.get("fingerprint"),
            "win_rates_vs_start": wins, "verdicts": verdicts, "prompts_rm_and_judge_disagree": disagree,
            "rm_score_mean": model.get("rm_score_mean"), "judge_score_mean": model.get("judge_score_mean"),
            "kl_to_start": kl, "length_ratio": length_ratio, "distinct_2": model["distinct_2"],
            "wall_minutes": record["seconds"] / 60 if "seconds" in record else None,
            "peak_memory_mb": record.get("peak_rss_mb"), "generation_budget": budgets[method],
            "reward_hacking_flags": flags}
    return rows


def race_header(results: dict, start: str, budget: dict, machine: str) -> list[str]:
    """Who judged and how well each judge does on pairs it never trained on; a judge below MIN_JUDGE_ACCURACY is
    named inconclusive in bold. The budget, counted per method in the table."""
    def judge_line(label: str, accuracy: dict | None, what: str) -> str:
        if not accuracy:
            return f"{label}: {what}; held-out accuracy not measured."
        line = (f"{label}: {what}; {accuracy['accuracy']:.1%} on {accuracy['pairs']} held-out pairs "
                f"({accuracy['ci_low']:.0%}–{accuracy['ci_high']:.0%}).")
        if accuracy["accuracy"] < MIN_JUDGE_ACCURACY:
            line += (f" **inconclusive: {label.lower()} at {accuracy['accuracy']:.0%}** (below "
                     f"{MIN_JUDGE_ACCURACY:.0%}): it calls no method better or worse.")
        return line

    lines = [judge_line("Reward model", results.get("reward_model_accuracy"), "optimised by the online methods")]
    if "judge_scores" in results:
        lines.append(judge_line("Judge", results.get("judge_accuracy"),
                                f"`{results.get('judge_model')}`, which no method optimised"))
    else:
        lines.append("Judge: none (set judge_model or run the judge stage).")
    lines.append(f"Budget: every online method samples {budget['answers']} answers of at most "
                 f"{budget['max_answer_tokens']} tokens while training, all processes and iterations counted; the "
                 "group methods answer each prompt several times, so they see fewer prompts (table). DPO samples "
                 f"none (it trains on the comparison pairs). KL: per-token k3 estimate on the held-out prompts. "
                 f"Start: {start}. Machine: {machine}.")
    return [line + "\n" for line in lines]


def race_markdown(rows: dict, start: str, results: dict, budget: dict, machine: str) -> str:
    def cell(row, judge):
        if judge not in row["win_rates_vs_start"]:
            return "–"
        win = row["win_rates_vs_start"][judge]
        return f"{win['win_rate']:.0%} ({win['ci_low']:.0%}–{win['ci_high']:.0%}): {row['verdicts'][judge]}"

    def number(value, form):
        return "–" if value is None else format(value, form)

    lines = race_header(results, start, budget, machine) + [
        f"| method | answers / prompts sampled | win-rate vs {start}, reward model (95% CI) | win-rate vs {start}, "
        f"judge (95% CI) | win-rate vs {start}, {LIKELIHOOD_LABEL} (95% CI) | RM and judge differ on | mean reward "
        f"| KL to {start} (nats/answer) | length ratio | distinct-2 | minutes | peak MB | flags |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        budget_cell = (f"{row['generation_budget']['answers']} / {row['generation_budget']['prompts']}"
                       if row["generation_budget"]["answers"] else "0 (comparison pairs)")
        disagree = row["prompts_rm_and_judge_disagree"]
        differ = "–" if disagree is None else f"{disagree:.0%}"
        lines.append(
            f"| {method} | {budget_cell} | {cell(row, 'reward_model')} | {cell(row, 'judge')} | "
            f"{cell(row, 'reference_likelihood')} | {differ} | {number(row['rm_score_mean'], '+.3f')} | "
            f"{number(row['kl_to_start'], '.3f')} | {row['length_ratio']:.2f} | {row['distinct_2']:.3f} | "
            f"{number(row['wall_minutes'], '.1f')} | {number(row['peak_memory_mb'], '.0f')} | "
            f"{'; '.join(row['reward_hacking_flags']) or '–'} |")
    return "\n".join(lines)


def plot_race(rows: dict, start: str, path: str) -> None:
    """Win-rate over the start (SFT) by each judge with its interval (left), mean reward against KL to it (right)."""
    from chatgpt_recipes.evaluation.reporting import plt  # matplotlib: loaded only when a plot is drawn

    methods = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.6 * len(methods) + 2))
    labels = {"reward_model": "reward model (optimised by the online methods)",
              "judge": "judge (optimised by no method)",
              "reference_likelihood": "reference likelihood (DPO, RM trained towards)"}
    judges = [(key, label) for key, label in labels.items() if key in rows[methods[0]]["win_rates_vs_start"]]
    height = 0.8 / len(judges)
    for offset, (key, label) in enumerate(judges):
        wins = [rows[m]["win_rates_vs_start"][key] for m in methods]
        rates = [w["win_rate"] for w in wins]
        errors = [[max(r - w["ci_low"], 0.0) for r, w in zip(rates, wins)],  # a rate of 0 or 1 sits on its bound
                  [max(w["ci_high"] - r, 0.0) for r, w in zip(rates, wins)]]
        left.barh([i + height * offset for i in range(len(methods))], rates, height=height, xerr=errors, capsize=3,
                  label=label)
    left.set_yticks([i + height * (len(judges) - 1) / 2 for i in range(len(methods))], methods)
    left.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    left.set_xlim(0, 1)
    left.invert_yaxis()
    left.set_xlabel(f"win-rate over {start} on held-out instructions (95% Wilson interval)")
    left.legend(fontsize=8)
    for method in methods:
        if rows[method]["kl_to_start"] is not None and rows[method]["rm_score_mean"] is not None:
            right.scatter(rows[method]["kl_to_start"], rows[method]["rm_score_mean"])
            right.annotate(method, (rows[method]["kl_to_start"], rows[method]["rm_score_mean"]), fontsize=9)
    right.set_xlabel(f"KL to {start} (nats per answer, k3)")
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
    budget, the machine, the judges' held-out accuracies, each method's win-rates over the start by each judge,
    verdicts and reward-hacking flags."""
    judged = per_prompt_judgements({name: models[name] for name in [start, *methods]}, out / "evaluate")
    results = json.loads((out / "evaluate" / "eval_results.json").read_text())
    rows = race_table(out, methods, start, budgets, stage_records, judged)
    machine = machine_description()
    accuracies = {"reward_model": results.get("reward_model_accuracy"), "judge": results.get("judge_accuracy"),
                  "judge_model": results.get("judge_model")}
    (out / "race.json").write_text(json.dumps({"start": start, "budget": budget, "machine": machine, **accuracies,
                                               "methods": rows, "per_prompt": judged}, indent=1) + "\n")
    (out / "race.md").write_text("# The RL race\n\n" + race_markdown(rows, start, results, budget, machine)
                                 + "\n\n![race](race.png)\n")
    plot_race(rows, start, str(out / "race.png"))
    return {"start": start, "budget": budget, "machine": machine,
            "reward_model_accuracy": (accuracies["reward_model"] or {}).get("accuracy"),
            "judge_accuracy": (accuracies["judge"] or {}).get("accuracy"), "judge_model": accuracies["judge_model"],
            "methods": {method: {"win_rates_vs_start": {judge: win["win_rate"]
                                                        for judge, win in row["win_rates_vs_start"].items()},
                                 "verdicts": row["verdicts"], "generation_budget": row["generation_budget"],
                                 "length_ratio": row["length_ratio"], "kl_to_start": row["kl_to_start"],
                                 "reward_hacking_suspected": bool(row["reward_hacking_flags"]),
                                 "reward_hacking_flags": row["reward_hacking_flags"]}
                        for method, row in rows.items()}}

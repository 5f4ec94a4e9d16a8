"""Reward-model accuracy on the same data: stock TRL RewardTrainer against recipes/reward_model.py, trained on the
same training rows with the same LoRA, epochs, batch and learning rate, and scored by the same code on the
identical held-out pairs, every one of them.

    python benchmarks/rm_accuracy.py                          # the full default: one seed, every row of the sample
    python benchmarks/rm_accuracy.py --seeds 3                # mean and spread over seeds 42, 43, 44
    python benchmarks/rm_accuracy.py --train_rows 48 --eval_rows 48 --max_steps 3 --max_length 128 \
        --centering_samples 8                                  # small: 5-15 minutes on 2 busy CPU cores
    python benchmarks/rm_accuracy.py --models recipe --recipe_args "--system_prompt ''"   # a variant, recipe only

Data: Anthropic HH-RLHF transcripts {chosen, rejected} (default data/hh_rlhf_harmless_sample.jsonl.gz, 1,500 rows).
Split (fixed, seed-free): rows are grouped by their opening Human turn, the groups ordered by the SHA-256 of that
turn, and whole groups go to the held-out side until it has --eval_rows rows; so a prompt is never on both sides.
--train_rows keeps the first N training rows in file order. Both held-out and training rows are written to
--output_dir (eval.jsonl, train.jsonl).

  stock   TRL's RewardTrainer as its docs show it: the raw "\\n\\nHuman: ... \\n\\nAssistant: ..." text, SmolLM2's own
          tokenizer (its pad token is its EOS), TRL's filter of rows longer than max_length, a PEFT LoraConfig on all
          linear layers; rank, alpha, dropout, epochs, max_steps, batch, learning rate, schedule, warmup, max_length,
          seed and precision taken from the recipe's config.
  recipe  recipes/reward_model.py's main() with --config (default recipes/configs/reward/smollm2_hh_lora.yaml)
          plus --recipe_args, trained on every training row (eval_split_size 0: the benchmark evaluates).

Evaluation: every held-out pair but the malformed ones (no final Assistant answer; skipped for both models and
counted), scored by chatgpt_recipes.evaluation.metrics.reward_scores. The recipe's model reads its pair as it was trained
(its rendering, cut from the left to max_length); the stock model reads the raw transcript + EOS, its oldest
tokens cut when longer than max_length (TRL has no rule for them: it drops them from training). Accuracy counts a
tie as half, with a 95% Wilson interval; the paired difference has an exact McNemar p-value and a paired bootstrap
95% interval (2,000 resamples). Seconds: wall time of training (model load, data, training, for the recipe also
its centring and save) and of scoring, on whatever else the machine runs.
"""

import argparse
import gc
import gzip
import hashlib
import json
import math
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chatgpt_recipes.cli import parse_config  # noqa: E402
from chatgpt_recipes.data.preferences import ranking_of, ranking_sequences, truncation_counts  # noqa: E402
from chatgpt_recipes.evaluation.metrics import pairwise_accuracy, reward_scores  # noqa: E402
from chatgpt_recipes.modeling.loading import ModelArguments, load_tokenizer, resolve_model_path  # noqa: E402
from chatgpt_recipes.runtime.errors import RowError  # noqa: E402
from chatgpt_recipes.training.reward import load_reward_model  # noqa: E402

from bench_utils import machine, recipe_module, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "recipes" / "configs" / "reward" / "smollm2_hh_lora.yaml"


def read_rows(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def opening_turn(row: dict) -> str:
    return row["chosen"].split("\n\nAssistant:")[0].strip()


def split_by_prompt(rows: list[dict], eval_rows: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): whole opening-turn groups, in SHA-256 order, to the held-out side."""
    groups = {}
    for row in rows:
        groups.setdefault(opening_turn(row), []).append(row)
    held_out = set()
    for key in sorted(groups, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if sum(len(groups[k]) for k in held_out) >= eval_rows:
            break
        held_out.add(key)
    return ([r for r in rows if opening_turn(r) not in held_out], [r for r in rows if opening_turn(r) in held_out])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def recipe_config(config_file: str, data: Path, output_dir: Path, seed: int, args, extra: list[str]):
    reward_model = recipe_module("reward_model")
    options = ["--config", config_file, "--dataset_name", str(data), "--eval_split_size", "0", "--output_dir",
               str(output_dir), "--seed", str(seed), "--eval_strategy", "no", "--save_strategy", "no",
               "--report_to", "none"]
    if args.max_steps:
        options += ["--max_steps", str(args.max_steps)]
    return parse_config((reward_model.RewardRecipeConfig, ModelArguments), "", options + extra)


def train_recipe(config, model_args) -> float:
    shutil.rmtree(config.output_dir, ignore_errors=True)
    start = time.perf_counter()
    recipe_module("reward_model").main(config, model_args)
    return time.perf_counter() - start


def train_stock(config, model_args, train_rows: list[dict], output_dir: Path):
    """Stock TRL: RewardTrainer on the raw transcripts, settings shared with the recipe. Returns (model,
    tokenizer, seconds)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    shared = {name: getattr(config, name) for name in (
        "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
        "learning_rate", "lr_scheduler_type", "warmup_steps", "max_length", "seed", "bf16", "use_cpu",
        "logging_steps", "center_rewards_coefficient", "gradient_checkpointing")}
    args = RewardConfig(output_dir=str(output_dir), report_to="none", save_strategy="no", eval_strategy="no",
                        **shared)
    peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules="all-linear", task_type="SEQ_CLS")
    dataset = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in train_rows])
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    trained_on = len(trainer.train_dataset)
    trainer.train()
    model = trainer.model.merge_and_unload().eval()
    return model, tokenizer, time.perf_counter() - start, trained_on


def eval_pairs(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows kept, their rankings, skipped rows {row, reason}) of the held-out rows."""
    kept, rankings, skipped = [], [], []
    for number, row in enumerate(rows, start=1):
        try:
            rankings.append(ranking_of(row, f"eval.jsonl: row {number}"))
            kept.append(row)
        except RowError as error:
            skipped.append({"row": number, "reason": error.reason})
    return kept, rankings, skipped


def score(model, pad_token_id: int, pairs: list[tuple[list[int], list[int]]], batch_size: int):
    with torch.no_grad():
        chosen = reward_scores(model, [c for c, _ in pairs], pad_token_id, batch_size)
        rejected = reward_scores(model, [r for _, r in pairs], pad_token_id, batch_size)
    return chosen, rejected


def recipe_pairs(output_dir: str, config, rankings: list[dict]):
    """(tokenizer, one (chosen ids, rejected ids) pair per ranking, how many were cut to max_length)."""
    tokenizer = load_tokenizer(output_dir)
    pairs, cuts = [], []
    for ranking in rankings:
        (chosen, rejected), cut = ranking_sequences(ranking, tokenizer, config.prompt_format, config.max_length,
                                                    "truncate", config.system_prompt)
        pairs.append((chosen, rejected))
        cuts.append(cut)
    return tokenizer, pairs, truncation_counts(cuts)


def stock_pairs(tokenizer, rows: list[dict], max_length: int):
    def ids(text):
        return tokenizer(text + tokenizer.eos_token)["input_ids"][-max_length:]

    return [(ids(r["chosen"]), ids(r["rejected"])) for r in rows]


def correct(chosen, rejected) -> list[float]:
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]


def mcnemar_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided McNemar test on the pairs exactly one model ranks right (ties left out)."""
    only_a = sum(x == 1.0 and y == 0.0 for x, y in zip(a, b))
    only_b = sum(x == 0.0 and y == 1.0 for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng, n = random.Random(seed), len(a)
    differences = sorted(sum(a[i] - b[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(rounds))
    return differences[int(0.025 * rounds)], differences[int(0.975 * rounds) - 1]


def truncation_table(rows: list[dict], model_name: str) -> list[dict]:
    """What each rendering keeps at each max_length: how many of `rows` are cut, and how (no training)."""
    from chatgpt_recipes.data.preferences import read_rankings

    tokenizer = load_tokenizer(model_name)
    rankings = read_rankings(rows, "rows")
    table = []
    for system_prompt, rendering in ((None, "chat template, its default system prompt"),
                                     ("", "chat template, empty system turn")):
        for max_length in (256, 512):
            cuts = [ranking_sequences(ranking, tokenizer, "chat", max_length, "truncate", system_prompt)[1]
                    for ranking in rankings]
            counts = truncation_counts(cuts)
            table.append({"rendering": rendering, "max_length": max_length, "pairs": len(rankings),
                          "longer": counts.pop("truncated"), **counts})
    raw = [len(tokenizer(r["chosen"] + tokenizer.eos_token)["input_ids"]) for r in rows]
    for max_length in (256, 512):
        table.append({"rendering": "raw HH text (stock TRL)", "max_length": max_length, "pairs": len(rows),
                      "longer": sum(n > max_length for n in raw)})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data" / "hh_rlhf_harmless_sample.jsonl.gz"))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe's YAML")
    parser.add_argument("--recipe_args", default="", help="overrides of the recipe's options, e.g. \"--lora_r 32\"")
    parser.add_argument("--eval_rows", type=int, default=300, help="held-out rows (whole prompt groups)")
    parser.add_argument("--train_rows", type=int, default=None, help="the first N training rows (default: all)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop both trainings after N steps")
    parser.add_argument("--max_length", type=int, default=None,
                        help="both models' max_length (default: the config's); passed to the recipe as --max_length")
    parser.add_argument("--centering_samples", type=int, default=None,
                        help="the recipe's centering_samples (fewer: a faster small run); passed on as is")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 42, 43, ...: mean and spread")
    parser.add_argument("--models", nargs="+", default=["stock", "recipe"], choices=["stock", "recipe"])
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--output_dir", default="outputs/rm_accuracy")
    parser.add_argument("--truncation_only", action="store_true",
                        help="only count, per rendering and max_length, the rows that are cut (no training)")
    args = parser.parse_args()
    if args.truncation_only:
        print("| rendering | max_length | pairs | longer than max_length | cut: oldest turns dropped | "
              "last prompt cut at its start | answer cut at its end |\n|---|---|---|---|---|---|---|")
        for row in truncation_table(read_rows(args.data), "smollm2-135m-instruct"):
            print(f"| {row['rendering']} | {row['max_length']} | {row['pairs']} | {row['longer']} | "
                  f"{row.get('turns_dropped', '-')} | {row.get('prompt_cut', '-')} | {row.get('answer_cut', '-')} |")
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, held_out = split_by_prompt(read_rows(args.data), args.eval_rows)
    train_rows = train_rows[: args.train_rows] if args.train_rows else train_rows
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", held_out)
    kept, rankings, skipped = eval_pairs(held_out)
    print(f"[split] {len(train_rows)} training rows, {len(held_out)} held-out rows ({len(skipped)} malformed, "
          f"skipped for both: {skipped}); no opening turn on both sides", flush=True)

    extra = [item for name in ("max_length", "centering_samples") if getattr(args, name) is not None
             for item in (f"--{name}", str(getattr(args, name)))] + shlex.split(args.recipe_args)
    results = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": machine(), "versions": versions(),
               "train_rows": len(train_rows), "eval_rows": len(held_out), "eval_pairs": len(kept),
               "eval_skipped": skipped, "runs": []}
    for seed in range(42, 42 + args.seeds):
        config, model_args = recipe_config(args.config, out / "train.jsonl", out / f"recipe-seed{seed}", seed, args,
                                           extra)
        run = {"seed": seed, "settings": {"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
                                          "epochs": config.num_train_epochs, "max_steps": config.max_steps,
                                          "batch": config.per_device_train_batch_size, "lr": config.learning_rate,
                                          "max_length": config.max_length, "bf16": config.bf16}}
        right = {}
        if "stock" in args.models:
            model, tokenizer, seconds, trained_on = train_stock(config, model_args, train_rows,
                                                                out / f"stock-seed{seed}")
            start = time.perf_counter()
            chosen, rejected = score(model, tokenizer.pad_token_id, stock_pairs(tokenizer, kept, config.max_length),
                                     args.eval_batch_size)
            run["stock"] = {**pairwise_accuracy(chosen, rejected), "train_seconds": seconds,
                            "eval_seconds": time.perf_counter() - start, "trained_on_rows": trained_on}
            right["stock"] = correct(chosen, rejected)
            del model
            gc.collect()
        if "recipe" in args.models:
            seconds = train_recipe(config, model_args)
            start = time.perf_counter()
            tokenizer, pairs, eval_truncation = recipe_pairs(config.output_dir, config, rankings)
            chosen, rejected = score(load_reward_model(config.output_dir), tokenizer.pad_token_id, pairs,
                                     args.eval_batch_size)
            stage = json.loads((Path(config.output_dir) / "stage_info.json").read_text())
            run["recipe"] = {**pairwise_accuracy(chosen, rejected), "train_seconds": seconds,
                             "eval_seconds": time.perf_counter() - start,
                             "train_truncation": stage["truncation"]["train"],
                             "eval_truncation": eval_truncation}
            right["recipe"] = correct(chosen, rejected)
        if len(right) == 2:
            low, high = paired_bootstrap(right["recipe"], right["stock"], seed=seed)
            run["recipe_minus_stock"] = {
                "difference": (sum(right["recipe"]) - sum(right["stock"])) / len(kept), "bootstrap_ci": [low, high],
                "mcnemar_p": mcnemar_p(right["recipe"], right["stock"])}
        results["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)

    summary = {}
    for name in ("stock", "recipe"):
        values = [run[name]["accuracy"] for run in results["runs"] if name in run]
        if values:
            summary[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1
                             else 0.0, "seeds": len(values)}
    differences = [run["recipe_minus_stock"]["difference"] for run in results["runs"] if "recipe_minus_stock" in run]
    if differences:
        summary["recipe_minus_stock"] = {"mean": statistics.mean(differences), "std": statistics.stdev(differences)
                                         if len(differences) > 1 else 0.0}
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{results['machine']}\n{len(train_rows)} training rows, {len(kept)} held-out pairs (every one scored)")
    print("| model | seed | accuracy [95% CI] | margin | train s | eval s |\n|---|---|---|---|---|---|")
    for run in results["runs"]:
        for name in ("stock", "recipe"):
            if name in run:
                r = run[name]
                print(f"| {name} | {run['seed']} | {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                      f"{r['margin_mean']:.3f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
        if "recipe_minus_stock" in run:
            d = run["recipe_minus_stock"]
            print(f"| recipe - stock | {run['seed']} | {d['difference']:+.3f} [{d['bootstrap_ci'][0]:+.3f}, "
                  f"{d['bootstrap_ci'][1]:+.3f}] McNemar p={d['mcnemar_p']:.3f} | | | |")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

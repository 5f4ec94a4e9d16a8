"""Reward-model accuracy on the same data: stock TRL RewardTrainer against recipes/reward_model.py, trained on the
same training rows with the same LoRA, epochs, batch, learning rate, schedule, seed and precision decision, with no
time budget on either side, and scored by the same code on the identical held-out pairs, every one of them.
Resumable: each finished training writes benchmarks/results/rm_accuracy/<model>-seed<N>.json (a run of any other
size: OUTPUT_DIR/results/); a rerun skips it.

    python benchmarks/rm_accuracy.py --seed 42                # one seed, both models, every training row
    python benchmarks/rm_accuracy.py --seeds 3                # seeds 42, 43, 44 (finished ones are skipped)
    python benchmarks/rm_accuracy.py --summary                # the table, rebuilt from the result files
    python benchmarks/rm_accuracy.py --seed 42 --models recipe --variant len512 --recipe_args "--max_length 512"
        # the issue's other variants, each its own --variant name: --recipe_args "--num_train_epochs 2",
        # "--learning_rate 5e-5", "--learning_rate 2e-4", "--use_peft false", "--center_rewards_coefficient 0.01"
    python benchmarks/rm_accuracy.py --train_rows 24 --eval_rows 16 --max_steps 2 --max_length 128 \
        --centering_samples 4 --output_dir /tmp/rm_smoke     # a smoke run: its files go to /tmp/rm_smoke/results

Data (--data): preference rows as the reward-model recipe reads them (chatgpt_recipes/data/preferences.py: HH-RLHF
transcripts, {prompt, chosen, rejected} as text or turns, ShareGPT, K-wise rankings), a .jsonl(.gz) or a .json list.
Default: data/hh_rlhf_harmless_sample.jsonl.gz (1,500 HH harmless-base rows).
Split (fixed, seed-free): rows are grouped by their opening user turn, the groups ordered by the SHA-256 of that
turn, and whole groups go to the held-out side until it has --eval_rows rows; so a prompt is never on both sides.
--train_rows keeps the first N training rows in file order. Both sides are written to --output_dir (train.jsonl,
eval.jsonl), which is also where the models are kept (never wiped: a killed recipe training resumes from its
checkpoint, a finished training is scored from its saved model).

  stock   TRL's RewardTrainer as its docs show it: the raw text (HH: "\\n\\nHuman: ... \\n\\nAssistant: ..."; a
          prompt + answer, text, or rendered by the chat template when given as turns), SmolLM2's own tokenizer (its
          pad token is its EOS), TRL's filter of rows longer than max_length (those are the rows it drops), a PEFT
          LoraConfig on all linear layers; LoRA rank, alpha, dropout, epochs, max_steps, batch, accumulation,
          learning rate, schedule, warmup, max_length, seed, bf16/fp16 and the weights' dtype are the recipe's.
  recipe  recipes/reward_model.py's main() with --config (default recipes/configs/reward/smollm2_hh_lora.yaml)
          plus --recipe_args, trained on every training row (eval_split_size 0: the benchmark evaluates), its
          max_train_minutes removed. It renders each row with the chat template and cuts it from the left, at turn
          boundaries first (the rows it cuts are counted); it skips malformed rows (counted).

A training that stopped early (time_budget_stop.json, or fewer steps than planned) is refused: no result is written.
Evaluation: the held-out pairs that both models can score. A pair is left out of both, and named in every result
file, when it is malformed (no final answer), when the recipe cannot render it (PromptFormatError) or its answers
become identical within max_length (SkipRanking), or when stock's left-cut token ids become identical. The recipe's
model reads its pair as it was trained (its rendering, cut from the left to max_length); the stock model reads its
raw text + EOS, its oldest tokens cut when longer than max_length (TRL has no rule for them: it drops them from
training). Accuracy counts a tie as half, with a 95% Wilson interval. The summary pairs a recipe file with the stock
file of the same seed only when both scored the identical pairs (eval_pairs_sha) under the same settings: the
difference has a paired bootstrap 95% interval (2,000 resamples) and an exact McNemar p-value. Seconds: wall time of
training (model load, data, training; for the recipe also its centring and save), on whatever else the machine runs.
"""

import argparse
import gc
import gzip
import hashlib
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chatgpt_recipes.runtime.output import quiet_warnings_that_do_not_apply  # noqa: E402

quiet_warnings_that_do_not_apply()  # before the imports below load bitsandbytes, which logs one that does not apply
from chatgpt_recipes.cli import exit_on_error, parse_config  # noqa: E402
from chatgpt_recipes.data.preferences import (SkipRanking, ranking_of, ranking_sequences,  # noqa: E402
                                              truncation_counts)
from chatgpt_recipes.data.rows import SKIPPED_ROWS_FILE  # noqa: E402
from chatgpt_recipes.evaluation.metrics import pairwise_accuracy, reward_scores  # noqa: E402
from chatgpt_recipes.modeling.loading import ModelArguments, load_tokenizer, resolve_model_path, torch_dtype  # noqa
from chatgpt_recipes.runtime.errors import (ConfigError, DataError, PromptFormatError, RecipeError,  # noqa: E402
                                            RowError)
from chatgpt_recipes.runtime.precision import detect_capability  # noqa: E402
from chatgpt_recipes.training.reward import load_reward_model  # noqa: E402
from chatgpt_recipes.training.time_budget import budget_stop  # noqa: E402

from bench_utils import recipe_module, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "recipes" / "configs" / "reward" / "smollm2_hh_lora.yaml"
DEFAULT_DATA = REPO / "data" / "hh_rlhf_harmless_sample.jsonl.gz"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "rm_accuracy"
FIRST_SEED = 42
TRAINED_MARKER = "benchmark_trained.json"  # in a model's folder: the training finished (its counts and seconds)
# The settings both sides share; the summary pairs two files only when these agree (variants: where they differ)
SHARED = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
          "learning_rate", "lr_scheduler_type", "warmup_steps", "max_length", "seed", "bf16", "fp16",
          "center_rewards_coefficient", "gradient_checkpointing")
RESULT_FIELDS = ("model", "variant", "seed", "accuracy", "interval", "mean_margin", "eval_pairs", "eval_pairs_sha",
                 "train_rows_given", "train_rows_used", "train_rows_cut_or_dropped", "seconds", "stopped_early",
                 "cpu", "commit", "pair_scores")


# ---------------------------------------------------------------- data and split

def read_rows(path: str) -> list[dict]:
    """The rows of a .jsonl(.gz) file or a .json list; DataError names the file and line for bad input."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data {path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--data {path}: cannot be read ({error})") from error
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"--data {path}: not valid JSON (line {error.lineno}: {error.msg})") from error
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"--data {path}: line {number} is not valid JSON ({error.msg})") from error
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"--data {path}: expected one JSON object per line or a JSON list of objects")
    if not rows:
        raise DataError(f"--data {path}: no rows")
    return rows


def rankings_of(rows: list[dict], source: str) -> list[dict | None]:
    """Each row's ranking as the recipe reads it, None for a malformed one. DataError when no row is a preference
    row at all (Alpaca SFT rows {instruction, output}, for instance)."""
    rankings = []
    for number, row in enumerate(rows, start=1):
        try:
            rankings.append(ranking_of(row, f"{source}: row {number}"))
        except RowError:
            rankings.append(None)
    if not any(rankings):
        raise DataError(f"{source}: no preference rows (fields of row 1: {sorted(rows[0])}); the benchmark needs "
                        "chosen/rejected pairs or rankings, as recipes/reward_model.py reads them (Alpaca "
                        "{instruction, output} rows are SFT data)")
    return rankings


def opening_turn(ranking: dict | None, row: dict) -> str:
    """What groups rows for the split: the first user turn of the row's prompt (a malformed row: its own text)."""
    if ranking is None:
        return json.dumps(row, sort_keys=True, ensure_ascii=False)
    prompt = ranking.get("response_prompts", [ranking["prompt"]])[0] if not ranking["prompt"] else ranking["prompt"]
    if isinstance(prompt, list):
        return next((turn["content"] for turn in prompt if turn["role"] == "user"), "").strip()
    if isinstance(prompt, dict):  # Alpaca pieces
        return json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return str(prompt).strip()


def split_by_prompt(rows: list[dict], eval_rows: int, source: str = "data") -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) in file order: whole opening-turn groups, in SHA-256 order, go to the held-out
    side until it has `eval_rows` rows, so no opening turn is on both sides."""
    if eval_rows < 1:
        raise ConfigError(f"--eval_rows {eval_rows}: must be at least 1")
    if eval_rows >= len(rows):
        raise ConfigError(f"--eval_rows {eval_rows}: {source} has only {len(rows)} rows, so no training row "
                          "would be left; hold out fewer")
    keys = [opening_turn(ranking, row) for ranking, row in zip(rankings_of(rows, source), rows)]
    sizes = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    held_out, count = set(), 0
    for key in sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if count >= eval_rows:
            break
        held_out.add(key)
        count += sizes[key]
    if count >= len(rows):
        raise ConfigError(f"--eval_rows {eval_rows}: the held-out prompt groups take every row of {source}")
    return ([r for r, k in zip(rows, keys) if k not in held_out], [r for r, k in zip(rows, keys) if k in held_out])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not path.is_file() or path.read_text() != text:  # unchanged: the recipe's data cache stays valid
        path.write_text(text)


def rows_sha(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- the two renderings of a pair

PROMPT_FIELDS = ("prompt", "instruction", "conversations", "messages")


def is_transcript_pair(row: dict) -> bool:
    """chosen and rejected as whole texts with no prompt of their own (HH-RLHF): what stock TRL reads as it is."""
    return (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
            and not any(field in row for field in PROMPT_FIELDS))


def stock_text(row: dict, ranking: dict, tokenizer) -> tuple[str, str]:
    """The (chosen, rejected) text stock TRL trains on: HH transcripts as they are; a prompt + answer as text (an
    Alpaca prompt: its instruction and input); turns rendered by the chat template. A K-wise ranking gives its best
    and worst answers."""
    if is_transcript_pair(row):
        return row["chosen"], row["rejected"]
    prompt = ranking.get("response_prompts") or [ranking["prompt"]] * len(ranking["responses"])
    best, worst = 0, len(ranking["responses"]) - 1
    texts = []
    for index in (best, worst):
        turns = prompt[index]
        if isinstance(turns, dict):  # Alpaca pieces
            turns = (turns.get("instruction", "") + ("\n\n" + turns["input"] if turns.get("input") else "")).strip()
        answer = ranking["responses"][index]
        if isinstance(turns, str):
            texts.append(turns + answer)
        else:
            texts.append(tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": answer}],
                                                       tokenize=False))
    return texts[0], texts[1]


def stock_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """Stock TRL's token ids of a text (its EOS added), the oldest tokens cut beyond max_length."""
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"][-max_length:]


def eval_pairs(held_out: list[dict], tokenizer, config, base=None) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(scored pairs, left out, scored rows, the recipe's cut counts). Each scored pair holds the held-out `row`
    number and both models' token ids; a pair either model cannot score is left out of both, named with why.
    `config`: the recipe's as this run trains it; `base`: without --recipe_args (a variant's), whose pairs must
    also render, so that a variant scores the pairs its stock file scored; stock reads base's max_length."""
    base = base or config
    pairs, left_out, rows, cuts = [], [], [], []
    for number, (row, ranking) in enumerate(zip(held_out, rankings_of(held_out, "eval.jsonl")), start=1):
        where = f"eval.jsonl: row {number}"
        if ranking is None:
            try:
                ranking_of(row, where)
            except RowError as error:
                left_out.append({"row": number, "model": "both", "reason": error.reason})
            continue
        reasons = []
        renderings = [("recipe", config)] + ([("recipe without --recipe_args", base)] if base is not config else [])
        for side, settings in renderings:
            try:
                rendered = ranking_sequences(ranking, tokenizer, settings.prompt_format, settings.max_length,
                                             "truncate", settings.system_prompt)
                if settings is config:
                    sequences, cut = rendered
            except (PromptFormatError, SkipRanking) as error:
                reasons.append({"row": number, "model": side, "reason": str(error)})
        try:
            chosen, rejected = (stock_ids(tokenizer, text, base.max_length)
                                for text in stock_text(row, ranking, tokenizer))
            if chosen == rejected:
                reasons.append({"row": number, "model": "stock",
                                "reason": f"answers identical within max_length={base.max_length} tokens"})
        except (PromptFormatError, ValueError) as error:  # a chat template that refuses the turns
            reasons.append({"row": number, "model": "stock", "reason": str(error)})
        if reasons:
            left_out += reasons
            continue
        cuts.append(cut)
        pairs.append({"row": number, "recipe": (sequences[0], sequences[-1]), "stock": (chosen, rejected)})
        rows.append(row)
    if not pairs:
        raise DataError(f"none of the {len(held_out)} held-out rows can be scored by both models: {left_out[:3]}")
    return pairs, left_out, rows, truncation_counts(cuts)


# ---------------------------------------------------------------- statistics

def correct(chosen: list[float], rejected: list[float]) -> list[float]:
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
    """95% percentile interval of mean(a - b) over `rounds` resamples of the pairs."""
    rng, n = random.Random(seed), len(a)
    differences = sorted(sum(a[i] - b[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(rounds))
    return differences[int(0.025 * rounds)], differences[int(0.975 * rounds) - 1]


# ---------------------------------------------------------------- one training, its checks, its result file

def cpu_info() -> dict:
    capability = detect_capability()
    if torch.cuda.is_available():
        return {"model": f"{torch.cuda.get_device_name()} (GPU)", "native_bf16": capability.native_bf16,
                "evidence": capability.evidence}
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    return {"model": model, "cores": len(__import__("os").sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "native_bf16": capability.native_bf16, "evidence": capability.evidence}


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def result_name(model: str, seed: int, variant: str | None = None) -> str:
    return f"{model}{'-' + variant if variant else ''}-seed{seed}"


def check_finished(output_dir: Path, global_step: int, max_steps: int, name: str) -> None:
    """Refuse a training that stopped early: a time-budget stop record, or fewer steps than it planned."""
    stop = budget_stop(output_dir)
    if stop is not None:
        raise RecipeError(f"{name}: the training in {output_dir} stopped early at step {stop['stopped_at_step']} of "
                          f"{stop['max_steps']} (time budget, {output_dir}/time_budget_stop.json); the benchmark "
                          "reports only whole trainings: remove that folder and rerun")
    if global_step < max_steps:
        raise RecipeError(f"{name}: the training in {output_dir} stopped at step {global_step} of {max_steps}; the "
                          "benchmark reports only whole trainings: remove that folder and rerun")


def settings_of(config, model_args) -> dict:
    return {**{name: getattr(config, name) for name in SHARED},
            "lora": {"use_peft": model_args.use_peft, "r": model_args.lora_r, "alpha": model_args.lora_alpha,
                     "dropout": model_args.lora_dropout},
            "weights_dtype": str(torch_dtype(model_args)).removeprefix("torch."),
            "max_train_minutes": None}


def train_stock(config, model_args, train_rows: list[dict], output_dir: Path) -> dict:
    """Stock TRL on the raw text; saves the merged model and returns what TRAINED_MARKER records."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    start = time.perf_counter()
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(model_args))
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(output_dir), report_to="none", save_strategy="no", eval_strategy="no",
                        use_cpu=config.use_cpu, logging_steps=config.logging_steps,
                        **{name: getattr(config, name) for name in SHARED})
    peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules="all-linear",
                             task_type="SEQ_CLS") if model_args.use_peft else None
    examples = []
    for row, ranking in zip(train_rows, rankings_of(train_rows, "train.jsonl")):
        if ranking is None and is_transcript_pair(row):
            examples.append({"chosen": row["chosen"], "rejected": row["rejected"]})  # as TRL reads it, defects too
        elif ranking is not None:
            chosen, rejected = stock_text(row, ranking, tokenizer)
            examples.append({"chosen": chosen, "rejected": rejected})
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                            processing_class=tokenizer, peft_config=peft_config)
    used = len(trainer.train_dataset)
    trainer.train()
    check_finished(output_dir, trainer.state.global_step, trainer.state.max_steps, "stock")
    merged = trainer.model.merge_and_unload() if model_args.use_peft else trainer.model
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return {"train_rows_given": len(train_rows), "train_rows_used": used,
            "train_rows_cut_or_dropped": len(train_rows) - used, "cut_or_dropped": "dropped (longer than max_length)",
            "seconds": time.perf_counter() - start, "global_step": trainer.state.global_step}


def train_recipe(config, model_args, train_rows: list[dict], output_dir: Path) -> dict:
    """recipes/reward_model.py's main(); a checkpoint left by a killed run is resumed (the recipe's own rule)."""
    start, resumed = time.perf_counter(), any(output_dir.glob("checkpoint-*"))
    recipe_module("reward_model").main(config, model_args)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    check_finished(output_dir, state["global_step"], state["max_steps"], "recipe")
    stage = json.loads((output_dir / "stage_info.json").read_text())
    skipped_file = output_dir / SKIPPED_ROWS_FILE
    skipped = sum(1 for line in skipped_file.read_text().splitlines() if line.strip()) if skipped_file.is_file() else 0
    return {"train_rows_given": len(train_rows), "train_rows_used": len(train_rows) - skipped,
            "train_rows_cut_or_dropped": stage["truncation"]["train"]["truncated"],
            "cut_or_dropped": "cut from the left (kept); malformed rows skipped: given - used",
            "train_truncation": stage["truncation"]["train"], "seconds": time.perf_counter() - start,
            "global_step": state["global_step"], "resumed_from_checkpoint": resumed}


def score(model, pad_token_id: int, pairs: list[tuple[list[int], list[int]]], batch_size: int,
          name: str) -> tuple[list[float], list[float]]:
    chosen, rejected, chunk, start = [], [], 64, time.perf_counter()
    with torch.no_grad():
        for begin in range(0, len(pairs), chunk):
            part = pairs[begin:begin + chunk]
            chosen += reward_scores(model, [c for c, _ in part], pad_token_id, batch_size)
            rejected += reward_scores(model, [r for _, r in part], pad_token_id, batch_size)
            print(f"[{name}] scored {len(chosen)} of {len(pairs)} held-out pairs "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return chosen, rejected


def result_record(model: str, variant: str | None, seed: int, chosen: list[float], rejected: list[float],
                  pairs: list[dict], left_out: list[dict], sha: str, trained: dict, settings: dict,
                  context: dict) -> dict:
    accuracy = pairwise_accuracy(chosen, rejected)
    record = {"model": model, "variant": variant, "seed": seed, "accuracy": accuracy["accuracy"],
              "interval": [accuracy["ci_low"], accuracy["ci_high"]], "mean_margin": accuracy["margin_mean"],
              "eval_pairs": len(pairs), "eval_pairs_sha": sha, "eval_left_out": left_out,
              "train_rows_given": trained["train_rows_given"], "train_rows_used": trained["train_rows_used"],
              "train_rows_cut_or_dropped": trained["train_rows_cut_or_dropped"],
              "cut_or_dropped": trained["cut_or_dropped"], "seconds": round(trained["seconds"], 1),
              "stopped_early": False, "global_step": trained["global_step"], "cpu": cpu_info(), "commit": commit(),
              "settings": settings, **context,
              "pair_scores": [[p["row"], c, r] for p, c, r in zip(pairs, chosen, rejected)]}
    for key in ("train_truncation", "resumed_from_checkpoint"):  # the recipe's (seconds: only since the resume)
        if key in trained:
            record[key] = trained[key]
    return record


def run_one(model: str, seed: int, args, out: Path, results: Path, train_rows, pairs, left_out, sha, context,
            extra: list[str]) -> None:
    name = result_name(model, seed, args.variant)
    result_file = results / f"{name}.json"
    if result_file.is_file():
        print(f"[{name}] done already: {result_file} (delete it to run again)", flush=True)
        return
    model_dir = out / name
    config, model_args = recipe_config(args, out / "train.jsonl", model_dir, seed, extra)
    # A folder left by a run with other settings or rows would be resumed or scored as this one: refused
    started = {"settings": settings_of(config, model_args), "train_rows_sha": context["train_rows_sha"],
               "recipe_args": args.recipe_args}
    started_file = model_dir / "benchmark_settings.json"
    if started_file.is_file() and json.loads(started_file.read_text()) != json.loads(json.dumps(started)):
        raise ConfigError(f"{model_dir} holds a training with other settings or training rows than this command's "
                          f"(see {started_file}); delete that folder, or pass another --output_dir")
    model_dir.mkdir(parents=True, exist_ok=True)
    started_file.write_text(json.dumps(started, indent=1) + "\n")
    marker = model_dir / TRAINED_MARKER
    if marker.is_file():
        trained = json.loads(marker.read_text())
        print(f"[{name}] trained already ({model_dir}); scoring", flush=True)
    else:
        print(f"[{name}] training on {len(train_rows)} rows ...", flush=True)
        trained = (train_stock if model == "stock" else train_recipe)(config, model_args, train_rows, model_dir)
        marker.write_text(json.dumps(trained, indent=1) + "\n")
        print(f"[{name}] trained in {trained['seconds']:.0f} s: {trained['train_rows_used']} of "
              f"{trained['train_rows_given']} rows used, {trained['train_rows_cut_or_dropped']} "
              f"{trained['cut_or_dropped'].split(' (')[0].split(';')[0]}", flush=True)
    reward_model = load_reward_model(str(model_dir))  # the stock model's pad token is its EOS, as it was trained
    chosen, rejected = score(reward_model, reward_model.config.pad_token_id, [p[model] for p in pairs],
                             args.eval_batch_size, name)
    del reward_model
    gc.collect()
    record = result_record(model, args.variant, seed, chosen, rejected, pairs, left_out, sha, trained,
                           settings_of(config, model_args), context)
    results.mkdir(parents=True, exist_ok=True)
    partial = result_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(result_file)  # whole or absent, even when killed while writing
    print(f"[{name}] accuracy {record['accuracy']:.3f} [{record['interval'][0]:.3f}, {record['interval'][1]:.3f}] "
          f"on {len(pairs)} pairs; wrote {result_file}", flush=True)


def recipe_config(args, data: Path, output_dir: Path, seed: int, extra: list[str]):
    """The recipe's parsed config for one seed, its time budget removed (no budget on either side)."""
    reward_model = recipe_module("reward_model")
    options = ["--config", args.config, "--dataset_name", str(data), "--eval_split_size", "0", "--output_dir",
               str(output_dir), "--seed", str(seed), "--eval_strategy", "no", "--report_to", "none"]
    if args.max_steps:
        options += ["--max_steps", str(args.max_steps)]
    if any(item.split("=", 1)[0] in ("--max_train_minutes", "--seed", "--output_dir", "--dataset_name")
           for item in extra):
        raise ConfigError("--recipe_args: max_train_minutes, seed, output_dir and dataset_name are the benchmark's "
                          "(it runs with no time budget, on its own split, one folder per seed)")
    config, model_args = parse_config((reward_model.RewardRecipeConfig, ModelArguments), "", options + extra)
    config.max_train_minutes = None
    return config, model_args


# ---------------------------------------------------------------- the summary, rebuilt from the result files

def read_results(results: Path) -> list[dict]:
    records = []
    for path in sorted(results.glob("*-seed*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg}); delete it and rerun its seed") from error
        missing = [name for name in RESULT_FIELDS if name not in record]
        if missing:
            raise DataError(f"{path}: not a result of this benchmark (missing {missing})")
        if record["stopped_early"]:
            raise DataError(f"{path}: a training that stopped early; delete it and rerun its seed")
        records.append(record)
    return records


def mean_spread(values: list[float], scale: float = 100, form: str = ".1f") -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean * scale:{form}} (1 seed)"
    return f"{mean * scale:{form}} ± {statistics.stdev(values) * scale:{form.lstrip('+')}} ({len(values)} seeds)"


def paired(recipe: dict, stock: dict) -> dict:
    """recipe - stock (or a variant - the recipe's default) on the identical pairs; DataError when they did not
    score the same pairs."""
    if recipe["eval_pairs_sha"] != stock["eval_pairs_sha"]:
        raise DataError(f"seed {recipe['seed']}: {result_name('recipe', recipe['seed'], recipe['variant'])} and "
                        f"{result_name(stock['model'], stock['seed'], stock['variant'])} scored different held-out "
                        "pairs (eval_pairs_sha); rerun both with the same data and --eval_rows")
    a = correct([s[1] for s in recipe["pair_scores"]], [s[2] for s in recipe["pair_scores"]])
    b = correct([s[1] for s in stock["pair_scores"]], [s[2] for s in stock["pair_scores"]])
    low, high = paired_bootstrap(a, b, seed=recipe["seed"])
    return {"difference": (sum(a) - sum(b)) / len(a), "interval": [low, high], "mcnemar_p": mcnemar_p(a, b)}


def differing_settings(record: dict, stock: dict) -> list[str]:
    return [f"{key} {record['settings'].get(key)!r} (stock {stock['settings'].get(key)!r})"
            for key in sorted(set(record["settings"]) | set(stock["settings"]))
            if record["settings"].get(key) != stock["settings"].get(key)]


def cpu_words(cpu: dict) -> str:
    return f"{cpu['model']} ({'native' if cpu['native_bf16'] else 'no native'} bf16)"


def in_repo(path) -> str:
    """A path as the result files and the summary show it: from the repository root when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else path)


def summary(results: Path) -> str:
    """The markdown tables (per seed; mean ± standard deviation over seeds; variants) from the result files."""
    records = read_results(results)
    if not records:
        raise DataError(f"{results}: no result files (<model>-seed<N>.json) yet; run a seed first")
    stock = {r["seed"]: r for r in records if r["model"] == "stock"}
    main_rows = [r for r in records if r["variant"] is None]
    shas = {r["eval_pairs_sha"] for r in records}
    lines = [f"Result files: {in_repo(results)} ({len(records)}); held-out pairs: "
             f"{', '.join(sorted({str(r['eval_pairs']) for r in records}))}, "
             f"{'the identical set in every file' if len(shas) == 1 else f'{len(shas)} DIFFERENT sets (see sha)'} "
             f"(eval_pairs_sha {', '.join(s[:12] for s in sorted(shas))}); CPU: "
             f"{'; '.join(sorted({cpu_words(r['cpu']) for r in records}))}",
             "", "| model | seed | accuracy % [95% CI] | mean margin | held-out pairs scored (left out) | "
             "training rows given | used | dropped (stock) / cut (recipe) | train s | recipe - stock, points "
             "[95% CI] | McNemar p | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    differences = {}
    for record in sorted(records, key=lambda r: (r["variant"] or "", r["seed"], r["model"] != "stock")):
        versus, p = "", ""
        other = stock.get(record["seed"])
        if record["model"] == "recipe" and other is not None:
            mismatch = differing_settings(record, other)
            if mismatch and record["variant"] is None:
                raise DataError(f"seed {record['seed']}: recipe and stock ran with different settings: "
                                f"{'; '.join(mismatch)}; a comparison needs the same ones (a variant: --variant)")
            comparison = paired(record, other)
            differences.setdefault(record["variant"], []).append(comparison["difference"])
            versus = (f"{comparison['difference'] * 100:+.1f} [{comparison['interval'][0] * 100:+.1f}, "
                      f"{comparison['interval'][1] * 100:+.1f}]")
            p = f"{comparison['mcnemar_p']:.3f}"
        name = record["model"] + (f" ({record['variant']})" if record["variant"] else "")
        low, high = record["interval"]
        lines.append(f"| {name} | {record['seed']} | {record['accuracy'] * 100:.1f} [{low * 100:.1f}, "
                     f"{high * 100:.1f}] | "
                     f"{record['mean_margin']:.3f} | {record['eval_pairs']} "
                     f"({len({x['row'] for x in record['eval_left_out']})}) | {record['train_rows_given']} | "
                     f"{record['train_rows_used']} | {record['train_rows_cut_or_dropped']} | {record['seconds']:.0f} | "
                     f"{versus} | {p} | {record['commit']} |")
    lines += ["", "| model | accuracy %, mean ± sd over seeds | recipe - stock, points, mean ± sd |", "|---|---|---|"]
    for name, variant in [("stock", None), ("recipe", None)] + sorted(
            {("recipe", r["variant"]) for r in records if r["variant"]}):
        values = [r["accuracy"] for r in records if r["model"] == name and r["variant"] == variant]
        if values:
            versus = (mean_spread(differences[variant], form="+.1f") if name == "recipe" and differences.get(variant)
                      else "")
            lines.append(f"| {name}{f' ({variant})' if variant else ''} | {mean_spread(values)} | {versus} |")
    variants = [r for r in records if r["variant"]]
    if variants:
        default = {r["seed"]: r for r in main_rows if r["model"] == "recipe"}
        lines += ["", "| variant | seed | accuracy % | variant - the recipe's default, points [95% CI] | McNemar p | "
                  "its recipe_args | settings that differ from stock's |", "|---|---|---|---|---|---|---|"]
        for record in sorted(variants, key=lambda r: (r["variant"], r["seed"])):
            other, versus, p = stock.get(record["seed"]), "(no default-recipe file)", ""
            if record["seed"] in default:
                comparison = paired(record, default[record["seed"]])
                versus = (f"{comparison['difference'] * 100:+.1f} [{comparison['interval'][0] * 100:+.1f}, "
                          f"{comparison['interval'][1] * 100:+.1f}]")
                p = f"{comparison['mcnemar_p']:.3f}"
            lines.append(f"| {record['variant']} | {record['seed']} | {record['accuracy'] * 100:.1f} | {versus} | {p} | "
                         f"`{record.get('recipe_args', '')}` | "
                         f"{'; '.join(differing_settings(record, other)) if other else '(no stock file)'} |")
    if not main_rows:
        lines.append("\n(no stock or default-recipe files yet)")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference rows (.jsonl, .jsonl.gz or a .json list)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe's YAML")
    parser.add_argument("--recipe_args", default="", help="overrides of the recipe's options, e.g. \"--lora_r 32\"; "
                        "with --models recipe and --variant NAME: a variant")
    parser.add_argument("--variant", default=None,
                        help="name a recipe-only variant (its files: recipe-NAME-seed<N>.json); needs --models recipe")
    parser.add_argument("--eval_rows", type=int, default=300, help="held-out rows (whole prompt groups)")
    parser.add_argument("--train_rows", type=int, default=None, help="the first N training rows (default: all)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop both trainings after N steps (a small run)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="both models' max_length (default: the config's); passed to the recipe as --max_length")
    parser.add_argument("--centering_samples", type=int, default=None,
                        help="the recipe's centering_samples (fewer: a faster small run); passed on as is")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="run this one seed")
    seeds.add_argument("--seeds", type=int, default=None, help=f"run seeds {FIRST_SEED} .. {FIRST_SEED - 1}+K "
                       "(finished ones are skipped); default: 1")
    parser.add_argument("--models", nargs="+", default=["stock", "recipe"], choices=["stock", "recipe"])
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--output_dir", default="outputs/rm_accuracy",
                        help="the split and the trained models, one folder per model and seed (kept: resumable)")
    parser.add_argument("--results_dir", default=None,
                        help=f"the result files, one per training (default: {DEFAULT_RESULTS.relative_to(REPO)} for "
                        "the full-size benchmark and its variants and for --summary, else OUTPUT_DIR/results)")
    parser.add_argument("--summary", action="store_true",
                        help="only print the tables rebuilt from the result files in --results_dir (and write "
                        "summary.md there)")
    parser.add_argument("--truncation_only", action="store_true",
                        help="only count, per rendering and max_length, the rows that are cut (no training)")
    args = parser.parse_args(argv)
    if args.results_dir is None:
        full_size = (args.summary or all(getattr(args, name) is None for name in
                                         ("train_rows", "max_steps", "max_length", "centering_samples"))
                     and args.eval_rows == 300 and Path(args.data) == DEFAULT_DATA
                     and Path(args.config) == DEFAULT_CONFIG and (args.variant or not args.recipe_args))
        args.results_dir = str(DEFAULT_RESULTS if full_size else Path(args.output_dir) / "results")
    if args.variant is not None and (args.models != ["recipe"] or not args.recipe_args):
        parser.error("--variant NAME needs --models recipe and the variant's --recipe_args")
    if args.variant is not None and not args.variant.replace("_", "").replace(".", "").replace("-", "").isalnum():
        parser.error("--variant: letters, digits, '_', '-' and '.' only (it names files)")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def truncation_table(rows: list[dict], model_name: str) -> list[dict]:
    """What each rendering keeps at each max_length: how many of `rows` are cut, and how (no training)."""
    tokenizer = load_tokenizer(model_name)
    rankings = [r for r in rankings_of(rows, "data") if r is not None]
    table = []
    for system_prompt, rendering in ((None, "chat template, its default system prompt"),
                                     ("", "chat template, empty system turn")):
        for max_length in (256, 512):
            cuts = []
            for ranking in rankings:
                try:
                    cuts.append(ranking_sequences(ranking, tokenizer, "chat", max_length, "truncate",
                                                  system_prompt)[1])
                except (PromptFormatError, SkipRanking):
                    continue
            counts = truncation_counts(cuts)
            table.append({"rendering": rendering, "max_length": max_length, "pairs": len(rankings),
                          "longer": counts.pop("truncated"), **counts})
    raw = [len(tokenizer(r["chosen"] + tokenizer.eos_token)["input_ids"]) for r in rows
           if isinstance(r.get("chosen"), str)]
    for max_length in (256, 512):
        table.append({"rendering": "raw text (stock TRL)", "max_length": max_length, "pairs": len(raw),
                      "longer": sum(n > max_length for n in raw)})
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = Path(args.results_dir)
    if args.summary:
        table = summary(results)
        (results / "summary.md").write_text(table + "\n")
        print(table)
        return
    rows = read_rows(args.data)
    if args.truncation_only:
        print("| rendering | max_length | pairs | longer than max_length | cut: oldest turns dropped | "
              "last prompt cut at its start | answer cut at its end |\n|---|---|---|---|---|---|---|")
        for row in truncation_table(rows, "smollm2-135m-instruct"):
            print(f"| {row['rendering']} | {row['max_length']} | {row['pairs']} | {row['longer']} | "
                  f"{row.get('turns_dropped', '-')} | {row.get('prompt_cut', '-')} | {row.get('answer_cut', '-')} |")
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, held_out = split_by_prompt(rows, args.eval_rows, args.data)
    if args.train_rows is not None:
        if args.train_rows < 1 or args.train_rows > len(train_rows):
            raise ConfigError(f"--train_rows {args.train_rows}: between 1 and the {len(train_rows)} training rows "
                              f"left after holding out {len(held_out)}")
        train_rows = train_rows[: args.train_rows]
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", held_out)
    shared = [item for name in ("max_length", "centering_samples") if getattr(args, name) is not None
              for item in (f"--{name}", str(getattr(args, name)))]
    extra = shared + shlex.split(args.recipe_args)
    seeds = [args.seed] if args.seed is not None else list(range(FIRST_SEED, FIRST_SEED + (args.seeds or 1)))
    # What is scored is fixed before any training: the renderings depend on the tokenizer and the settings only
    config, model_args = recipe_config(args, out / "train.jsonl", out / "unused", seeds[0], extra)
    base, base_model_args = recipe_config(args, out / "train.jsonl", out / "unused", seeds[0], shared)
    if base_model_args.model_name_or_path != model_args.model_name_or_path:
        raise ConfigError("--recipe_args: a variant trains from the same model as stock (no --model_name_or_path)")
    tokenizer = load_tokenizer(resolve_model_path(model_args.model_name_or_path))
    pairs, left_out, scored_rows, eval_cuts = eval_pairs(held_out, tokenizer, config, base if args.variant else None)
    sha = rows_sha(scored_rows)
    print(f"[split] {len(train_rows)} training rows, {len(held_out)} held-out rows (no opening turn on both sides); "
          f"{len(pairs)} pairs scored by both models (eval_pairs_sha {sha[:12]}), "
          f"{len({x['row'] for x in left_out})} left out for both: {left_out}; the recipe's rendering cuts "
          f"{eval_cuts['truncated']} of them from the left", flush=True)
    context = {"data": in_repo(args.data), "train_rows_sha": rows_sha(train_rows), "held_out_rows": len(held_out),
               "recipe_args": args.recipe_args, "config": in_repo(args.config), "eval_truncation_recipe": eval_cuts,
               "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
               "versions": versions()}
    for seed in seeds:
        for model in args.models:
            run_one(model, seed, args, out, results, train_rows, pairs, left_out, sha, context, extra)
            gc.collect()
    print(f"\n{summary(results)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except RecipeError as error:
        exit_on_error(str(error))

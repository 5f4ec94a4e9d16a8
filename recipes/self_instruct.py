"""Alpaca's data stage: self-instruct from the 175 seed tasks, with a local model or any OpenAI-compatible server.

    # the embedded demo: SmolLM2-135M-Instruct on the CPU, offline, >= 20 instructions (low quality, but real)
    python recipes/self_instruct.py
    # at scale: any OpenAI-compatible server, e.g. `vllm serve Qwen/Qwen2.5-7B-Instruct` on a GPU box
    python recipes/self_instruct.py --api_base http://gpu-box:8000/v1 --api_model Qwen/Qwen2.5-7B-Instruct \
        --num_instructions 52000 --max_new_tokens 3072 --output_dir outputs/self-instruct-qwen7b
    # then fine-tune on the result, unchanged
    accelerate launch recipes/sft_lora.py --dataset_name outputs/self-instruct-smollm2/instructions.jsonl

Each request prompt is Alpaca's instruction prompt followed by `num_prompt_instructions` seed tasks as numbered
Instruction / Input / Output blocks, ending with the next number's `Instruction:`. Up to 20 tasks are parsed from a
completion (the last one dropped when the completion stopped for length), filtered by Alpaca's rules (length,
blacklisted words, "Write a program", a punctuation or non-ASCII start) and deduplicated: a task is kept only when its
ROUGE-L F-measure against every seed and every kept instruction is at most `max_rouge_l`, and joins that pool at once.
Kept rows ({instruction, input, output}, the shape of tatsu-lab/alpaca) are appended to output_dir/output_name after
every batch: rerun the same command after an interruption and it continues to num_instructions. The report,
generation_report.md next to the output, counts the rejects by reason and plots the ROUGE-L distribution and the
leading verbs. An API key, where the server wants one, comes from $OPENAI_API_KEY.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from chatgpt_recipes.cli import run
from chatgpt_recipes.runtime.errors import ConfigError, SelfInstructError
from chatgpt_recipes.self_instruct.generators import PROMPT_STYLES, Decoding, LocalGenerator, OpenAICompatibleGenerator
from chatgpt_recipes.self_instruct.rouge_dedup import RougeDeduplicator
from chatgpt_recipes.self_instruct.tasks import (REJECT_REASONS, append_generation_log, append_output_rows,
                                                 filter_reason, parse_completion, read_generation_log,
                                                 read_instruction_prompt, read_output_rows, read_seed_tasks,
                                                 sample_request_prompts, write_generation_report)


@dataclass
class SelfInstructConfig:
    """Where the seed tasks come from, which model writes new ones, how they are filtered, where they go."""

    seed_tasks: str = field(default="data/alpaca_seed_tasks.jsonl",
                            metadata={"help": "Seed tasks: JSONL {instruction, instances} or Alpaca rows."})
    prompt_file: str = field(default="data/alpaca_self_instruct_prompt.txt",
                             metadata={"help": "The instruction prompt that opens every request."})
    output_dir: str = field(default="outputs/self-instruct-smollm2")
    output_name: str = field(default="instructions.jsonl",
                             metadata={"help": "The output file in output_dir: .jsonl (appended) or .json (a list)."})
    num_instructions: int = field(default=20, metadata={"help": "Stop when the output holds this many rows."})
    num_prompt_instructions: int = field(default=3, metadata={"help": "Seed tasks shown in each request prompt."})
    request_batch_size: int = field(default=5, metadata={"help": "Prompts per request (one generate batch)."})
    max_new_tokens: int = field(default=3072, metadata={"help": "Longest completion in tokens."})
    temperature: float = field(default=1.0)
    top_p: float = field(default=1.0)
    model_name_or_path: str = field(default="smollm2-135m-instruct",
                                    metadata={"help": "Local generator: hub id, directory, .gguf or offline name."})
    dtype: str = field(default="auto", metadata={"help": "Local generator: auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})
    api_base: str | None = field(default=None, metadata={"help": "An OpenAI-compatible server instead of the "
                                 "local model, e.g. http://localhost:8000/v1 (key from $OPENAI_API_KEY)."})
    api_model: str | None = field(default=None, metadata={"help": "The model name the server serves."})
    prompt_style: str = field(default="completion", metadata={"help": "completion: the prompt text is continued "
                              "(/v1/completions); chat: it is sent as one user message (/v1/chat/completions)."})
    max_retries: int = field(default=3, metadata={"help": "Retries of a request that failed transiently."})
    request_timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for one request."})
    max_rouge_l: float = field(default=0.7, metadata={"help": "Drop a candidate whose ROUGE-L F against a seed "
                               "or kept instruction is above this."})
    drop_non_ascii_start: bool = field(default=True, metadata={"help": "Drop instructions that start with a "
                                       "non-ASCII character; set false to generate Chinese (or other) tasks."})
    max_unparseable_batches: int = field(default=10, metadata={"help": "Stop when this many batches in a row give "
                                         "no parseable task."})
    num_workers: int = field(default=0, metadata={"help": "Processes for ROUGE scoring; 0: one per CPU core."})
    seed: int = field(default=42, metadata={"help": "Which seed tasks each prompt shows (and local sampling)."})
    use_cpu: bool = field(default=False, metadata={"help": "Local generator on the CPU even with a GPU."})


def check_config(config: SelfInstructConfig) -> None:
    if config.prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"prompt_style must be one of {PROMPT_STYLES}, got {config.prompt_style!r}")
    name = Path(config.output_name)
    if name.suffix not in (".json", ".jsonl") or name.name != config.output_name:
        raise ConfigError(f"output_name must be a file name ending in .json or .jsonl, got {config.output_name!r}")
    for name in ("num_instructions", "num_prompt_instructions", "request_batch_size", "max_new_tokens",
                 "max_unparseable_batches"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not 0 < config.top_p <= 1 or config.temperature <= 0:
        raise ConfigError(f"temperature must be > 0 and top_p in (0, 1], got {config.temperature} and {config.top_p}")
    if not 0 <= config.max_rouge_l <= 1:
        raise ConfigError(f"max_rouge_l must be in [0, 1], got {config.max_rouge_l}")
    if config.api_model and not config.api_base:
        raise ConfigError("api_model is set but api_base is not: give the server's URL, e.g. http://localhost:8000/v1")


def make_generator(config: SelfInstructConfig):
    decoding = Decoding(config.max_new_tokens, config.temperature, config.top_p)
    if config.api_base:
        return OpenAICompatibleGenerator(config.api_base, config.api_model, config.prompt_style, decoding,
                                         config.max_retries, config.request_timeout)
    from chatgpt_recipes.runtime.precision import inference_dtype

    return LocalGenerator(config.model_name_or_path, inference_dtype(config.dtype, config.use_cpu),
                          config.prompt_style, decoding, config.trust_remote_code, config.use_cpu)


def main(config: SelfInstructConfig):
    check_config(config)
    seeds = read_seed_tasks(config.seed_tasks)
    instruction_prompt = read_instruction_prompt(config.prompt_file)
    if config.num_prompt_instructions > len(seeds):
        raise ConfigError(f"num_prompt_instructions={config.num_prompt_instructions} is more than the "
                          f"{len(seeds)} seed tasks in {config.seed_tasks}")
    output = Path(config.output_dir) / config.output_name
    log_path = Path(config.output_dir) / "generation_log.jsonl"
    rows = read_output_rows(output)
    if len(rows) >= config.num_instructions:
        print(f"[self_instruct] {output} already holds {len(rows)} instructions (num_instructions "
              f"{config.num_instructions}): nothing to generate. Raise --num_instructions to add more.", flush=True)
        return
    if rows:
        print(f"[self_instruct] resuming: {output} holds {len(rows)} of {config.num_instructions} instructions",
              flush=True)
    os.makedirs(config.output_dir, exist_ok=True)

    generator = make_generator(config)
    print(f"[self_instruct] {len(seeds)} seed tasks from {config.seed_tasks}; generator: {generator.description}; "
          f"{config.request_batch_size} prompts per request", flush=True)
    deduplicator = RougeDeduplicator([seed.instruction for seed in seeds] + [row["instruction"] for row in rows],
                                     config.max_rouge_l, config.num_workers or os.cpu_count() or 1)
    # A rerun continues with other prompts: its random state follows from the rows already there
    rng = random.Random(config.seed + len(rows))
    if not config.api_base:
        import torch

        torch.manual_seed(config.seed + len(rows))
    run_rejects, unparseable_streak, batch_number = Counter(), 0, len(read_generation_log(log_path))
    progress = tqdm(total=config.num_instructions, initial=len(rows), desc="kept", unit="instruction")
    try:
        while len(rows) < config.num_instructions:
            started = time.time()
            prompts = sample_request_prompts(instruction_prompt, seeds, config.num_prompt_instructions,
                                             config.request_batch_size, rng)
            completions = generator.complete(prompts)
            rejects, candidates = Counter(), []
            for completion in completions:
                tasks, parse_rejects = parse_completion(completion.text, config.num_prompt_instructions + 1,
                                                        completion.finish_reason == "length")
                rejects.update(parse_rejects)
                for task in tasks:
                    reason = filter_reason(task.instruction, config.drop_non_ascii_start)
                    if reason:
                        rejects[reason] += 1
                    else:
                        candidates.append(task)
            parsed = sum(rejects[reason] for reason in REJECT_REASONS if reason not in ("parse", "truncated"))
            parsed += len(candidates)
            unparseable_streak = 0 if parsed else unparseable_streak + 1
            if unparseable_streak >= config.max_unparseable_batches:
                raise SelfInstructError(
                    f"{generator.description} returned nothing parseable for {unparseable_streak} batches in a row "
                    f"({unparseable_streak * len(prompts)} completions). A task must read `N. Instruction: ...`, "
                    f"`N. Input: ...`, `N. Output: ...`, tasks separated by ###. One raw completion:\n"
                    f"{completions[0].text[:1500]!r}")
            new_rows, scores, nearest = [], [], []
            remaining = config.num_instructions - len(rows)
            for task, (kept, score, most_similar) in zip(candidates, deduplicator.admit(
                    [task.instruction for task in candidates])):
                if not kept:
                    rejects["similarity"] += 1
                elif len(new_rows) < remaining:
                    new_rows.append(task.row())
                    scores.append(round(score, 4))
                    nearest.append(most_similar)
            rows += new_rows
            append_output_rows(output, new_rows, rows)  # the rows first: a kill between the two loses only stats
            append_generation_log(log_path, {"batch": batch_number, "completions": len(completions),
                                             "parsed": parsed, "kept": len(new_rows), "rejects": dict(rejects),
                                             "max_rouge_l": scores, "most_similar": nearest,
                                             "seconds": round(time.time() - started, 2)})
            batch_number += 1
            run_rejects.update(rejects)
            progress.update(len(new_rows))
            progress.set_postfix_str(f"rejected {sum(run_rejects.values())}: " + ", ".join(
                f"{reason} {count}" for reason, count in run_rejects.most_common(3)))
    finally:
        progress.close()
        deduplicator.close()

    summary = write_generation_report(Path(config.output_dir) / "generation_report.md", rows,
                                      read_generation_log(log_path), config.num_instructions, config.max_rouge_l,
                                      generator.description)
    print(f"\n[self_instruct] {len(rows)} instructions in {output}", flush=True)
    print("Rejected in this run: " + (", ".join(f"{reason} {count}" for reason, count in run_rejects.most_common())
                                     or "none"), flush=True)
    if summary["mean_max_rouge_l"] is not None:
        print(f"Mean maximum ROUGE-L against the pool: {summary['mean_max_rouge_l']:.3f}", flush=True)
    if summary["kept_per_minute"]:
        print(f"Throughput: {summary['kept_per_minute']:.2f} kept instructions per minute", flush=True)
    for row in rows[-3:]:
        print(f"\n### {row['instruction']}\n" + (f"[input] {row['input']}\n" if row["input"] else "")
              + f"[output] {row['output']}", flush=True)
    print(f"\nReport: {Path(config.output_dir) / 'generation_report.md'}", flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (SelfInstructConfig,), "self_instruct/smollm2_alpaca_seeds.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

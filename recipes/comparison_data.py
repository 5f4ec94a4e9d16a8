"""Comparison data for the reward model from the SFT model's own samples (InstructGPT step 2's data, labelled by rule).

    # the pipeline's step between SFT and the reward model: 400 pairs from the SFT output, CPU, offline
    python recipes/comparison_data.py --model_name_or_path outputs/sft-smollm2-alpaca-lora
    # then train the reward model on them
    accelerate launch recipes/reward_model.py --model_name_or_path outputs/sft-smollm2-alpaca-lora \
        --dataset_name outputs/comparisons-smollm2/comparisons.jsonl

InstructGPT's labellers ranked the SFT model's own samples. Here the label is a rule: for an instruction of the
SFT data, its reference answer (alpaca_en_demo.json: GPT-4's) is preferred to an answer sampled from the SFT model,
the construction of reference-vs-policy preference sets such as Intel/orca_dpo_pairs (GPT-4 over Llama-2-13B) and
SPIN. The reward model thus learns what separates the policy's answers from the reference ones, on the policy's
own distribution, and PPO moves the policy towards them. Both answers are cut to `max_answer_tokens`, so answer
length alone separates fewer pairs. Instructions the SFT run held out (its eval_split_size and seed) are never
used: they stay unseen by the reward model, so the evaluation can judge answers to them.

Output: output_dir/comparisons.jsonl, rows {prompt, chosen, rejected, source_row} (the prompt as SFT rendered it, or
chat turns), appended after every batch (rerun the same command to continue), and comparisons_info.json (the
settings and counts), replaced after the batch's rows are written. Samples equal to the reference or empty are
skipped and counted. A run killed (even kill -9) between writing a batch and recording it leaves rows that
comparisons_info.json does not count: the rerun removes them and samples that batch again (same seed, same rows),
so no pair is written twice.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.sft_split import sft_held_out_rows, split_examples
from chatgpt_recipes.data.templates import example_prompt
from chatgpt_recipes.evaluation.metrics import sample_answers
from chatgpt_recipes.modeling.generation import stop_token_ids
from chatgpt_recipes.modeling.loading import load_for_inference
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.runtime.precision import inference_dtype


@dataclass
class ComparisonDataConfig:
    """Which policy samples, which instructions and reference answers, how much, where the pairs go."""

    model_name_or_path: str = field(default="smollm2-135m-instruct", metadata={"help": "The SFT policy."})
    dataset_name: str = field(default="data/alpaca_en_demo.json",
                              metadata={"help": "The SFT data: instructions with reference answers."})
    dataset_split: str = field(default="train")
    sft_eval_split_size: float = field(default=40, metadata={
        "help": "The instructions SFT held out are never used: read from the SFT model's sft_split.json; without "
                "one, SFT's eval_split_size and seed recompute them. 0 holds nothing out."})
    seed: int = field(default=42, metadata={"help": "The SFT run's split seed; also the sampling seed."})
    num_pairs: int = field(default=400, metadata={"help": "Pairs to write (one per instruction)."})
    max_answer_tokens: int = field(default=64, metadata={"help": "Both answers are cut to this many tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the policy's answers."})
    batch_size: int = field(default=16)
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware computes it natively, else "
                                                         "fp16 on CUDA or fp32), float32 or bfloat16."})
    output_dir: str = field(default="outputs/comparisons-smollm2")
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})


def reference_answer(example: dict) -> str:
    return example["completion"] if "completion" in example else example["messages"][-1]["content"]


def comparison_row(example: dict, chosen: str, rejected: str, source_row: int) -> dict:
    """A pair in the shape chatgpt_recipes.data.preferences reads: the prompt as SFT rendered it (Alpaca template, plain
    text) or the chat turns before the answer."""
    prompt = example["messages"][:-1] if "messages" in example else example["prompt"]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source_row": source_row}


def record(info_path: str, info: dict) -> None:
    """comparisons_info.json replaced whole (written beside it, then renamed): a kill leaves the old or the new."""
    with open(info_path + ".tmp", "w") as file:
        json.dump(info, file, indent=1)
    os.replace(info_path + ".tmp", info_path)


def recorded_pairs(output: str, recorded: int) -> int:
    """The pairs of `output` that comparisons_info.json counts. Rows after them (a batch written but not recorded,
    or a line cut short) are removed: the run goes on from the recorded position and writes them again."""
    if not os.path.isfile(output):
        return 0
    with open(output, "rb") as file:
        lines = file.read().split(b"\n")
    complete = lines[:-1]  # the text after the last newline is an unfinished line
    if len(complete) < recorded:
        raise ConfigError(f"{output} holds {len(complete)} pairs but comparisons_info.json records {recorded}: the "
                          "file was edited; delete the output directory to start again")
    if len(complete) > recorded or lines[-1]:
        say(f"[comparisons] {len(complete) - recorded} pairs written but not recorded by an interrupted run: "
            "removed, their batch is sampled again", flush=True)
        with open(output + ".tmp", "wb") as file:
            file.write(b"".join(line + b"\n" for line in complete[:recorded]))
        os.replace(output + ".tmp", output)
    return recorded


def main(config: ComparisonDataConfig):
    held_out_rows = sft_held_out_rows([config.model_name_or_path], config.dataset_name, config.dataset_split,
                                      "sft_eval_split_size", config.sft_eval_split_size, config.seed)
    usable, held_out = split_examples(config.dataset_name, config.dataset_split, held_out_rows)
    if config.num_pairs > len(usable):
        raise ConfigError(f"num_pairs={config.num_pairs}: {config.dataset_name} has {len(usable)} instructions "
                          f"outside the SFT held-out split ({len(held_out)} rows)")
    os.makedirs(config.output_dir, exist_ok=True)
    output = os.path.join(config.output_dir, "comparisons.jsonl")
    info_path = os.path.join(config.output_dir, "comparisons_info.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {"skipped": {}, "tried": 0, "pairs": 0}
    done = recorded_pairs(output, info["pairs"])
    if done:
        say(f"[comparisons] resuming: {output} holds {done} of {config.num_pairs} pairs", flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
    tokenizer, model = load_for_inference(config.model_name_or_path,
                                          dtype=inference_dtype(config.dtype, config.use_cpu))
    model.to(device)
    stops = stop_token_ids(tokenizer, model)
    position = info["tried"]
    while done < config.num_pairs and position < len(usable):
        batch = usable[position: position + config.batch_size]
        sampled = sample_answers(model, tokenizer, [example_prompt(e, tokenizer) for _, e in batch], stops,
                                 config.max_answer_tokens, config.temperature, config.seed + position,
                                 config.batch_size)
        pairs = []
        for (number, example), answer in zip(batch, sampled["answers"]):
            reference_ids = tokenizer(reference_answer(example), add_special_tokens=False)["input_ids"]
            reference = tokenizer.decode(reference_ids[: config.max_answer_tokens], skip_special_tokens=True).strip()
            reason = ("empty sample" if not answer else "sample equal to the reference" if answer == reference
                      else None)
            if reason:
                info["skipped"][reason] = info["skipped"].get(reason, 0) + 1
            elif done + len(pairs) < config.num_pairs:
                pairs.append(comparison_row(example, reference, answer, number))
        with open(output, "a") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs)
        done, position = done + len(pairs), position + len(batch)
        info.update(tried=position, pairs=done, settings=asdict(config))
        record(info_path, info)
        say(f"[comparisons] {done}/{config.num_pairs} pairs", flush=True)
    if done < config.num_pairs:
        raise ConfigError(f"only {done} pairs from the {len(usable)} usable instructions (skipped: "
                          f"{info['skipped']}); lower num_pairs")
    skipped = ", ".join(f"{reason}: {count}" for reason, count in info["skipped"].items()) or "none"
    say(f"\n=== Comparison data ===\n{done} pairs (reference answer preferred to the policy's sample) in {output}\n"
        f"skipped samples: {skipped}\nheld out (SFT's split, never used): {len(held_out)} instructions", flush=True)
    first = json.loads(open(output).readline())
    say(f"\nexample instruction: {first.get('instruction', first.get('prompt'))}\nchosen (reference): "
        f"{first['chosen'][:300]}\nrejected (policy): {first['rejected'][:300]}", flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (ComparisonDataConfig,), "comparison_data/smollm2_alpaca.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

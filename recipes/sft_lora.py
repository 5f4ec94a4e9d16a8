"""Supervised fine-tuning (instruction tuning) of any causal LM: full, LoRA or 4-bit QLoRA, loss on responses only.

    # the embedded demo: LoRA on SmolLM2-135M-Instruct with the bundled Alpaca sample, CPU, offline
    accelerate launch recipes/sft_lora.py
    # another model or dataset, any option overridden on the command line
    accelerate launch recipes/sft_lora.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name tatsu-lab/alpaca
    # a YAML recipe; a DeepSpeed launcher
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft_lora.py \
        --config recipes/configs/sft/qwen2.5_alpaca_qlora.yaml

The prompt format follows the shape of most rows: Alpaca rows {instruction, input, output} are rendered with the
Alpaca prompt (stanford_alpaca's with-input / no-input variants); chat rows {messages} or ShareGPT {conversations}
with the tokenizer's chat template (a fallback one for tokenizers without, e.g. gpt2); {prompt, completion} rows as
they are (chatgpt_recipes.data.templates). Rows of another shape are rendered in that format, or skipped and counted if they
cannot be. The format is printed at start and recorded in stage_info.json, which the later stages and chat.py read.
Rerunning the same command after an interruption resumes from the newest checkpoint in output_dir.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import os
from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.options import DataArguments
from chatgpt_recipes.data.rows import SkipLog, column, eval_source, train_and_eval
from chatgpt_recipes.data.sft import prepare_sft, streamed_sft
from chatgpt_recipes.data.sft_split import SPLIT_FILE, record_sft_split
from chatgpt_recipes.data.templates import example_prompt, save_stage_info
from chatgpt_recipes.evaluation.reporting import record_metrics, write_training_report
from chatgpt_recipes.modeling.generation import generate
from chatgpt_recipes.modeling.kernels import enable_fast_training, gpu_training_defaults
from chatgpt_recipes.modeling.loading import (ModelArguments, check_context_length, load_model, load_tokenizer,
                                              lora_config)
from chatgpt_recipes.runtime import compat
from chatgpt_recipes.runtime.errors import ConfigError, DataError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import train_with_resume
from chatgpt_recipes.training.time_budget import TimeBudgetArguments

FORMAT_HELP = {
    "alpaca": "Alpaca rows: the Alpaca prompt template, loss on the response and EOS",
    "chat": "chat rows: the tokenizer's chat template, loss on every assistant turn and its end-of-turn token",
    "plain": "prompt/completion rows as they are, loss on the completion and EOS",
}


@dataclass
class SFTRecipeConfig(DataArguments, TimeBudgetArguments, SFTConfig):
    """TRL's SFTConfig plus where the data comes from (DataArguments: columns, max_skipped_fraction, separate eval
    data; SFTConfig's dataset_num_proc sets the preparation workers)."""

    dataset_name: str = field(default="data/alpaca_en_demo.json",
                              metadata={"help": "Local json/jsonl/csv/parquet file or hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_split_size: float = field(default=0.05, metadata={
        "help": "Held-out fraction (<1) or row count, when there is no eval_dataset_name / eval_split."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the rows (a hub dataset or a jsonl file), tokenised as training reads them; needs max_steps."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    overlong: str = field(default="drop", metadata={"help": "Examples over max_length: drop or truncate."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of the before/after demo answers."})
    gpu_tokens_per_step: int = field(default=8192, metadata={
        "help": "On a CUDA GPU, up to this many tokens per device step (max_length each): per_device_train_batch_size "
                "raised, in place of gradient_accumulation_steps first, then with max_steps (and the step counts) "
                "shortened to the same examples seen; printed. 0 keeps the YAML's batch. No effect on a CPU."})


def main(config: SFTRecipeConfig, model_args: ModelArguments):
    # Data: rows -> SFT examples in the file's prompt format -> input_ids/labels with prompts masked (cached)
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    skips = SkipLog()
    if config.streaming:
        train_dataset, eval_dataset, data_format, demo_prompt = streamed_data(config, tokenizer, skips)
        held_out = None  # a stream's held-out rows are its first ones: no record, later stages recompute them
    else:
        train_data = prepare_sft(config.dataset_name, config.dataset_split, tokenizer, config.max_length,
                                 config.overlong, config.columns, config.dataset_num_proc, config.max_skipped_fraction)
        data_format = train_data.prompt_format
        eval_data, train_rows, eval_rows, data_skips, separate = train_and_eval(
            config, train_data, lambda source, split: prepare_sft(
                source, split, tokenizer, config.max_length, config.overlong, config.columns, config.dataset_num_proc,
                config.max_skipped_fraction, data_format=data_format))
        skips.extend(data_skips)
        train_dataset = train_data.select(train_rows)
        eval_dataset = eval_data.select(eval_rows) if eval_rows else None
        row_numbers = column(eval_data.dataset, "row")
        held_out = (separate or (config.dataset_name, config.dataset_split)), [row_numbers[i] for i in eval_rows]
        demo = eval_data.example(eval_rows[0]) if eval_rows else train_data.example(train_rows[0])
        demo_prompt = example_prompt(demo, tokenizer)
        say(f"[data] {config.dataset_name}: {len(train_dataset)} training examples, "
            f"{len(eval_dataset) if eval_dataset is not None else 0} eval examples"
            f"{f' (from {separate[0]}, split {separate[1]})' if separate else ''}, prompt format '{data_format}' "
            f"({FORMAT_HELP[data_format]})", flush=True)
    if PartialState().is_main_process:
        skips.write(config.output_dir)  # again at the end: streamed rows are skipped as training reads them

    # Model: full, LoRA or QLoRA by the model arguments
    model = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
    check_context_length(model.config, config.max_length, "max_length", model_args.model_name_or_path)
    base_answer = generate(model, tokenizer, demo_prompt, config.sample_max_new_tokens)

    gpu_training_defaults(config, PartialState().device.type)  # Liger kernels, batch by tokens: CUDA only
    with compat.quiet_trl_packing_warnings(config, model):  # enable_fast_training gives per-example attention
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(model_args, model),
        )
    enable_fast_training(trainer)  # packed attention, fused loss (chatgpt_recipes/modeling/kernels.py)
    train_result = train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards

    # Save: adapter or full model, tokenizer, metrics, model card
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        save_stage_info(config.output_dir, "sft", data_format)
        if held_out is not None:
            record_sft_split(config.output_dir, (config.dataset_name, config.dataset_split), *held_out, data_format,
                             config.eval_split_size, config.seed)
            say(f"[split] {len(held_out[1])} held-out rows of {held_out[0][0]} recorded in "
                f"{os.path.join(config.output_dir, SPLIT_FILE)}: later stages leave them out", flush=True)
        skips.write(config.output_dir)
    metrics = record_metrics(trainer, train_result, evaluate=eval_dataset is not None)
    # Report: the same held-out prompt answered before and after tuning (on every rank: sharded weights under
    # DeepSpeed ZeRO-3 are gathered collectively)
    tuned_answer = generate(trainer.model, tokenizer, demo_prompt, config.sample_max_new_tokens)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=os.path.basename(os.path.abspath(config.output_dir)))
        write_training_report(
            config.output_dir, "SFT", trainer.state.log_history, metrics,
            {"Held-out prompt": f"```\n{demo_prompt}\n```", "Base model answer": base_answer,
             "Tuned model answer": tuned_answer, "Skipped rows": skips.markdown()})
        say(f"\n=== Held-out prompt ===\n{demo_prompt}\n=== Base model ===\n{base_answer}\n"
            f"=== Tuned model ===\n{tuned_answer}\n\nSaved to {config.output_dir}", flush=True)


def streamed_data(config: SFTRecipeConfig, tokenizer, skips: SkipLog):
    """Streamed training rows, and eval_split_size (a count) eval rows: from eval_dataset_name / eval_split, else
    the first rows of the stream, which training then skips."""
    if config.max_steps <= 0:
        raise ConfigError("streaming: the data's length is unknown, so set max_steps (num_train_epochs cannot end it)")
    if 0 < config.eval_split_size < 1:
        raise ConfigError("streaming: the data's length is unknown, so eval_split_size must be a row count")
    separate, eval_rows = eval_source(config), int(config.eval_split_size)
    args = (tokenizer, config.max_length, config.overlong, config.columns, skips)
    train_dataset, data_format = streamed_sft(config.dataset_name, config.dataset_split, *args,
                                              skip_rows=0 if separate else eval_rows)
    eval_dataset = None
    if eval_rows:
        source, split = separate or (config.dataset_name, config.dataset_split)
        eval_stream, _ = streamed_sft(source, split, *args, data_format=data_format, take_rows=eval_rows)
        eval_dataset = Dataset.from_list(list(eval_stream))
    first = next(iter(eval_dataset if eval_dataset else train_dataset), None)
    if first is None:
        raise DataError(f"{config.dataset_name}: no usable rows in the stream")
    answer_start = next((i for i, label in enumerate(first["labels"]) if label != -100), len(first["labels"]))
    say(f"[data] {config.dataset_name}: streamed, prompt format '{data_format}' ({FORMAT_HELP[data_format]})",
        flush=True)
    return train_dataset, eval_dataset, data_format, tokenizer.decode(first["input_ids"][:answer_start])


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

"""Supervised fine-tuning (instruction tuning) of any causal LM: full, LoRA or 4-bit QLoRA, loss on responses only.

    # the embedded demo: LoRA on SmolLM2-135M-Instruct with the bundled Alpaca sample, CPU, offline
    accelerate launch recipes/sft_lora.py
    # another model or dataset, any option overridden on the command line
    accelerate launch recipes/sft_lora.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name tatsu-lab/alpaca
    # a YAML recipe; a DeepSpeed launcher
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft_lora.py \
        --config recipes/configs/sft/alpaca_qlora.yaml

Data: Alpaca rows {instruction, input, output} (rendered with the Alpaca prompt), chat rows {messages} or
ShareGPT {conversations} (rendered with the tokenizer's chat template), or {prompt, completion}.
Rerunning the same command after an interruption resumes from the newest checkpoint in output_dir.
"""

import logging
import os
from dataclasses import dataclass, field

from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from common.config import parse_config
from common.data import prompt_of, read_rows, sft_rows, split_train_eval, tokenize_sft
from common.generation import generate
from common.models import ModelArguments, load_model, load_tokenizer, lora_config
from common.reporting import write_training_report


@dataclass
class SFTRecipeConfig(SFTConfig):
    """TRL's SFTConfig plus where the data comes from."""

    dataset_name: str = field(default="data/alpaca_en_demo.json",
                              metadata={"help": "Local json/jsonl/csv/parquet file or hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_split_size: float = field(default=0.05, metadata={"help": "Held-out fraction (<1) or row count."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    overlong: str = field(default="drop", metadata={"help": "Examples over max_length: drop or truncate."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of the before/after demo answers."})


def main(config: SFTRecipeConfig, model_args: ModelArguments):
    # Data: rows -> SFT examples -> a held-out split -> input_ids/labels with prompts masked
    examples, _ = sft_rows(read_rows(config.dataset_name, config.dataset_split), config.dataset_name)
    train_examples, eval_examples = split_train_eval(examples, config.eval_split_size, config.seed)
    if config.max_train_samples:
        train_examples = train_examples[: config.max_train_samples]
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    train_dataset = tokenize_sft(train_examples, tokenizer, config.max_length, config.overlong, config.dataset_name)
    eval_dataset = (tokenize_sft(eval_examples, tokenizer, config.max_length, config.overlong, config.dataset_name)
                    if eval_examples else None)

    # Model: full, LoRA or QLoRA by the model arguments
    model = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
    demo_prompt = prompt_of(eval_examples[0] if eval_examples else train_examples[0], tokenizer)
    base_answer = generate(model, tokenizer, demo_prompt, config.sample_max_new_tokens)

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, model),
    )
    checkpoint = config.resume_from_checkpoint or (
        get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None)
    if checkpoint:
        print(f"Resuming from {checkpoint}", flush=True)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # Save: adapter or full model, tokenizer, metrics, model card
    trainer.save_model(config.output_dir)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = dict(train_result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=os.path.basename(os.path.abspath(config.output_dir)))

        # Report: the same held-out prompt answered before and after tuning
        tuned_answer = generate(trainer.model, tokenizer, demo_prompt, config.sample_max_new_tokens)
        write_training_report(
            config.output_dir, "SFT", trainer.state.log_history, metrics,
            {"Held-out prompt": f"```\n{demo_prompt}\n```", "Base model answer": base_answer,
             "Tuned model answer": tuned_answer})
        print(f"\n=== Held-out prompt ===\n{demo_prompt}\n=== Base model ===\n{base_answer}\n"
              f"=== Tuned model ===\n{tuned_answer}\n\nSaved to {config.output_dir}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml"))

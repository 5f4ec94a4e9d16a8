"""Supervised fine-tuning (instruction tuning) of any causal LM: full, LoRA or 4-bit QLoRA, loss on responses only.

    # the embedded demo: LoRA on SmolLM2-135M-Instruct with the bundled Alpaca sample, CPU, offline
    accelerate launch recipes/sft_lora.py
    # another model or dataset, any option overridden on the command line
    accelerate launch recipes/sft_lora.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name tatsu-lab/alpaca
    # a YAML recipe; a DeepSpeed launcher
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft_lora.py \
        --config recipes/configs/sft/alpaca_qlora.yaml

The prompt format follows the data, row by row: Alpaca rows {instruction, input, output} are rendered with the
Alpaca prompt (stanford_alpaca's with-input / no-input variants); chat rows {messages} or ShareGPT {conversations}
with the tokenizer's chat template (a fallback one for tokenizers without, e.g. gpt2); {prompt, completion} rows as
they are. The format is printed at start and saved as prompt_format.json, which chat.py reads.
Rerunning the same command after an interruption resumes from the newest checkpoint in output_dir.
"""

import json
import os
from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from common.callbacks import train_with_resume
from common.config import run
from common.data import prompt_format, prompt_of, read_rows, sft_rows, split_train_eval, tokenize_sft
from common.generation import generate
from common.models import ModelArguments, check_context_length, load_model, load_tokenizer, lora_config
from common.reporting import record_metrics, write_training_report
from common.speed import enable_fast_training


FORMAT_HELP = {
    "alpaca": "Alpaca rows: the Alpaca prompt template, loss on the response and EOS",
    "chat": "chat rows: the tokenizer's chat template, loss on every assistant turn and its end-of-turn token",
    "plain": "prompt/completion rows as they are, loss on the completion and EOS",
}


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
    rows = read_rows(config.dataset_name, config.dataset_split)
    examples, _ = sft_rows(rows, config.dataset_name)
    data_format = prompt_format(rows)
    print(f"[data] {config.dataset_name}: {len(examples)} examples, prompt format '{data_format}' "
          f"({FORMAT_HELP[data_format]})", flush=True)
    train_examples, eval_examples = split_train_eval(examples, config.eval_split_size, config.seed)
    if config.max_train_samples:
        train_examples = train_examples[: config.max_train_samples]
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    train_dataset = tokenize_sft(train_examples, tokenizer, config.max_length, config.overlong, config.dataset_name)
    eval_dataset = (tokenize_sft(eval_examples, tokenizer, config.max_length, config.overlong, config.dataset_name)
                    if eval_examples else None)

    # Model: full, LoRA or QLoRA by the model arguments
    model = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
    check_context_length(model.config, config.max_length, "max_length", model_args.model_name_or_path)
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
    enable_fast_training(trainer)  # packed attention, fused loss (common/speed.py)
    train_result = train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards

    # Save: adapter or full model, tokenizer, metrics, model card
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "prompt_format.json"), "w") as file:
            json.dump({"prompt_format": data_format}, file)
    metrics = record_metrics(trainer, train_result, evaluate=eval_dataset is not None)
    # Report: the same held-out prompt answered before and after tuning (on every rank: sharded weights under
    # DeepSpeed ZeRO-3 are gathered collectively)
    tuned_answer = generate(trainer.model, tokenizer, demo_prompt, config.sample_max_new_tokens)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=os.path.basename(os.path.abspath(config.output_dir)))
        write_training_report(
            config.output_dir, "SFT", trainer.state.log_history, metrics,
            {"Held-out prompt": f"```\n{demo_prompt}\n```", "Base model answer": base_answer,
             "Tuned model answer": tuned_answer})
        print(f"\n=== Held-out prompt ===\n{demo_prompt}\n=== Base model ===\n{base_answer}\n"
              f"=== Tuned model ===\n{tuned_answer}\n\nSaved to {config.output_dir}", flush=True)


if __name__ == "__main__":
    run(main, (SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml")

"""Pretraining of a GPT-style base model from scratch (tokenizer included), or continued pretraining of an existing
model on domain text (full or LoRA): next-token prediction on fixed-length blocks of a plain-text corpus.

    # the embedded demo: a byte-level BPE and a tiny GPT trained on the bundled Wikipedia sample, CPU, offline
    accelerate launch recipes/pretrain.py
    # GPT-2 small (124M) from scratch on a streamed hub corpus (GPU)
    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain/gpt2_small.yaml
    # continued pretraining of an existing model on your own text, LoRA
    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain/smollm2_continued_lora.yaml \
        --dataset_name my_domain.jsonl
    # the output is a base model that the SFT recipe takes by path
    accelerate launch recipes/sft_lora.py --model_name_or_path outputs/pretrain-tiny-gpt-wiki --use_peft false ...

Documents are joined with EOS between them and cut into blocks of block_size tokens; every token of the corpus is
in exactly one block per epoch (the last block may be shorter: its padding is masked out of the loss). The first
eval_documents documents are held out; eval perplexity is logged during training.
Rerunning the same command after an interruption resumes from the newest checkpoint in output_dir.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import math
import os
from dataclasses import dataclass, field
from itertools import islice

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.rows import SkipLog
from chatgpt_recipes.data.text import block_dataset, document_skips, load_documents, split_documents
from chatgpt_recipes.data.tokenizer_training import check_vocab_size, train_bpe_tokenizer
from chatgpt_recipes.evaluation.reporting import record_metrics, write_training_report
from chatgpt_recipes.modeling.generation import generate
from chatgpt_recipes.modeling.loading import (ModelArguments, check_context_length, load_model, load_tokenizer,
                                              lora_config, resolve_model_path)
from chatgpt_recipes.runtime.compat import models_built_whole
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import train_with_resume
from chatgpt_recipes.training.time_budget import TimeBudgetArguments

# GPT-2 architecture sizes for a fresh model; the vocabulary comes from the tokenizer.
MODEL_PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=512),  # ~1.4M parameters: CPU demos and tests
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # GPT-2 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),  # GPT-2 355M
}


@dataclass
class PretrainConfig(TimeBudgetArguments, TrainingArguments):
    """transformers' TrainingArguments plus the corpus, the tokenizer and the fresh model's architecture."""

    dataset_name: str = field(default="data/wiki_demo.txt", metadata={
        "help": "Local .txt/.json/.jsonl/.csv/.parquet file or glob, or a hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config (subset) of a hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column that holds the text (not for .txt)."})
    txt_sample_by: str = field(default="line", metadata={
        "help": "A .txt file's documents: one per line, paragraph (blank-line separated) or document (file)."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the corpus (memory does not grow with it); needs max_steps."})
    max_skipped_fraction: float = field(default=0.05, metadata={
        "help": "A corpus whose non-text documents (skipped, listed in skipped_rows.jsonl) exceed this share is an "
                "error."})
    eval_documents: int = field(default=2, metadata={"help": "Hold out the first N documents for perplexity."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training block."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Reuse this tokenizer (name or path) for a fresh model; unset: train a byte-level BPE."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of the trained BPE."})
    tokenizer_max_documents: int | None = field(default=None, metadata={
        "help": "Train the BPE on only the first N training documents (for large or streamed corpora)."})
    model_config: str = field(default="tiny", metadata={
        "help": f"Fresh model: a preset {sorted(MODEL_PRESETS)} or any AutoConfig hub id or path."})
    model_config_overrides: str | None = field(default=None, metadata={
        "help": "Fresh model's config changes, e.g. 'n_layer=2,n_embd=64'."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Length of the sample continuations."})


class PerplexityTrainer(Trainer):
    """Trainer that logs eval perplexity, exp(mean token loss on the held-out blocks), next to eval_loss."""

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 30.0))
        super().log(logs, *args, **kwargs)


def fresh_model_config(config: PretrainConfig, tokenizer):
    """The architecture of a model trained from scratch: a preset or an AutoConfig, with overrides applied."""
    if config.model_config in MODEL_PRESETS:
        model_config = AutoConfig.for_model("gpt2", **MODEL_PRESETS[config.model_config])
    else:
        model_config = AutoConfig.from_pretrained(resolve_model_path(config.model_config),
                                                  trust_remote_code=config.trust_remote_code)
    if config.model_config_overrides:
        try:
            model_config.update_from_string(config.model_config_overrides)
        except ValueError as error:
            raise ConfigError(f"model_config_overrides '{config.model_config_overrides}': {error}") from error
    model_config.update(dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return model_config


def check_block_size(config: PretrainConfig, model_config, model_name: str) -> None:
    check_context_length(model_config, config.block_size, "block_size", model_name,
                         " (or raise n_positions for a fresh model)")


def main(config: PretrainConfig, model_args: ModelArguments):
    continued = model_args.model_name_or_path is not None
    if continued and config.tokenizer_name:
        raise ConfigError("tokenizer_name is for a fresh model: a model trained further keeps its own tokenizer")
    if not continued:
        check_vocab_size(config.vocab_size)
    if config.txt_sample_by not in ("line", "paragraph", "document"):
        raise ConfigError(f"txt_sample_by must be line, paragraph or document, not {config.txt_sample_by!r}")
    if config.streaming and config.max_steps <= 0:
        raise ConfigError("streaming: the corpus length is unknown, so set max_steps (num_train_epochs cannot end it)")
    if config.eval_documents <= 0 and (config.eval_strategy != "no" or config.eval_on_start):
        raise ConfigError("eval_documents: 0 leaves nothing to evaluate: also set eval_strategy: no and "
                          "eval_on_start: false")

    # Data: documents, the first eval_documents held out
    documents = load_documents(config.dataset_name, config.dataset_text_field, config.dataset_split,
                               config.dataset_config, config.streaming, config.txt_sample_by)
    skips = SkipLog()
    if not config.streaming:  # a streamed corpus counts its blank and non-text documents as training reads it
        skips = document_skips(documents, config.dataset_name)
        skips.report(config.dataset_name, len(documents))
        skips.check_fraction(config.dataset_name, len(documents), config.max_skipped_fraction)
        if config.should_save:
            skips.write(config.output_dir)
    train_documents, eval_documents = split_documents(documents, config.eval_documents, config.dataset_name)

    # Tokenizer and model: an existing model trained further, or a fresh one (with a tokenizer trained here)
    if continued:
        tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
        check_block_size(config, AutoConfig.from_pretrained(resolve_model_path(model_args.model_name_or_path),
                                                            trust_remote_code=config.trust_remote_code),
                         model_args.model_name_or_path)
        model = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
        peft_config = lora_config(model_args, model)
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
            model.print_trainable_parameters()
    else:
        if config.tokenizer_name:
            tokenizer = load_tokenizer(config.tokenizer_name, config.trust_remote_code)
        else:
            say(f"Training a byte-level BPE tokenizer (vocab_size={config.vocab_size}) on {config.dataset_name}",
                flush=True)
            texts = (row["text"] for row in train_documents if isinstance(row["text"], str) and row["text"])
            tokenizer = train_bpe_tokenizer(islice(texts, config.tokenizer_max_documents), config.vocab_size,
                                            config.block_size)
        model_config = fresh_model_config(config, tokenizer)
        check_block_size(config, model_config, config.model_config)
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
        say(f"Fresh {model_config.model_type} model: {sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"vocabulary {len(tokenizer)}", flush=True)

    with config.main_process_first(desc="token blocks"):  # built once, then read from the datasets cache
        train_dataset = block_dataset(train_documents, tokenizer, config.block_size, config.dataset_name,
                                      first_row=max(config.eval_documents, 0) + 1)
        eval_dataset = (block_dataset(eval_documents, tokenizer, config.block_size,
                                      f"{config.dataset_name} (held-out documents)") if eval_documents is not None else None)
    if config.streaming:
        next(iter(train_dataset))  # fail now, not mid-training, on a corpus shorter than one block
        train_dataset = train_dataset.shuffle(seed=config.seed, buffer_size=1000)
    else:
        say(f"{len(train_dataset)} training blocks of {config.block_size} tokens", flush=True)

    held_out = next(row["text"] for row in (eval_documents if eval_documents is not None else train_documents)
                    if isinstance(row["text"], str) and row["text"].strip())
    sample_prompt = " ".join(held_out.split()[:12])

    def sample(model) -> str:
        torch.manual_seed(config.seed)
        return generate(model, tokenizer, sample_prompt, config.sample_max_new_tokens, do_sample=True, temperature=0.8)

    # Pad only the last, shorter block; the collator masks padding (never EOS: pad != EOS) out of the labels
    trainer = PerplexityTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    sample_before = sample(trainer.model)  # every rank: under ZeRO-3 generation gathers the weights, a collective

    train_result = train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards

    # Save: model (or LoRA adapter) with its tokenizer, metrics, model card
    trainer.save_model(config.output_dir)
    evals = [entry["eval_perplexity"] for entry in trainer.state.log_history if "eval_perplexity" in entry]
    metrics = record_metrics(trainer, train_result, evaluate=eval_dataset is not None)
    if config.eval_on_start and evals:  # the untrained model's perplexity, logged at step 0
        metrics["before_perplexity"] = evals[0]
    if is_deepspeed_zero3_enabled():  # the engine's sharded weights: sample from the saved (gathered) model instead
        trainer.accelerator.wait_for_everyone()  # once the main process has written it
        with models_built_whole():
            sample_after = sample(AutoModelForCausalLM.from_pretrained(config.output_dir, use_safetensors=True))
    else:
        sample_after = sample(trainer.model)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=os.path.basename(os.path.abspath(config.output_dir)))

        # Report: held-out perplexity and a sample continuation before and after training
        perplexities = (f"{metrics.get('before_perplexity', float('nan')):.1f} -> {metrics['eval_perplexity']:.1f}"
                        if eval_dataset is not None else "no held-out documents (eval_documents: 0)")
        write_training_report(
            config.output_dir, "Continued pretraining" if continued else "Pretraining", trainer.state.log_history,
            metrics, {"Held-out perplexity (before -> after)": perplexities,
                      "Prompt": f"```\n{sample_prompt}\n```", "Continuation before training": sample_before,
                      "Continuation after training": sample_after, "Skipped rows": skips.markdown()},
            plot_keys=("loss", "eval_loss", "eval_perplexity"))
        say(f"\n=== Held-out perplexity: {perplexities} ===\n=== Prompt ===\n{sample_prompt}\n"
            f"=== Before training ===\n{sample_before}\n=== After training ===\n{sample_after}\n\n"
            f"Saved to {config.output_dir}", flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (PretrainConfig, ModelArguments), "pretrain/tiny_gpt_wiki.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

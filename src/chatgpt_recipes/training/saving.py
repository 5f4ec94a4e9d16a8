"""A trained model whole, for what follows training (centering, evaluation, saving) in the stages whose output the
next stage loads as a plain model (reward model, DPO, RLOO, PPO): a LoRA adapter merged into its base (reloaded in
the checkpoint's dtype when training held it rounded), and under ZeRO-3 the shards gathered first. `whole_model` is
the one collective-safe way there: every rank calls it, the main process then saves."""

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from chatgpt_recipes.data.sft_split import carry_sft_split
from chatgpt_recipes.data.templates import save_stage_info
from chatgpt_recipes.evaluation.reporting import save_json, write_training_report
from chatgpt_recipes.modeling.generation import zero3_gathered
from chatgpt_recipes.modeling.loading import ModelArguments, load_adapter, load_model, resolve_model_path
from chatgpt_recipes.runtime.compat import models_built_whole
from chatgpt_recipes.runtime.output import head_replaced_on_load


@contextmanager
def whole_model(accelerator, model, model_args: ModelArguments, tokenizer, num_labels: int | None = None):
    """The trained `model` (as prepared by accelerate, or unwrapped) as one plain transformers model with all its
    weights on every rank, for the duration. A collective under ZeRO-3 (the shards are gathered): every rank must
    enter, even where only the main process saves. Without ZeRO-3 it costs nothing extra."""
    unwrapped = accelerator.unwrap_model(model)
    with zero3_gathered(unwrapped), models_built_whole():
        yield merged_model(unwrapped, model_args, tokenizer, num_labels)
    accelerator.wait_for_everyone()


def merged_model(model, model_args: ModelArguments, tokenizer, num_labels: int | None = None):
    """A trained model as one plain transformers model: a LoRA adapter merged into its base. When training held
    the base in 4/8 bits or in a dtype other than the checkpoint's (bf16 frozen weights), the adapter is merged
    into the base reloaded in the checkpoint's own dtype: merging into rounded weights would round a small update
    away."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if not (model_args.load_in_4bit or model_args.load_in_8bit or model_args.dtype not in (None, "auto")):
        return model.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        full = replace(model_args, load_in_4bit=False, load_in_8bit=False, dtype=checkpoint_dtype(model_args))
        device = next(model.parameters()).device
        with head_replaced_on_load():
            base = load_model(full, tokenizer, num_labels=num_labels)  # on this process's GPU when there is one
        if base.device != device:
            base.to(device)
        return load_adapter(base, tmp).merge_and_unload()


def checkpoint_dtype(model_args: ModelArguments) -> str:
    """The dtype the model's checkpoint is stored in (its config.json), float32 when it does not say."""
    config_file = Path(resolve_model_path(model_args.model_name_or_path)) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def save_aligned_policy(trainer, policy, config, model_args: ModelArguments, tokenizer, stage: str, reward_path: str,
                        metrics: dict, report_sections: dict, plot_keys: list[str],
                        extra_files: dict | None = None) -> None:
    """The end of an RL recipe (ppo, rloo, grpo). On every rank (a collective under ZeRO-3): the policy merged into
    one plain model in output_dir. On the main process: its tokenizer, stage_info.json, `<stage>_results.json`
    (metrics), SFT's sft_split.json carried on, `extra_files` ({file name: JSON content}) and report.md with plots of `plot_keys`."""
    with whole_model(trainer.accelerator, policy, model_args, tokenizer) as merged:
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(config.output_dir, safe_serialization=True)
    if not trainer.accelerator.is_main_process:
        return
    tokenizer.save_pretrained(config.output_dir)
    save_stage_info(config.output_dir, stage, config.prompt_format, reward_model=reward_path,
                    policy=model_args.model_name_or_path, system_prompt=getattr(config, "system_prompt", None))
    carry_sft_split(model_args.model_name_or_path, config.output_dir)
    save_json(os.path.join(config.output_dir, f"{stage}_results.json"), metrics)
    for name, content in (extra_files or {}).items():
        save_json(os.path.join(config.output_dir, name), content)
    write_training_report(config.output_dir, stage.upper(), trainer.state.log_history, metrics, report_sections,
                          plot_keys=plot_keys)

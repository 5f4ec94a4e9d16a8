"""Reward model from human preferences (InstructGPT step 2): a scalar-head model trained on pairwise comparisons
or K-wise rankings with TRL's RewardTrainer; full, LoRA or 4-bit QLoRA.

    # the embedded demo: LoRA RM from SmolLM2-135M-Instruct on the bundled preference pairs, CPU, offline
    accelerate launch recipes/reward_model.py
    # from the SFT model, so the RM reads prompts exactly as the policy writes them (the three-stage path)
    accelerate launch recipes/reward_model.py --model_name_or_path outputs/sft-smollm2-alpaca-lora
    # HH-RLHF transcripts, chat prompts, a DeepSpeed launcher
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/reward_model.py \
        --dataset_name Anthropic/hh-rlhf --prompt_format chat

Data: pairs ({prompt, chosen, rejected} as text or chat turns, ShareGPT {conversations, chosen, rejected},
HH-RLHF transcripts) or K-wise rankings {prompt, responses: [best, ..., worst]} (see chatgpt_recipes/data/preferences.py).
Each ranking gives its C(K,2) pairs weighted 1/C(K,2), all in the same step. The score is read at the EOS that
ends each answer. After training, the mean reward on training answers is stored as `reward_offset` in
config.json, so the PPO/RLOO loaders see centred rewards. Output: a plain sequence-classification model (LoRA
merged) with tokenizer, eval_results.json (pairwise accuracy, mean margin) and stage_info.json, whose record of
that evaluation the pipeline's evaluation reports rather than scoring the same pairs again.
Rerunning the same command after an interruption resumes from the newest checkpoint in output_dir.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import random
from dataclasses import dataclass, field

from accelerate import PartialState
from trl import RewardConfig

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.options import DataArguments
from chatgpt_recipes.data.preferences import prepare_train_eval_rankings, truncation_markdown
from chatgpt_recipes.data.templates import check_prompt_format, save_stage_info
from chatgpt_recipes.evaluation.reporting import write_training_report
from chatgpt_recipes.modeling.loading import ModelArguments, load_model, load_tokenizer, lora_config, resolve_model_path
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import train_with_resume
from chatgpt_recipes.training.reward import (REWARD_OFFSET_KEY, KWiseRewardTrainer, WeightedPreferenceCollator,
                                             final_evaluation, mean_reward)
from chatgpt_recipes.training.saving import whole_model
from chatgpt_recipes.training.time_budget import TimeBudgetArguments


@dataclass
class RewardRecipeConfig(DataArguments, TimeBudgetArguments, RewardConfig):
    """TRL's RewardConfig plus where the data comes from (DataArguments: columns, max_skipped_fraction, separate
    eval data) and how prompts are rendered."""

    dataset_name: str = field(default="data/dpo_en_demo.json",
                              metadata={"help": "Local json/jsonl/csv/parquet file or hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_split_size: float = field(default=0.1, metadata={
        "help": "Held-out fraction (<1) or prompt count, when there is no eval_dataset_name / eval_split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training prompts."})
    prompt_format: str = field(default="alpaca", metadata={
        "help": "alpaca (the Alpaca template), chat (the tokenizer's chat template) or plain: as SFT rendered them."})
    overlong: str = field(default="truncate", metadata={
        "help": "Conversations past max_length: truncate (cut from the left: oldest turns first, the final exchange "
                "kept; counted) or drop the ranking (counted)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "prompt_format chat: the system turn of conversations that have none. Unset: the chat template's "
                "own default (SmolLM2 adds 16 tokens to every transcript); '' an empty system turn."})
    centering_samples: int = field(default=256, metadata={
        "help": "Training answers scored to estimate the centering offset (their mean reward becomes 0)."})


def main(config: RewardRecipeConfig, model_args: ModelArguments):
    # Data: rows -> rankings -> held-out prompts -> weighted pairs of token ids (prompt rendered as in SFT; cached)
    model_path = resolve_model_path(model_args.model_name_or_path)
    check_prompt_format(model_path, config.prompt_format, "the model")
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    options = dict(max_length=config.max_length, overlong=config.overlong, columns=config.columns,
                   num_proc=config.dataset_num_proc, max_skipped_fraction=config.max_skipped_fraction,
                   system_prompt=config.system_prompt)
    train_data, eval_data, train_rankings, eval_rankings, skips, separate = prepare_train_eval_rankings(
        config, tokenizer, "reward", **options)
    train_dataset = train_data.reward_pairs(train_rankings)
    eval_dataset = eval_data.reward_pairs(eval_rankings) if eval_rankings else None
    truncation = {"train": train_data.truncation(train_rankings), "eval": eval_data.truncation(eval_rankings)}
    say(f"[data] {len(train_dataset)} training pairs from {len(train_data.usable(train_rankings))} prompts, "
        f"{len(eval_dataset) if eval_dataset is not None else 0} eval pairs"
        f"{f' (from {separate[0]}, split {separate[1]})' if separate else ''}; cut from the left to max_length="
        f"{config.max_length}: {truncation['train']['truncated']} training and {truncation['eval']['truncated']} "
        f"eval prompts ({cut_breakdown(truncation)})", flush=True)
    if PartialState().is_main_process:
        skips.write(config.output_dir)

    # Model: a one-output scalar head on the (SFT) model; full, LoRA or QLoRA
    model = load_model(model_args, tokenizer, num_labels=1, trust_remote_code=config.trust_remote_code)
    trainer = KWiseRewardTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=WeightedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        peft_config=lora_config(model_args, model, task_type="SEQ_CLS"),
    )
    train_result = train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards
    metrics = dict(train_result.metrics)
    metrics.update({f"{split}_{key}_rankings": count for split, counts in truncation.items()
                    for key, count in counts.items()})
    if eval_dataset is not None:
        eval_metrics = final_evaluation(trainer)  # eval_accuracy, eval_margin (mean chosen - rejected), eval_pairs
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()

    # Centering: the mean reward of training answers becomes the offset every later loader subtracts
    # (on every rank, which all score the same answers; under ZeRO-3 the weights are gathered for it), then saved
    rows = random.Random(config.seed).sample(range(len(train_dataset)), min(len(train_dataset),
                                                                             config.centering_samples))
    sample = train_dataset.select(rows)
    answers = list({tuple(ids): None for column in ("chosen_ids", "rejected_ids") for ids in sample[column]})
    answers = [list(ids) for ids in answers[: config.centering_samples]]
    with whole_model(trainer.accelerator, trainer.model, model_args, tokenizer, num_labels=1) as reward_model:
        offset = mean_reward(reward_model, answers, tokenizer.pad_token_id, config.per_device_eval_batch_size)
        reward_model.config.pad_token_id = tokenizer.pad_token_id
        setattr(reward_model.config, REWARD_OFFSET_KEY, offset)
        if trainer.accelerator.is_main_process:
            reward_model.save_pretrained(config.output_dir, safe_serialization=True)
    metrics["reward_offset"] = offset

    # Save: tokenizer, how prompts were rendered, the eval metrics PPO checks, report
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(config.output_dir)
        save_stage_info(config.output_dir, "reward_model", config.prompt_format,
                        eval_accuracy=metrics.get("eval_accuracy"), eval_margin=metrics.get("eval_margin"),
                        eval_margin_std=metrics.get("eval_margin_std"), eval_correct=metrics.get("eval_correct"),
                        eval_pairs=len(eval_dataset) if eval_dataset is not None else 0,
                        eval_dataset=(separate[0] if separate else config.dataset_name) if eval_dataset else None,
                        max_length=config.max_length, system_prompt=config.system_prompt, truncation=truncation,
                        reward_offset=offset, base_model=model_args.model_name_or_path)
        write_training_report(config.output_dir, "Reward model", trainer.state.log_history, metrics,
                              {"Skipped rows": skips.markdown(), "Cut to max_length": truncation_markdown(truncation)},
                              plot_keys=["loss", "accuracy", "eval_accuracy", "eval_margin"])
        say(f"\n=== Reward model ===\neval pairwise accuracy: {metrics.get('eval_accuracy', float('nan')):.3f} "
            f"(chance 0.5)\neval mean margin (chosen - rejected): {metrics.get('eval_margin', float('nan')):.3f}\n"
            f"centering offset: {offset:.3f} (the mean reward of {len(answers)} training answers; loaders "
            f"subtract it)\n"
            f"Saved to {config.output_dir}", flush=True)


def cut_breakdown(truncation: dict) -> str:
    """How the cut rankings of both splits were cut, as the README's table quotes it."""
    total = {key: truncation["train"][key] + truncation["eval"][key] for key in ("turns_dropped", "prompt_cut",
                                                                                "answer_cut")}
    return (f"{total['turns_dropped']} lost their oldest turns, {total['prompt_cut']} the start of their last prompt, "
            f"{total['answer_cut']} the end of an answer")


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (RewardRecipeConfig, ModelArguments), "reward/smollm2_dpo_demo_lora.yaml"


if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

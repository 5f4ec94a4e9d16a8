"""Direct Preference Optimization with TRL's DPOTrainer: the policy learns the preferences directly, no reward
model and no sampling; full, LoRA or 4-bit QLoRA.

    # the embedded demo: LoRA DPO of SmolLM2-135M-Instruct on the bundled preference pairs, CPU, offline
    accelerate launch recipes/dpo.py
    # from the SFT model (prompts rendered as SFT rendered them)
    accelerate launch recipes/dpo.py --model_name_or_path outputs/sft-smollm2-alpaca-lora

Data: the same preference shapes as recipes/reward_model.py (pairs, ShareGPT, HH-RLHF, K-wise rankings, which
give all their C(K,2) pairs; DPOTrainer has no pair weights). With LoRA the reference is the model with the adapter
disabled. Output: the policy merged into one model, tokenizer, eval_results.json (rewards/accuracies: how often the
implicit reward prefers the chosen answer on held-out pairs). Rerunning the same command resumes.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

from dataclasses import dataclass, field

from accelerate import PartialState
from trl import DPOConfig, DPOTrainer

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.options import DataArguments
from chatgpt_recipes.data.preferences import prepare_train_eval_rankings, truncation_markdown
from chatgpt_recipes.data.sft_split import carry_sft_split
from chatgpt_recipes.data.templates import check_prompt_format, save_stage_info, tokenizer_ending_answers
from chatgpt_recipes.evaluation.reporting import write_training_report
from chatgpt_recipes.modeling.loading import ModelArguments, load_model, load_tokenizer, lora_config, resolve_model_path
from chatgpt_recipes.rl.inputs import check_policy_path
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import train_with_resume
from chatgpt_recipes.training.saving import whole_model
from chatgpt_recipes.training.time_budget import TimeBudgetArguments


@dataclass
class DPORecipeConfig(DataArguments, TimeBudgetArguments, DPOConfig):
    """TRL's DPOConfig (beta, loss_type, max_length, dataset_num_proc, ...) plus where the data comes from
    (DataArguments: columns, max_skipped_fraction, separate eval data)."""

    dataset_name: str = field(default="data/dpo_en_demo.json", metadata={"help": "Local file or hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_split_size: float = field(default=0.1, metadata={
        "help": "Held-out fraction (<1) or prompt count, when there is no eval_dataset_name / eval_split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training prompts."})
    prompt_format: str = field(default="alpaca", metadata={"help": "alpaca, chat or plain, as in SFT."})


def main(config: DPORecipeConfig, model_args: ModelArguments):
    # Data: preference rows -> rankings -> held-out prompts -> {prompt, chosen, rejected} rendered like SFT
    check_policy_path(model_args.model_name_or_path)
    model_path = resolve_model_path(model_args.model_name_or_path)
    check_prompt_format(model_path, config.prompt_format, "the model")
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    options = dict(max_length=config.max_length, columns=config.columns, num_proc=config.dataset_num_proc,
                   max_skipped_fraction=config.max_skipped_fraction)
    train_data, eval_data, train_rankings, eval_rankings, skips, separate = prepare_train_eval_rankings(
        config, tokenizer, "dpo", **options)
    train_dataset = train_data.dpo_dataset(train_rankings)
    eval_dataset = eval_data.dpo_dataset(eval_rankings) if eval_rankings else None
    # Cut by us from the left, as the reward model's (preferences.fit_dpo_pairs); an answer still longer than the room
    # left is cut at its end by TRL (truncation_mode keep_start): counted as answer_cut
    truncation = {"train": train_data.truncation(train_rankings), "eval": eval_data.truncation(eval_rankings)}
    say(f"[data] {len(train_dataset)} training pairs, {len(eval_dataset) if eval_dataset is not None else 0} eval "
        f"pairs{f' (from {separate[0]}, split {separate[1]})' if separate else ''}; cut to max_length="
        f"{config.max_length}: {truncation['train']['truncated']} training and {truncation['eval']['truncated']} eval "
        f"prompts ({truncation['train']['answer_cut']} and {truncation['eval']['answer_cut']} with an answer cut at "
        "its end)", flush=True)
    if PartialState().is_main_process:
        skips.write(config.output_dir)

    # Model: the policy; with LoRA the reference is the same weights with the adapter disabled
    model = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
    # Each answer already ends with the token that ends an answer (preferences.dpo_pairs); TRL appends its
    # tokenizer's EOS to an answer that does not end with EOS, so it is given that token as EOS: one end token
    trainer = DPOTrainer(model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer_ending_answers(tokenizer, config.prompt_format),
                         peft_config=lora_config(model_args, model))
    train_result = train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards
    metrics = dict(train_result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()

    # Save: the policy merged into one plain model, tokenizer, how prompts were rendered, report
    with whole_model(trainer.accelerator, trainer.model, model_args, tokenizer) as policy:  # on every rank
        if trainer.accelerator.is_main_process:
            policy.save_pretrained(config.output_dir, safe_serialization=True)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(config.output_dir)
        save_stage_info(config.output_dir, "dpo", config.prompt_format, base_model=model_args.model_name_or_path,
                        max_length=config.max_length, truncation=truncation)
        carry_sft_split(model_args.model_name_or_path, config.output_dir)
        write_training_report(config.output_dir, "DPO", trainer.state.log_history, metrics,
                              {"Skipped rows": skips.markdown(), "Cut to max_length": truncation_markdown(truncation)},
                              plot_keys=["loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"])
        accuracy = metrics.get("eval_rewards/accuracies", float("nan"))
        say(f"\n=== DPO ===\neval reward accuracy (implicit reward prefers chosen): {accuracy:.3f} "
            f"(0.5 = chance; 0 before training, when policy = reference)\n"
            f"eval reward margin: {metrics.get('eval_rewards/margins', float('nan')):.4f}\n"
            f"Saved to {config.output_dir}", flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (DPORecipeConfig, ModelArguments), "dpo/smollm2_dpo_demo_lora.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

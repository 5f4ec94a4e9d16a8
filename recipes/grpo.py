"""GRPO (group-relative policy optimisation, DeepSeekMath) against the learned reward model with TRL's GRPOTrainer.
Same prompts, rendering, reward model and checks as ppo.py and rloo.py; no value model: each prompt's
num_generations answers are scored, and an answer's advantage is its reward minus its group's mean (divided by the
group's spread, `scale_rewards`). Rule rewards (`rule_rewards`: length_penalty, format_check) can be added to the
reward model's, weighted by `reward_weights`.

    # after recipes/reward_model.py (its default output is this recipe's default reward model), CPU, offline
    accelerate launch recipes/grpo.py
    # the three-stage path
    accelerate launch recipes/grpo.py --model_name_or_path outputs/sft-smollm2-alpaca-lora \
        --reward_model_path outputs/rm-smollm2-sft --output_dir outputs/grpo-smollm2-sft

With LoRA the KL reference is the policy with its adapter disabled. Rerunning the same command resumes.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

from dataclasses import dataclass, field

from accelerate import PartialState
from trl import GRPOConfig, GRPOTrainer

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.options import NumProcArguments
from chatgpt_recipes.data.templates import answer_end_token_id, tokenizer_ending_answers
from chatgpt_recipes.evaluation.policy_eval import evaluate_policy, policy_change_summary
from chatgpt_recipes.modeling.loading import ModelArguments, load_frozen_reference, load_model, lora_config
from chatgpt_recipes.rl.inputs import RLPromptArguments, checked_rl_inputs, rl_prompts
from chatgpt_recipes.runtime.compat import models_built_whole
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import train_with_resume
from chatgpt_recipes.training.reward import (checked_rule_rewards, load_reward_model, logging_group_spread,
                                             reward_model_function)
from chatgpt_recipes.training.saving import save_aligned_policy
from chatgpt_recipes.training.time_budget import TimeBudgetArguments


@dataclass
class GRPORecipeConfig(RLPromptArguments, NumProcArguments, TimeBudgetArguments, GRPOConfig):
    """TRL's GRPOConfig (num_generations, max_completion_length, beta, loss_type, temperature, reward_weights, ...)
    plus prompts, guards and rule rewards."""

    reward_model_path: str = field(default="outputs/rm-smollm2-dpo-demo",
                                   metadata={"help": "Output dir of recipes/reward_model.py."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the reward of an answer cut off at max_completion_length (no end-of-answer token), "
                "as PPO's missing_eos_penalty: the race gives every online method the same (recipes/pipeline.py)."})
    rule_rewards: list[str] = field(default_factory=list, metadata={
        "help": "Rule rewards added to the reward model's, by name: length_penalty (-answer tokens / "
                "max_completion_length), format_check (1 for a non-empty answer ending with EOS). reward_weights "
                "weighs [reward model, *rule_rewards]."})


def main(config: GRPORecipeConfig, model_args: ModelArguments):
    # Checks before any model loads: paths, same prompt rendering and tokenizer, a reward model worth optimising,
    # rule rewards that exist
    rule_rewards = checked_rule_rewards(config.rule_rewards)
    policy_path, reward_path, rm_info, tokenizer = checked_rl_inputs(config, model_args, config.trust_remote_code)

    # Data: prompt texts rendered as SFT renders them; a few held out for before/after
    train_dataset, eval_dataset, skips = rl_prompts(config, tokenizer, False, model_args.model_name_or_path)
    eval_texts = eval_dataset["prompt"]
    if PartialState().is_main_process:
        skips.write(config.output_dir)

    # Models: policy (SFT) and the frozen, centred reward model, scored on the policy's own token ids
    policy = load_model(model_args, tokenizer, trust_remote_code=config.trust_remote_code)
    with models_built_whole():  # scored by our function, outside any engine: whole on every rank, also under ZeRO-3
        reward_model = load_reward_model(reward_path).to(PartialState().device)
    # TRL's GRPO stops generation and ends the completion mask at its tokenizer's EOS: given the token that ends an
    # answer as EOS, it stops where SFT taught the policy to (a chat model's end of turn), and so does format_check
    answers_tokenizer = tokenizer_ending_answers(tokenizer, config.prompt_format)
    reward_funcs = [reward_model_function(reward_model, tokenizer, config.prompt_format,
                                          missing_eos_penalty=config.missing_eos_penalty,
                                          answer_end_id=answer_end_token_id(tokenizer, config.prompt_format)),
                    *[make(answers_tokenizer, config.max_completion_length) for make in rule_rewards]]
    reward_funcs = logging_group_spread(reward_funcs, config.reward_weights, config.num_generations)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=config, train_dataset=train_dataset,
                          processing_class=answers_tokenizer, peft_config=lora_config(model_args, policy))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    eval_args = (tokenizer, eval_texts, config.max_completion_length, config.temperature, config.seed,
                 answer_end_token_id(tokenizer, config.prompt_format))
    reference = load_frozen_reference(model_args, tokenizer, policy)
    before = evaluate_policy(policy, reference, reward_model, *eval_args)
    train_with_resume(trainer)  # from the newest complete checkpoint; NaN/inf and disk guards
    after = evaluate_policy(policy, reference, reward_model, *eval_args)
    metrics = {f"{key}_before": value for key, value in before.items()}
    metrics.update({f"{key}_after": value for key, value in after.items()})
    metrics["steps"], metrics["reward_model_eval_accuracy"] = trainer.state.global_step, rm_info.get("eval_accuracy")
    metrics.update(kl_coef=config.beta, num_generations=config.num_generations, loss_type=config.loss_type,
                   rule_rewards=config.rule_rewards, missing_eos_penalty=config.missing_eos_penalty)

    # Save: the policy merged into one plain model, tokenizer, metrics, report
    save_aligned_policy(trainer, trainer.model, config, model_args, tokenizer, "grpo", reward_path, metrics,
                        {"Skipped rows": skips.markdown()},
                        plot_keys=["reward", "kl", "completions/mean_length", "group_reward_spread"])
    say(policy_change_summary(f"GRPO ({metrics['steps']} steps)", len(eval_texts), before, after,
                              config.output_dir), flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (GRPORecipeConfig, ModelArguments), "grpo/smollm2_alpaca_lora.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

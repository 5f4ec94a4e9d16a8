"""PPO against a learned reward model (InstructGPT step 3) with TRL's PPOTrainer (trl.experimental.ppo), plus
PPO-ptx, per-update logs, guards and resumable checkpoints (chatgpt_recipes/rl/ppo_trainer.py).

    # after recipes/reward_model.py (its default output is this recipe's default reward model), CPU, offline
    accelerate launch recipes/ppo.py
    # the three-stage path: policy = SFT output, reward model = RM output, both by path
    accelerate launch recipes/ppo.py --model_name_or_path outputs/sft-smollm2-alpaca-lora \
        --reward_model_path outputs/rm-smollm2-sft --output_dir outputs/ppo-smollm2-sft
    # PPO-ptx: mix an SFT language-model loss on a second dataset into every policy update
    accelerate launch recipes/ppo.py --ptx_coef 0.5 --ptx_dataset_name data/alpaca_en_demo.json

Policy: the SFT model (an SFT LoRA adapter is merged into its base), trained with a fresh LoRA adapter; the frozen
reference is the same weights with that adapter disabled (no second copy). With use_peft: false the policy is
fully trained and TRL keeps a frozen copy as the reference. Value model: initialised from the reward model, and
with use_peft trained the same way (frozen backbone + LoRA, score head trained). Frozen weights (base, reference,
reward model, value backbone) are stored in `dtype`; the loop runs under bf16 autocast (`bf16: true`).
Rewards: the reward model's score at the answer's EOS, centred by the offset stored with it. Prompts are rendered
like SFT (prompt_format) and the reward model must use the policy's tokenizer. Rerunning the same command
resumes from the newest complete checkpoint (policy, value model, optimizer, scheduler, RNG, update count) and
replays: prompts come in a seeded order per epoch (chatgpt_recipes.rl.ppo_trainer.SeededPromptOrder), so the resumed
updates see the prompts, and end with the weights, of an uninterrupted run.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from trl.experimental.ppo import PPOConfig

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.sft import prepare_sft
from chatgpt_recipes.data.templates import answer_end_token_id, tokenizer_ending_answers
from chatgpt_recipes.evaluation.policy_eval import evaluate_policy, policy_change_summary
from chatgpt_recipes.modeling.generation import zero3_gathered
from chatgpt_recipes.modeling.loading import ModelArguments, load_model, lora_config, torch_dtype
from chatgpt_recipes.rl.inputs import RLPromptArguments, checked_rl_inputs, ptx_training_rows, rl_prompts
from chatgpt_recipes.rl.ppo_trainer import VALUE_WEIGHTS, RecipePPOTrainer, warn_on_ppo_trouble
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.resume import explain_save_errors, guard_trainer, last_complete_checkpoint
from chatgpt_recipes.training.reward import load_reward_model, load_value_model
from chatgpt_recipes.training.saving import save_aligned_policy


@dataclass
class PPORecipeConfig(RLPromptArguments, PPOConfig):
    """TRL's PPOConfig (reward_model_path, response_length, temperature, kl_coef, missing_eos_penalty,
    num_ppo_epochs, num_mini_batches, ...) plus prompts and reward-model guards (RLPromptArguments) and PPO-ptx."""

    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx coefficient (InstructGPT's gamma); 0: off."})
    ptx_dataset_name: str = field(default="data/alpaca_en_demo.json", metadata={"help": "SFT data for PPO-ptx."})
    ptx_batch_size: int = field(default=2, metadata={"help": "PPO-ptx examples per policy micro-batch."})
    ptx_max_length: int = field(default=256, metadata={"help": "Longer PPO-ptx examples are dropped (counted)."})
    sample_every: int = field(default=5, metadata={"help": "Print sample answers every N updates (0: never)."})


def main(config: PPORecipeConfig, model_args: ModelArguments):
    # Checks before any model loads: paths, same prompt rendering and tokenizer, a reward model worth optimising
    policy_path, reward_path, rm_info, tokenizer = checked_rl_inputs(config, model_args)
    tokenizer.padding_side = "left"  # PPO generates from left-padded queries

    # Data: prompts rendered as SFT renders them; a few held out for before/after and samples
    train_dataset, eval_dataset, skips = rl_prompts(config, tokenizer, True, model_args.model_name_or_path)
    eval_texts = [tokenizer.decode(row["input_ids"]) for row in eval_dataset]
    ptx_examples = None
    if config.ptx_coef > 0:
        ptx = prepare_sft(config.ptx_dataset_name, "train", tokenizer, config.ptx_max_length, "drop",
                          num_proc=config.dataset_num_proc, max_skipped_fraction=config.max_skipped_fraction)
        skips.extend(ptx.skips)
        ptx_examples = ptx.select(ptx_training_rows(ptx, config, model_args.model_name_or_path)).to_list()
    if PartialState().is_main_process:
        skips.write(config.output_dir)

    # Models: policy (SFT), reward model (frozen, centred), value model (initialised from the reward model)
    policy = load_model(model_args, tokenizer)
    reward_model = load_reward_model(reward_path, dtype=torch_dtype(model_args))  # frozen: the policy's dtype
    value_model = load_value_model(reward_path, model_args)
    probe = torch.tensor([eval_dataset[0]["input_ids"]])
    with torch.no_grad(), zero3_gathered(policy):  # every rank: under ZeRO-3 a gather is a collective
        probe_logits = policy(input_ids=probe).logits[0, -1].clone()

    # An answer ends where SFT taught it to: TRL's PPO stops, truncates and applies missing_eos_penalty at its
    # tokenizer's EOS (stop_token: eos), which for a chat model whose end of turn is not EOS is the end of turn
    trainer = RecipePPOTrainer(
        args=config, processing_class=tokenizer_ending_answers(tokenizer, config.prompt_format), model=policy,
        ref_model=None, reward_model=reward_model,
        value_model=value_model, train_dataset=train_dataset, eval_dataset=eval_dataset,
        peft_config=lora_config(model_args, policy),
        ptx_examples=ptx_examples, ptx_coef=config.ptx_coef, ptx_batch_size=config.ptx_batch_size,
        sample_prompts=eval_texts[:2], sample_every=config.sample_every,
        on_log=lambda trainer, logs, history={}: warn_on_ppo_trouble(logs, config.response_length, history),
    )
    policy, reference = trainer.policy, trainer.ref_model  # reference None: the policy with its adapter disabled
    eval_args = (tokenizer, eval_texts, config.response_length, config.temperature, config.seed,
                 answer_end_token_id(tokenizer, config.prompt_format))
    before = evaluate_policy(policy, reference, reward_model, *eval_args)
    checkpoint = last_complete_checkpoint(config.output_dir, extra_files=(VALUE_WEIGHTS, "ppo_state.json"))
    if checkpoint:
        say(f"Resuming from {checkpoint}", flush=True)
        trainer.resume_from(checkpoint)
    guard_trainer(trainer)  # NaN/inf and disk guards
    with explain_save_errors(config.output_dir):
        trainer.train()
    after = evaluate_policy(policy, reference, reward_model, *eval_args)

    # The reference must still be the SFT policy: same logits on a probe prompt as before training
    model = policy if reference is None else reference
    with torch.no_grad(), zero3_gathered(model), (policy.disable_adapter() if reference is None else nullcontext()):
        reference_logits = model(input_ids=probe.to(model.device)).logits[0, -1].to(probe_logits.device)
    metrics = {f"{key}_before": value for key, value in before.items()}
    metrics.update({f"{key}_after": value for key, value in after.items()})
    metrics["reference_max_logit_change"] = (reference_logits - probe_logits).abs().max().item()
    metrics["updates"], metrics["kl_coef"] = trainer.state.global_step, config.kl_coef
    metrics["reward_model_eval_accuracy"] = rm_info.get("eval_accuracy")

    # Save: the policy merged into one plain model, tokenizer, metrics, samples, report
    tokenizer.padding_side = "right"
    save_aligned_policy(trainer, policy, config, model_args, tokenizer, "ppo", reward_path, metrics,
                        {"Skipped rows": skips.markdown()},
                        plot_keys=["objective/scores", "objective/kl", "objective/entropy", "loss/value_avg",
                                   "policy/clipfrac_avg", "response_length", "ptx/loss"],
                        extra_files={"samples.json": {"samples": trainer.samples}})
    say(policy_change_summary(f"PPO ({metrics['updates']} updates)", len(eval_texts), before, after,
                              config.output_dir), flush=True)


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (PPORecipeConfig, ModelArguments), "ppo/smollm2_alpaca_lora.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

"""Reward models: TRL's RewardTrainer with InstructGPT's K-wise pair weights and per-prompt batches, reward
centering stored with the model, and loading a trained reward model (centred) for PPO and RLOO."""

import json
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from trl import RewardTrainer

from chatgpt_recipes.data.templates import encode_prompt
from chatgpt_recipes.evaluation.metrics import pairwise_accuracy, reward_scores
from chatgpt_recipes.modeling.loading import lora_config, torch_dtype
from chatgpt_recipes.runtime import compat
from chatgpt_recipes.runtime.errors import ConfigError, ModelLoadError

REWARD_OFFSET_KEY = "reward_offset"  # in the reward model's config.json: subtracted from every score


class PromptGroupedBatchSampler:
    """Batches of whole prompts: every pair expanded from one prompt's ranking lands in the same step
    (InstructGPT trains on all C(K,2) comparisons of a prompt as one batch element, because comparisons from one
    ranking are correlated and shuffling them apart overfits). `prompts_per_batch` prompts per step."""

    def __init__(self, groups: list[int], prompts_per_batch: int, seed: int):
        self.rows_of = {}
        for row, group in enumerate(groups):
            self.rows_of.setdefault(group, []).append(row)
        self.prompts_per_batch, self.seed, self.epoch = prompts_per_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.rows_of) // self.prompts_per_batch)

    def __iter__(self):
        groups = sorted(self.rows_of)
        random.Random(self.seed + self.epoch).shuffle(groups)
        self.epoch += 1
        for start in range(0, len(groups), self.prompts_per_batch):
            yield [row for group in groups[start:start + self.prompts_per_batch] for row in self.rows_of[group]]


class WeightedPreferenceCollator:
    """TRL's preference collator plus each pair's weight."""

    def __init__(self, pad_token_id: int):
        self.collate = compat.trl_preference_collator(pad_token_id)

    def __call__(self, examples):
        batch = self.collate(examples)
        batch["weight"] = torch.tensor([example.get("weight", 1.0) for example in examples], dtype=torch.float)
        return batch


class KWiseRewardTrainer(RewardTrainer):
    """RewardTrainer with two InstructGPT behaviours TRL lacks. It replaces (1) the plain mean of the pairwise loss
    over a batch by the 1/C(K,2)-weighted mean, so each prompt counts once however many answers it ranks, and
    (2) the shuffled per-pair sampler by one that keeps all pairs of a prompt in the same step."""

    COLUMNS = ["chosen_ids", "rejected_ids", "weight"]  # what the collator reads; the rest is dropped

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        compat.keep_dataset_columns(self, self.COLUMNS)  # for the eval dataloader, which transformers builds
        self._eval_margins = []  # each held-out pair's score(chosen) - score(rejected), every rank's

    def get_train_dataloader(self):
        sampler = PromptGroupedBatchSampler(self.train_dataset["group"], self.args.per_device_train_batch_size,
                                            self.args.seed)
        dataset = self.train_dataset
        if self.args.remove_unused_columns:
            dataset = dataset.select_columns([name for name in dataset.column_names if name in self.COLUMNS])
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("weight")
        _, outputs = super().compute_loss(model, inputs, return_outputs=True)  # TRL's metrics: accuracy, margin
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        if not self.model.training:
            self._eval_margins.append(self.accelerator.gather_for_metrics((chosen - rejected).detach().float()))
        loss = (weight * -torch.nn.functional.logsigmoid(chosen - rejected)).sum() / weight.sum()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """An evaluation's accuracy and margin counted over its pairs, as the evaluation stage counts them (TRL
        averages per-batch means, which weighs a short last batch like a full one), with the pair count and the
        number ranked right (a tie counts half), so that later stages read this evaluation instead of redoing it."""
        if not self.model.training and self._eval_margins:
            margins, self._eval_margins = torch.cat(self._eval_margins).double().cpu(), []
            exact = pairwise_accuracy(margins, torch.zeros_like(margins))
            exact["margin"] = exact.pop("margin_mean")  # TRL's name: eval_margin
            for key in ("accuracy", "correct", "pairs", "margin", "margin_std"):
                self._metrics["eval"][key] = [exact[key]]
        super().log(logs, start_time)


def final_evaluation(trainer) -> dict:
    """The held-out metrics of the trained weights, measured once: the trainer's own evaluation at the last step
    when it ran one (transformers evaluates there under eval_strategy steps or epoch), else `trainer.evaluate()`
    now. The report, stage_info.json and eval_results.json all read this one evaluation."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {key: value for key, value in last.items() if key.startswith("eval_") or key == "epoch"}
    return trainer.evaluate()


def mean_reward(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> float:
    """The mean score of token sequences (each read at its last real token, as the model's head does)."""
    model.eval()
    scores = reward_scores(model, sequences, pad_token_id, batch_size)
    return sum(scores) / len(scores)


def apply_reward_offset(model, offset: float):
    """Subtract the centering offset from the score head's output, so every caller (TRL's get_reward reads
    `model.score` directly) sees centred rewards. The offset lives in config.json and is applied at load time."""
    compat.offset_score_head(model, offset)
    return model


def load_reward_model(path: str, dtype=torch.float32, trust_remote_code: bool = False):
    """A reward model saved by recipes/reward_model.py, frozen, with its centering offset applied."""
    from transformers import AutoModelForSequenceClassification

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"reward model not found: {path} holds no config.json (train one with "
                             "recipes/reward_model.py; its output directory is the reward model)")
    config = json.loads(config_file.read_text())
    if config.get("num_labels", len(config.get("id2label", {}) or [0])) != 1:
        raise ModelLoadError(f"{path} is not a reward model: it has no single-output score head")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    if not hasattr(model, "score"):
        raise ModelLoadError(f"{path}: TRL's PPO reads rewards from a `score` head, which this architecture lacks")
    apply_reward_offset(model, config.get(REWARD_OFFSET_KEY, 0.0))
    model.requires_grad_(False)
    return model.eval()


def load_value_model(path: str, model_args):
    """PPO's value model, initialised from the reward model at `path`. With `use_peft` it is trained like the
    policy: a frozen backbone in `model_args.dtype` with LoRA adapters (same rank and targets) and a score head
    trained in fp32, so training keeps no fp32 master copy, gradients or AdamW state of the backbone (TRL's PPO with
    PEFT once shared the policy's adapted backbone for the same reason). Without it, every weight is trained in fp32. Returned as
    the plain transformers model with the adapters inside, since TRL reads its backbone and `score` head directly."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch_dtype(model_args) if model_args.use_peft else torch.float32, use_safetensors=True)
    if not model_args.use_peft:
        return model
    adapted = get_peft_model(model, lora_config(model_args, model, task_type="SEQ_CLS"))  # score: modules_to_save
    for param in adapted.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return compat.value_model_for_trl_ppo(adapted)


def reward_model_function(reward_model, tokenizer, prompt_format: str, batch_size: int = 8,
                          missing_eos_penalty: float | None = None, answer_end_id: int | None = None):
    """A TRL reward function that scores exactly the tokens PPO would: tokens(prompt) + the generated ids up to
    and including EOS. (Given the model itself, RLOOTrainer decodes completions with special tokens skipped and
    re-tokenises the text, so the EOS the reward model reads its score at would be missing.) With
    `missing_eos_penalty`, an answer whose last id is not `answer_end_id` (cut off at the length cap) loses that
    much, as TRL's PPO does with its own missing_eos_penalty, so that RLOO and GRPO optimise PPO's reward."""
    if missing_eos_penalty is not None and answer_end_id is None:
        raise ValueError("missing_eos_penalty needs the id of the token that ends an answer")

    def reward_model_score(prompts, completions, completion_ids, **kwargs):
        sequences = [encode_prompt(prompt, tokenizer, prompt_format) + list(ids)
                     for prompt, ids in zip(prompts, completion_ids)]
        scores = reward_scores(reward_model, sequences, tokenizer.pad_token_id, batch_size)
        if missing_eos_penalty is None:
            return scores
        return [score - missing_eos_penalty * (not ids or ids[-1] != answer_end_id)
                for score, ids in zip(scores, completion_ids)]

    return reward_model_score


# Rule rewards (GRPO): named in a recipe's YAML (`rule_rewards`), each a TRL reward function of the generated ids ---

def length_penalty(tokenizer, max_completion_length: int):
    """Minus the answer's length as a fraction of max_completion_length (0 for an empty answer, -1 at the cap): a
    counterweight to a reward model that pays for length."""

    def length_penalty(completion_ids, **kwargs):
        return [-len(ids) / max_completion_length for ids in completion_ids]

    return length_penalty


def format_check(tokenizer, max_completion_length: int):
    """1 for an answer that has text and ends with EOS (finished within max_completion_length), else 0. grpo.py
    passes the tokenizer whose EOS is the token that ends an answer (templates.tokenizer_ending_answers)."""

    def format_check(completion_ids, **kwargs):
        return [float(bool(ids) and ids[-1] == tokenizer.eos_token_id
                      and bool(tokenizer.decode(ids, skip_special_tokens=True).strip()))
                for ids in completion_ids]

    return format_check


RULE_REWARDS = {"length_penalty": length_penalty, "format_check": format_check}


def checked_rule_rewards(names: list[str]) -> list:
    """The makers (tokenizer, max_completion_length) -> reward function of the rule rewards named in `rule_rewards`,
    checked before any model loads: an unknown name is a ConfigError naming the option."""
    unknown = [name for name in names if name not in RULE_REWARDS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"rule_rewards: {names} must be distinct names from {sorted(RULE_REWARDS)} "
                          f"({'unknown: ' + ', '.join(map(repr, unknown)) if unknown else 'a name repeats'})")
    return [RULE_REWARDS[name] for name in names]


def logging_group_spread(reward_funcs: list, weights: list[float] | None, num_generations: int) -> list:
    """The reward functions, unchanged in what they return, and after the last of them has scored a generation
    batch, the mean over prompt groups of the standard deviation of the weighted total reward (what GRPO's
    advantages are divided by; 0 means a group teaches nothing) logged as `group_reward_spread` through TRL's
    `log_metric`. TRL calls the functions in order, each on this process's completions, which are whole groups
    when per-process generation batches are a multiple of num_generations (GRPOConfig's sampler guarantees that
    for the batch sizes it accepts; otherwise nothing is logged, on every process alike)."""
    weights = weights or [1.0] * len(reward_funcs)
    scored = {}

    def wrapped(index, function):
        def reward(log_metric=None, **kwargs):
            scores = function(**kwargs)
            scored[index] = scores
            if len(scored) == len(reward_funcs):
                total = sum(torch.tensor(scored[i], dtype=torch.float64) * w for i, w in enumerate(weights))
                scored.clear()
                if log_metric is not None and len(total) % num_generations == 0:
                    log_metric("group_reward_spread", total.view(-1, num_generations).std(dim=1).mean().item())
            return scores

        reward.__name__ = function.__name__  # TRL names the logged rewards/<name>/mean after it
        return reward

    return [wrapped(index, function) for index, function in enumerate(reward_funcs)]

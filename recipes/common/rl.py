"""What the RLHF recipes share: prompt datasets rendered like SFT, the checks that the reward model and the
policy read the same tokens, the guard on a weak reward model, and saving a trained model merged."""

import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset

from common.config import ConfigError
from common.data import (DEFECT, UNUSABLE, DataError, RowError, SkipLog, cache_key, cached_dataset, kept_indices,
                         num_proc_for, raw_dataset, rows_of_batch, skips_of, source_fingerprint, tokenizer_fingerprint)
from common.data_args import DataArguments
from common.models import ModelArguments, ModelLoadError, adapter_base, load_adapter, load_model, resolve_model_path
from common.preferences import prompt_of_row
from common.templates import PromptFormatError, encode_prompt, read_stage_info, render_prompt

logger = logging.getLogger(__name__)


@dataclass
class RLPromptArguments(DataArguments):
    """What the RL recipes (PPO, RLOO) share: the prompts, rendered as SFT and the reward model rendered them,
    and the guard against optimising a reward model that ranks no better than chance."""

    dataset_name: str = field(default="data/alpaca_en_demo.json", metadata={"help": "Prompt rows (any shape)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_format: str = field(default="alpaca", metadata={"help": "alpaca, chat or plain: as SFT and the RM."})
    max_prompt_length: int = field(default=128, metadata={"help": "Longer prompts are skipped and counted."})
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts for reward/KL before and after."})
    min_reward_model_accuracy: float = field(default=0.55, metadata={"help": "RM eval accuracy below this is weak."})
    on_weak_reward_model: str = field(default="error", metadata={"help": "error or warn on a weak reward model."})


def _prompt_batch(batch, columns, source, tokenizer, prompt_format, max_prompt_length):
    out = {"row": [], "input_ids": [], "prompt": [], "skip_field": [], "skip_reason": [], "skip_kind": []}
    for number, row in rows_of_batch(batch, columns, source):
        out["row"].append(number)
        ids, text, field, reason, kind = [], "", "", "", ""
        try:
            text = render_prompt(prompt_of_row(row, f"row {number}"), tokenizer, prompt_format)
            ids = encode_prompt(text, tokenizer, prompt_format)
            if len(ids) > max_prompt_length:
                reason, kind = f"prompt longer than max_prompt_length={max_prompt_length} tokens", UNUSABLE
        except PromptFormatError as error:
            reason, kind = str(error), UNUSABLE
        except RowError as error:
            field, reason, kind = error.field or "", error.reason, DEFECT
        for name, value in (("input_ids", ids), ("prompt", text), ("skip_field", field), ("skip_reason", reason),
                            ("skip_kind", kind)):
            out[name].append(value)
    return out


def prompt_dataset(source: str, tokenizer, prompt_format: str, max_prompt_length: int, limit: int | None = None,
                   split: str = "train", tokenized: bool = True, columns: dict | None = None,
                   num_proc: int | None = None, max_skipped_fraction: float = 0.05,
                   skips: SkipLog | None = None) -> Dataset:
    """PPO/RLOO prompts from any row shape common.preferences reads, rendered exactly as SFT renders them, prepared
    once and cached (common.data.cached_dataset). tokenized: {"input_ids"} (PPO); else {"prompt": text} (RLOO
    tokenises itself). Defective rows, prompts the format cannot render and prompts longer than max_prompt_length
    tokens are skipped and counted (into `skips` when given)."""
    columns = columns or {}
    key = cache_key("prompts", source_fingerprint(source, split), tokenizer_fingerprint(tokenizer), prompt_format,
                    max_prompt_length, columns)

    def build() -> Dataset:
        raw = raw_dataset(source, split)
        return raw.map(_prompt_batch, batched=True, batch_size=500, num_proc=num_proc_for(num_proc, len(raw)),
                       remove_columns=raw.column_names, new_fingerprint=key, desc="Rendering prompts",
                       fn_kwargs={"columns": columns, "source": source, "tokenizer": tokenizer,
                                  "prompt_format": prompt_format, "max_prompt_length": max_prompt_length})

    dataset = cached_dataset(key, build, source)
    found = skips_of(dataset, source)
    found.report(source, len(dataset))
    found.check_fraction(source, len(dataset), max_skipped_fraction)
    if skips is not None:
        skips.extend(found)
    kept = kept_indices(dataset)
    if limit:
        kept = kept[:limit]
    if not kept:
        raise DataError(f"{source}: no usable prompts (see the skip counts above)")
    return dataset.select(kept).select_columns(["input_ids"] if tokenized else ["prompt"])


def rl_prompts(config, tokenizer, tokenized: bool) -> tuple[Dataset, Dataset, SkipLog]:
    """(training prompts, held-out prompts, skips) of a PPO/RLOO config: the held-out prompts are the first
    eval_prompts of eval_dataset_name / eval_split when set, else of the training prompts (then not trained on)."""
    from common.data import eval_source

    skips = SkipLog()
    options = dict(tokenized=tokenized, columns=config.columns, num_proc=config.dataset_num_proc,
                   max_skipped_fraction=config.max_skipped_fraction, skips=skips)
    args = (tokenizer, config.prompt_format, config.max_prompt_length)
    separate = eval_source(config)
    if separate:
        train = prompt_dataset(config.dataset_name, *args, config.max_train_prompts, config.dataset_split, **options)
        held_out = prompt_dataset(separate[0], *args, config.eval_prompts, separate[1], **options)
        return train, held_out, skips
    limit = config.max_train_prompts and config.max_train_prompts + config.eval_prompts
    prompts = prompt_dataset(config.dataset_name, *args, limit, config.dataset_split, **options)
    if len(prompts) <= config.eval_prompts:
        raise DataError(f"{config.dataset_name}: {len(prompts)} usable prompts leave none to train on after "
                        f"eval_prompts={config.eval_prompts}")
    return (prompts.select(range(config.eval_prompts, len(prompts))), prompts.select(range(config.eval_prompts)),
            skips)


def check_same_tokenizer(policy_tokenizer, reward_tokenizer, policy_path: str, reward_path: str,
                         prompt_format: str) -> None:
    """PPO hands the policy's token ids to the reward model unchanged, so both must tokenise identically and
    (for chat prompts) render the same chat template. We refuse rather than re-tokenise text for the reward model:
    re-tokenising doubles the scoring work and scores a different token sequence than the one the RM was trained
    on whenever tokenisations split differently."""
    problems = []
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        problems.append("their vocabularies differ")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(policy_tokenizer, name) != getattr(reward_tokenizer, name):
            problems.append(f"{name} {getattr(policy_tokenizer, name)} != {getattr(reward_tokenizer, name)}")
    if prompt_format == "chat" and policy_tokenizer.chat_template != reward_tokenizer.chat_template:
        problems.append("their chat templates differ")
    if problems:
        raise ModelLoadError(
            f"the reward model {reward_path} does not use the policy's tokenizer ({policy_path}): "
            f"{'; '.join(problems)}. PPO/RLOO score the policy's token ids directly; train the reward model from the "
            "same SFT model (recipes/reward_model.py --model_name_or_path <SFT dir>)")


def check_reward_model_quality(reward_path: str, min_accuracy: float, on_weak: str) -> dict:
    """Refuse (on_weak: error) or warn (on_weak: warn) when the reward model's saved eval accuracy is near chance:
    PPO against a reward model that ranks at random optimises noise and only drifts from the reference."""
    if on_weak not in ("error", "warn"):
        raise ConfigError(f"on_weak_reward_model must be 'error' or 'warn', not {on_weak!r}")
    info = read_stage_info(reward_path)
    accuracy = info.get("eval_accuracy")
    if accuracy is None:
        message = f"{reward_path} records no eval accuracy (stage_info.json), so its quality is unknown"
    elif accuracy < min_accuracy:
        message = (f"the reward model {reward_path} ranks held-out pairs with accuracy {accuracy:.3f}, below "
                   f"min_reward_model_accuracy={min_accuracy} (chance is 0.5): PPO would optimise noise")
    else:
        return info
    if on_weak == "error":
        raise ConfigError(message + ". Train it longer or on more data, or set on_weak_reward_model: warn")
    logger.warning("%s", message)
    print(f"WARNING: {message}", flush=True)
    return info


def check_policy_path(name: str) -> None:
    """A policy given as a LoRA adapter needs its base: say so before any trainer starts."""
    path = resolve_model_path(name)
    base = adapter_base(path)
    if base is not None:
        try:
            resolve_model_path(base)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path} is a LoRA adapter whose base model '{base}' cannot be found ({error}); "
                                 "set base_model_name_or_path in its adapter_config.json or merge it first") from error


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
        base = load_model(full, tokenizer, num_labels=num_labels)
        return load_adapter(base, tmp).merge_and_unload()


def checkpoint_dtype(model_args: ModelArguments) -> str:
    """The dtype the model's checkpoint is stored in (its config.json), float32 when it does not say."""
    config_file = Path(resolve_model_path(model_args.model_name_or_path)) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def save_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


@torch.no_grad()
def policy_change_summary(title: str, prompts: int, before: dict, after: dict, output_dir: str) -> str:
    """What PPO and RLOO print at the end: reward, KL and answer length on held-out prompts, before -> after."""
    return (f"\n=== {title} on {prompts} held-out prompts ===\n"
            f"reward (centred): {before['reward']:+.3f} -> {after['reward']:+.3f}\n"
            f"KL to reference:  {before['kl']:+.3f} -> {after['kl']:+.3f}\n"
            f"answer length:    {before['length']:.1f} -> {after['length']:.1f} tokens\n"
            f"Saved to {output_dir}")


def evaluate_policy(policy, reference, reward_model, tokenizer, prompts: list[str], max_new_tokens: int,
                    temperature: float, seed: int) -> dict:
    """Mean centred reward of sampled answers to held-out prompts and the KL to the reference on them (the sum
    over answer tokens of log pi - log pi_ref, the k1 estimator on the policy's own samples). `reference` None
    means the policy is a PEFT model whose reference is the same model with its adapter disabled."""
    from contextlib import nullcontext

    device = next(policy.parameters()).device
    torch.manual_seed(seed)
    rewards, kls, lengths = [], [], []
    policy.eval()
    for prompt in prompts:
        query = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        output = policy.generate(input_ids=query, attention_mask=torch.ones_like(query), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = output[:, query.shape[1]:]
        eos = (answer[0] == tokenizer.eos_token_id).nonzero()
        answer = answer[:, : int(eos[0]) + 1] if len(eos) else answer
        sequence = torch.cat([query, answer], dim=1)

        def answer_logprobs(model):
            logits = model(input_ids=sequence).logits[:, query.shape[1] - 1:-1].float() / (temperature + 1e-7)
            return torch.log_softmax(logits, -1).gather(-1, answer[..., None]).squeeze(-1).sum()

        with policy.disable_adapter() if reference is None else nullcontext():
            reference_logprob = answer_logprobs(policy if reference is None else reference)
        kls.append((answer_logprobs(policy) - reference_logprob).item())
        rewards.append(reward_model(input_ids=sequence).logits[0, 0].item())
        lengths.append(answer.shape[1])
    policy.train()
    count = len(prompts)
    return {"reward": sum(rewards) / count, "kl": sum(kls) / count, "length": sum(lengths) / count}


def warn_on_ppo_trouble(logs: dict, response_length: int, history: dict) -> None:
    """The usual PPO failure signs, warned about loudly: a negative KL estimate (the policy's samples are more
    likely under the reference than under itself: a sign of a broken reference or sampling mismatch) and answers
    that blow up in length (reward hacking by verbosity, or no EOS any more)."""
    messages = []
    if logs.get("objective/kl", 0.0) < -0.1:  # beyond the noise of the k1 estimate on a small batch
        messages.append(f"KL to the reference is negative ({logs['objective/kl']:.4f})")
    length = logs.get("response_length")
    if length is not None:
        first = history.setdefault("first_length", length)
        if length >= 0.95 * response_length and first < 0.95 * response_length:
            messages.append(f"answers now hit response_length={response_length} (mean {length:.1f} tokens): "
                            "most no longer end with EOS")
        elif length > 2 * first and length > 8:
            messages.append(f"mean answer length grew from {first:.1f} to {length:.1f} tokens")
    for message in messages:
        logger.warning("PPO: %s", message)
        print(f"WARNING PPO: {message}", flush=True)


def reward_model_function(reward_model, tokenizer, prompt_format: str, batch_size: int = 8):
    """A TRL reward function that scores exactly the tokens PPO would: tokens(prompt) + the generated ids up to
    and including EOS. (Given the model itself, RLOOTrainer decodes completions with special tokens skipped and
    re-tokenises the text, so the EOS the reward model reads its score at would be missing.)"""
    from common.metrics import reward_scores

    def reward_model_score(prompts, completions, completion_ids, **kwargs):
        sequences = [encode_prompt(prompt, tokenizer, prompt_format) + list(ids)
                     for prompt, ids in zip(prompts, completion_ids)]
        return reward_scores(reward_model, sequences, tokenizer.pad_token_id, batch_size)

    return reward_model_score

"""What an RL stage (PPO, RLOO) starts from, checked: prompt datasets rendered like SFT, a policy path that is a
trained model, a reward model that reads the same tokens as the policy and is better than chance."""

import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset

from chatgpt_recipes.data.options import DataArguments
from chatgpt_recipes.data.preferences import prompt_of_row, with_system_prompt
from chatgpt_recipes.data.rows import (DEFECT, UNUSABLE, SkipLog, cache_key, cached_dataset, column, eval_source,
                                       kept_indices, num_proc_for, raw_dataset, rows_of_batch, skips_of,
                                       source_fingerprint, tokenizer_fingerprint)
from chatgpt_recipes.data.sft_split import sft_held_out_rows
from chatgpt_recipes.data.templates import (check_prompt_format, check_system_prompt, encode_prompt, read_stage_info,
                                            render_prompt)
from chatgpt_recipes.modeling.loading import adapter_base, check_model_directory, load_tokenizer, resolve_model_path
from chatgpt_recipes.runtime.errors import ConfigError, DataError, ModelLoadError, PromptFormatError, RowError
from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)


@dataclass
class RLPromptArguments(DataArguments):
    """What the RL recipes (PPO, RLOO) share: the prompts, rendered as SFT and the reward model rendered them,
    and the guard against optimising a reward model that ranks no better than chance."""

    dataset_name: str = field(default="data/alpaca_en_demo.json", metadata={"help": "Prompt rows (any shape)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_format: str = field(default="alpaca", metadata={"help": "alpaca, chat or plain: as SFT and the RM."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "prompt_format chat: the system turn of prompts that have none, as the reward model was trained with "
                "(its stage_info.json; a different one is refused). Unset: the chat template's own default."})
    max_prompt_length: int = field(default=128, metadata={"help": "Longer prompts are skipped and counted."})
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts for reward/KL before and after."})
    sft_eval_split_size: float = field(default=0, metadata={
        "help": "The prompts SFT held out are not trained on, and eval_prompts come from them: read from the SFT "
                "model's sft_split.json; without one, SFT's eval_split_size (with `seed`) recomputes them; 0 there: "
                "hold out the first eval_prompts."})
    min_reward_model_accuracy: float = field(default=0.55, metadata={"help": "RM eval accuracy below this is weak."})
    on_weak_reward_model: str = field(default="error", metadata={"help": "error or warn on a weak reward model."})


def _prompt_batch(batch, columns, source, tokenizer, prompt_format, max_prompt_length, system_prompt=None):
    out = {"row": [], "input_ids": [], "prompt": [], "skip_field": [], "skip_reason": [], "skip_kind": []}
    for number, row in rows_of_batch(batch, columns, source):
        out["row"].append(number)
        ids, text, field, reason, kind = [], "", "", "", ""
        try:
            text = render_prompt(with_system_prompt(prompt_of_row(row, f"row {number}"), system_prompt), tokenizer,
                                 prompt_format)
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
                   skips: SkipLog | None = None, system_prompt: str | None = None) -> Dataset:
    """PPO/RLOO prompts from any row shape chatgpt_recipes.data.preferences reads, rendered exactly as SFT renders them, prepared
    once and cached (chatgpt_recipes.data.rows.cached_dataset). tokenized: {"input_ids"} (PPO); False: {"prompt": text} (RLOO
    tokenises itself). Defective rows, prompts the format cannot render and prompts longer than max_prompt_length
    tokens are skipped and counted (into `skips` when given)."""
    columns = columns or {}
    key = cache_key("prompts", source_fingerprint(source, split), tokenizer_fingerprint(tokenizer), prompt_format,
                    max_prompt_length, columns, *([system_prompt] if system_prompt is not None else []))

    def build() -> Dataset:
        raw = raw_dataset(source, split)
        return raw.map(_prompt_batch, batched=True, batch_size=500, num_proc=num_proc_for(num_proc, len(raw)),
                       remove_columns=raw.column_names, new_fingerprint=key, desc="Rendering prompts",
                       fn_kwargs={"columns": columns, "source": source, "tokenizer": tokenizer,
                                  "prompt_format": prompt_format, "max_prompt_length": max_prompt_length,
                                  "system_prompt": system_prompt})

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
    if tokenized is None:  # both, and each prompt's row number, for the caller to select from
        return dataset.select(kept).select_columns(["input_ids", "prompt", "row"])
    return dataset.select(kept).select_columns(["input_ids"] if tokenized else ["prompt"])


def rl_prompts(config, tokenizer, tokenized: bool, policy_dir: str) -> tuple[Dataset, Dataset, SkipLog]:
    """(training prompts, held-out prompts, skips) of an RL config: the held-out prompts are the first eval_prompts
    of eval_dataset_name / eval_split when set; else those SFT held out of this data (`policy_dir`'s sft_split.json,
    chatgpt_recipes.data.sft_split), never trained on; else (no SFT rows held out) the first eval_prompts prompts."""
    skips = SkipLog()
    options = dict(tokenized=tokenized, columns=config.columns, num_proc=config.dataset_num_proc,
                   max_skipped_fraction=config.max_skipped_fraction, skips=skips,
                   system_prompt=getattr(config, "system_prompt", None))
    args = (tokenizer, config.prompt_format, config.max_prompt_length)
    separate = eval_source(config)
    if separate:
        train = prompt_dataset(config.dataset_name, *args, config.max_train_prompts, config.dataset_split, **options)
        held_out = prompt_dataset(separate[0], *args, config.eval_prompts, separate[1], **options)
        return train, held_out, skips
    sft_held_out = sft_held_out_rows([policy_dir], config.dataset_name, config.dataset_split, "sft_eval_split_size",
                                     config.sft_eval_split_size, config.seed)
    if sft_held_out:
        prompts = prompt_dataset(config.dataset_name, *args, None, config.dataset_split, **{**options,
                                                                                             "tokenized": None})
        is_held_out = [row in sft_held_out for row in prompts["row"]]
        train_rows = [i for i, held in enumerate(is_held_out) if not held][: config.max_train_prompts]
        held_out_rows = [i for i, held in enumerate(is_held_out) if held][: config.eval_prompts]
        if not held_out_rows:
            raise DataError(f"{config.dataset_name}: none of the {len(sft_held_out)} rows SFT held out of it gives a "
                            "usable prompt (see the skip counts above)")
        columns = ["input_ids"] if tokenized else ["prompt"]
        return (prompts.select(train_rows).select_columns(columns),
                prompts.select(held_out_rows).select_columns(columns), skips)
    limit = config.max_train_prompts and config.max_train_prompts + config.eval_prompts
    prompts = prompt_dataset(config.dataset_name, *args, limit, config.dataset_split, **options)
    if len(prompts) <= config.eval_prompts:
        raise DataError(f"{config.dataset_name}: {len(prompts)} usable prompts leave none to train on after "
                        f"eval_prompts={config.eval_prompts}")
    return (prompts.select(range(config.eval_prompts, len(prompts))), prompts.select(range(config.eval_prompts)),
            skips)


def ptx_training_rows(prepared, config, policy_dir: str) -> list[int]:
    """The rows of the PPO-ptx data (`prepared`, config.ptx_dataset_name prepared by data.sft.prepare_sft) that
    PPO-ptx trains on: every usable row except those SFT held out of it (read from `policy_dir`'s record): the
    evaluation answers them and compares with their references."""
    same_file = os.path.realpath(config.ptx_dataset_name) == os.path.realpath(config.dataset_name)  # hub names too
    held_out = sft_held_out_rows([policy_dir], config.ptx_dataset_name, "train", "sft_eval_split_size",
                                 config.sft_eval_split_size if same_file else 0, config.seed)  # size: no record
    row_numbers = column(prepared.dataset, "row")
    return [index for index in prepared.examples if row_numbers[index] not in held_out]


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
    say(f"WARNING: {message}", flush=True)
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




def check_reward_model_path(reward_path: str) -> None:
    """The reward model is a sequence classifier with one score, with whole weights: a causal LM (e.g. the SFT
    model) would load with a random score head, and a classifier with several labels gives PPO a score per label."""
    import json
    from pathlib import Path


    folder = Path(resolve_model_path(reward_path))
    hint = "train one with recipes/reward_model.py (--model_name_or_path <SFT dir>) and pass its output_dir"
    adapter_file = folder / "adapter_config.json"
    if adapter_file.is_file():
        task = json.loads(adapter_file.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise ModelLoadError(f"reward_model_path {reward_path} is a LoRA adapter for {task or 'an unknown task'}, "
                                 f"not a reward model (a sequence classifier with one score): {hint}")
    elif not (folder / "config.json").is_file():
        raise ModelLoadError(f"reward_model_path {reward_path} holds no config.json, so it is no model: {hint}")
    else:
        config = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures") or []
        if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise ModelLoadError(f"reward_model_path {reward_path} is a {', '.join(architectures)}, not a reward "
                                 f"model (a sequence classifier with one score): {hint}")
        # transformers saves id2label only when it is not its default of 2 labels
        labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
        if labels != 1:
            raise ModelLoadError(f"reward_model_path {reward_path} is a classifier with {labels} labels; a reward "
                                 f"model has one score output: {hint}")
    check_model_directory(str(folder))


def checked_rl_inputs(config, model_args, trust_remote_code: bool = False):
    """The checks an RL stage (PPO, RLOO) makes before any model loads: the policy path is a trained model, the
    policy and the reward model render prompts as `config.prompt_format` and read the same tokens, and the reward
    model is worth optimising. Returns the policy's path, the reward model's path, the reward model's stage info
    and the policy's tokenizer."""
    check_policy_path(model_args.model_name_or_path)
    policy_path, reward_path = resolve_model_path(model_args.model_name_or_path), config.reward_model_path
    check_prompt_format(policy_path, config.prompt_format, "the policy")
    check_reward_model_path(reward_path)
    check_prompt_format(reward_path, config.prompt_format, "the reward model")
    # a reward model trained with another system prompt (reward_model.py's system_prompt) would score prompts unlike
    # those it learnt on
    check_system_prompt(reward_path, config.system_prompt, "the reward model")
    rm_info = check_reward_model_quality(reward_path, config.min_reward_model_accuracy, config.on_weak_reward_model)
    tokenizer = load_tokenizer(policy_path, trust_remote_code)
    check_same_tokenizer(tokenizer, load_tokenizer(reward_path), policy_path, reward_path, config.prompt_format)
    return policy_path, reward_path, rm_info, tokenizer

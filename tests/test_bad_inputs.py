"""One table of bad inputs across the recipes. Each row gets either a clear error of ours (DataError,
ModelLoadError, ConfigError) whose message names the file, row and field, or a counted and logged skip; never a bare
library traceback, never a silent drop. The same table is in the README's troubleshooting section.

Most rows call the shared function a recipe calls (fast); a few go through the recipe command line, the way a
user meets them, and check that the process ends on our error with its message, not on a library's.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.data.rows import read_rows
from chatgpt_recipes.data.sft import sft_rows, tokenize_sft
from chatgpt_recipes.modeling.loading import ModelArguments, load_model, load_tokenizer, lora_target_modules
from chatgpt_recipes.runtime.errors import ConfigError, DataError, ModelLoadError

ALPACA_ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
ALPACA_DEMO = str(REPO / "data" / "alpaca_en_demo.json")  # the recipes' default, relative to the checkout
PAIR_ROW = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A colour."}


def write(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return str(path)


GOOD_SFT = [{"instruction": f"Name colour number {i}.", "input": "", "output": f"Colour {i}."} for i in range(39)]
GOOD_PAIRS = [{"prompt": f"Name colour number {i}.", "chosen": "Blue.", "rejected": "A colour."} for i in range(39)]


def sft_file(tmp_path, rows, name="data.json"):
    path = write(tmp_path, name, rows)
    return sft_rows(read_rows(path), path)


def sft_odd_row(row):
    """One defective row among 39 good ones: a counted skip (row 40), not a refused file."""
    return lambda t, m: sft_file(t, GOOD_SFT + [row])


def pair_odd_row(row):
    return lambda t, m: preference_file(t, GOOD_PAIRS + [row])


def preference_file(tmp_path, rows, name="prefs.json"):
    from chatgpt_recipes.data.preferences import read_rankings

    path = write(tmp_path, name, rows)
    return read_rankings(read_rows(path), path)


def adapter_dir(tmp_path, base):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"], **({"base_model_name_or_path": base}
                                                                       if base is not None else {})}))
    return str(adapter)


def config_file(tmp_path, text):
    return write(tmp_path, "recipe.yaml", "output_dir: " + str(tmp_path / "out") + "\n" + text)


def sft_config(args):
    from sft_lora import SFTRecipeConfig

    return parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args)


def long_sft(tmp_path, models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    examples, _ = sft_file(tmp_path, [ALPACA_ROW, {**ALPACA_ROW, "output": "very long " * 200}])
    return tokenize_sft(examples, tokenizer, 64, "drop", "data.json")


def long_pairs(tmp_path, models):
    from transformers import AutoTokenizer

    from chatgpt_recipes.data.preferences import tokenize_rankings

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    rankings = preference_file(tmp_path, [PAIR_ROW, {**PAIR_ROW, "chosen": "long " * 300}])
    return tokenize_rankings(rankings, tokenizer, "alpaca", 64, "prefs.json")


def lora_targets_missing(tmp_path, models):
    from transformers import AutoModelForCausalLM

    return lora_target_modules(AutoModelForCausalLM.from_pretrained(models["gpt2"]), ["q_proj", "v_proj"])


def rm_tokenizer_differs(tmp_path, models):
    from chatgpt_recipes.rl.inputs import check_same_tokenizer

    return check_same_tokenizer(load_tokenizer(models["llama"]), load_tokenizer(models["gpt2"]),
                                models["llama"], models["gpt2"], "chat")


def block_size_too_big(tmp_path, models):
    import pretrain
    from transformers import AutoConfig

    config = parse_config((pretrain.PretrainConfig, ModelArguments), "pretrain/tiny_gpt_wiki.yaml",
                          ["--block_size", "4096", "--output_dir", str(tmp_path / "out")])[0]
    return pretrain.check_block_size(config, AutoConfig.from_pretrained(models["gpt2"]), models["gpt2"])


def rl_long_prompts(tmp_path, models):
    from chatgpt_recipes.rl.inputs import prompt_dataset

    path = write(tmp_path, "prompts.json", [ALPACA_ROW, {**ALPACA_ROW, "instruction": "long " * 100}])
    return prompt_dataset(path, load_tokenizer(models["llama"]), "alpaca", 64)


def rl_odd_prompt(tmp_path, models):
    from chatgpt_recipes.rl.inputs import prompt_dataset

    path = write(tmp_path, "prompts.json", GOOD_SFT + [{**ALPACA_ROW, "instruction": " "}])
    return prompt_dataset(path, load_tokenizer(models["llama"]), "alpaca", 64)


def rl_weak_reward_model(tmp_path, models):
    from chatgpt_recipes.data.templates import save_stage_info
    from chatgpt_recipes.rl.inputs import check_reward_model_quality

    save_stage_info(str(tmp_path / "rm"), "reward_model", "alpaca", eval_accuracy=0.5)
    return check_reward_model_quality(str(tmp_path / "rm"), 0.55, "error")


def rl_policy_adapter_without_base(tmp_path, models):
    from chatgpt_recipes.rl.inputs import check_policy_path

    return check_policy_path(adapter_dir(tmp_path, str(tmp_path / "deleted-sft-base")))


def model_dir_without(tmp_path, models, name="model.safetensors", truncate=False):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models["gpt2"], folder)
    weights = folder / name
    if truncate:
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    return str(folder)


def sft_model_dir_without_weights(tmp_path, models):
    return sft_config(["--config", config_file(tmp_path, ""), "--model_name_or_path",
                       model_dir_without(tmp_path, models)])


def sft_model_dir_truncated(tmp_path, models):
    return sft_config(["--config", config_file(tmp_path, ""), "--model_name_or_path",
                       model_dir_without(tmp_path, models, truncate=True)])


def rl_causal_lm_as_reward_model(tmp_path, models):
    from chatgpt_recipes.rl.inputs import check_reward_model_path

    return check_reward_model_path(models["gpt2"])


def rl_classifier_with_two_labels(tmp_path, models):
    from transformers import AutoModelForSequenceClassification

    from chatgpt_recipes.rl.inputs import check_reward_model_path

    AutoModelForSequenceClassification.from_pretrained(models["gpt2"], num_labels=2).save_pretrained(tmp_path / "rm")
    return check_reward_model_path(str(tmp_path / "rm"))


def flags_of(script: str, args: list[str]):
    import importlib

    from chatgpt_recipes.cli import parse_flags

    module = importlib.import_module(script)
    arguments = {"merge_lora": "MergeArguments", "chat": "ChatArguments"}[script]
    return parse_flags((getattr(module, arguments),), args)


def dataset_directory(tmp_path, models):
    (tmp_path / "my_data").mkdir()
    write(tmp_path / "my_data", "train.jsonl", json.dumps(ALPACA_ROW) + "\n")
    return sft_config(["--config", config_file(tmp_path, ""), "--dataset_name", str(tmp_path / "my_data")])


def grpo_config(tmp_path, args):
    from grpo import GRPORecipeConfig

    return parse_config((GRPORecipeConfig, ModelArguments), "grpo/smollm2_alpaca_lora.yaml",
                        ["--output_dir", str(tmp_path / "out"), *args])


def dpo_config(tmp_path, args):
    from dpo import DPORecipeConfig

    return parse_config((DPORecipeConfig, ModelArguments), "dpo/smollm2_dpo_demo_lora.yaml",
                        ["--output_dir", str(tmp_path / "out"), *args])


def unwritable_output_dir(tmp_path, models):
    """A read-only folder (as root, which writes anywhere a mode forbids, a read-only file system: /sys)."""
    import os

    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    writable = os.access(folder, os.W_OK)
    target = "/sys/recipes-out" if writable else str(folder / "out")
    return sft_config(["--config", config_file(tmp_path, ""), "--output_dir", target])


def pipeline_with(tmp_path, stage_options: dict):
    from pipeline import PipelineConfig, main

    return main(PipelineConfig(output_dir=str(tmp_path / "run"), stages=["sft", "reward_model", "grpo", "dpo",
                                                                         "evaluate"], **stage_options))


def chat_untrained_default(tmp_path, models):
    import os

    from chat import ChatArguments, check_trained

    here = os.getcwd()
    os.chdir(tmp_path)  # no outputs/ here: the default has not been trained
    try:
        return check_trained(ChatArguments.model_name_or_path, "model_name_or_path", ChatArguments.model_name_or_path)
    finally:
        os.chdir(here)


def rl_reward_model_with_system_prompt(tmp_path, models):
    from chatgpt_recipes.data.templates import save_stage_info
    from chatgpt_recipes.rl.inputs import check_system_prompt

    save_stage_info(str(tmp_path / "rm"), "reward_model", "chat", system_prompt="You are terse.")
    return check_system_prompt(str(tmp_path / "rm"), None, "the reward model")


def benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts next to bench_utils.py)."""
    import importlib

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def saved_run(tmp_path, content):
    return benchmark("bench_utils").read_saved_run(write(tmp_path, "run.json", content) if content is not None
                                                   else str(tmp_path / "run.json"),
                                                   ("runs", "matmul_peaks"), "benchmarks/sft_throughput.py")


# (id, what to call, expected error class or "skip", strings the message or the printed skip count must hold)
CASES = [
    # --- data files (every recipe reads them with chatgpt_recipes.data.rows.read_rows) ---
    ("malformed-json", lambda t, m: sft_file(t, '[{"instruction": "a", "output": "b"},\n {"instruction": '),
     DataError, ["data.json", "not valid JSON at line 2"]),
    ("malformed-jsonl-line", lambda t, m: sft_file(t, json.dumps(ALPACA_ROW) + "\n{oops\n", "data.jsonl"),
     DataError, ["data.jsonl", "line 2", "not valid JSON"]),
    ("latin1-encoding", lambda t, m: sft_file(t, '[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1")),
     DataError, ["data.json", "not UTF-8", "byte"]),
    ("utf16-encoding", lambda t, m: sft_file(t, json.dumps([ALPACA_ROW]).encode("utf-16")),
     DataError, ["data.json", "not UTF-8"]),
    ("json-object-not-list", lambda t, m: sft_file(t, {"a": 1, "b": 2}),
     DataError, ["data.json", "expected a JSON list"]),
    ("row-not-an-object", lambda t, m: sft_file(t, [ALPACA_ROW, "just text"]),
     DataError, ["data.json", "row 2", "expected an object"]),
    ("empty-file", lambda t, m: sft_file(t, "[]"), DataError, ["data.json", "no rows"]),
    ("unknown-file-type", lambda t, m: read_rows(write(t, "data.txt", "hello")),
     DataError, ["data.txt", "unknown data file type"]),
    ("data-file-missing", lambda t, m: read_rows(str(t / "nope.json")), DataError, ["nope.json", "not found"]),
    # --- SFT rows: a file mostly in no known shape is an error; one odd row is a counted skip ---
    ("sft-misnamed-fields", lambda t, m: sft_file(t, [{"instuction": "a", "response": "b"}] * 3),
     DataError, ["data.json", "3 of 3 rows", "row 1: unknown row shape", "instuction", "expected Alpaca", "columns"]),
    ("sft-missing-output-in-most-rows", lambda t, m: sft_file(t, [ALPACA_ROW, {"instruction": "a", "input": ""},
                                                                  {"instruction": "b"}]),
     DataError, ["data.json: row 2: missing field 'output'", "max_skipped_fraction=0.05"]),
    ("sft-one-odd-row", sft_odd_row({"instuction": "a", "response": "b"}),
     "skip", ["data.json", "skipped 1 of 40 rows: unknown row shape"]),
    ("sft-one-row-missing-output", sft_odd_row({"instruction": "a", "input": ""}),
     "skip", ["data.json", "skipped 1 of 40 rows: missing field 'output'"]),
    ("sft-output-null", sft_odd_row({"instruction": "a", "output": None}),
     "skip", ["data.json", "skipped 1 of 40 rows: field 'output' is null"]),
    ("sft-output-not-text", sft_odd_row({"instruction": "a", "output": 5}),
     "skip", ["data.json", "skipped 1 of 40 rows: field 'output' must be text, found int"]),
    ("sft-output-list", sft_odd_row({"instruction": "a", "output": ["b", "c"]}),
     "skip", ["data.json", "skipped 1 of 40 rows: field 'output' must be text, found list"]),
    ("sft-empty-response", sft_odd_row({"instruction": "a", "output": "  "}),
     "skip", ["data.json", "skipped 1 of 40 rows: empty output"]),
    ("sft-empty-prompt", sft_odd_row({"instruction": "", "output": "b"}),
     "skip", ["data.json", "skipped 1 of 40 rows: empty instruction"]),
    ("chat-roles-out-of-order", sft_odd_row({"messages": [
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]}),
     "skip", ["data.json", "skipped 1 of 40 rows: messages[0]: roles must alternate"]),
    ("chat-unknown-role", sft_odd_row({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "robot", "value": "hello"}]}),
     "skip", ["data.json", "skipped 1 of 40 rows: conversations[1]: unknown role 'robot'"]),
    ("chat-no-assistant-turn", sft_odd_row({"messages": [{"role": "user", "content": "hi"}]}),
     "skip", ["data.json", "skipped 1 of 40 rows: chat without an assistant turn"]),
    ("chat-roles-out-of-order-everywhere", lambda t, m: sft_file(t, [{"messages": [
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]}]),
     DataError, ["data.json: row 1", "messages[0]", "roles must alternate"]),
    ("sft-over-long-sample", long_sft, "skip", ["data.json", "1 of 2 examples are longer than max_length=64",
                                                "dropped"]),
    # --- preference pairs and rankings (reward model, DPO) ---
    ("pair-chosen-equals-rejected", pair_odd_row({**PAIR_ROW, "rejected": "Blue."}),
     "skip", ["prefs.json", "skipped 1 of 40 rows: 'chosen' and 'rejected' are the same text"]),
    ("pairs-mostly-chosen-equals-rejected", lambda t, m: preference_file(t, [PAIR_ROW, {**PAIR_ROW, "rejected": "Blue."}]),
     DataError, ["prefs.json: row 2", "'chosen' and 'rejected' are the same text", "1 of 2 rows (50%)"]),
    ("pair-empty-chosen", pair_odd_row({**PAIR_ROW, "chosen": ""}),
     "skip", ["prefs.json", "skipped 1 of 40 rows: field 'chosen' is an empty response"]),
    ("pair-missing-prompt", lambda t, m: preference_file(t, [{"chosen": "a", "rejected": "b"}]),
     DataError, ["prefs.json: row 1", "missing field 'prompt'"]),
    ("pair-misnamed-field", lambda t, m: preference_file(t, [{"prompt": "p", "chosen": "a", "rejectd": "b"}]),
     DataError, ["prefs.json: row 1", "unknown preference row", "rejectd"]),
    ("ranking-of-one", pair_odd_row({"prompt": "p", "responses": ["only one"]}),
     "skip", ["prefs.json", "skipped 1 of 40 rows: field 'responses' must rank at least 2"]),
    ("ranking-with-ties", pair_odd_row({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}),
     "skip", ["prefs.json", "skipped 1 of 40 rows: field 'ranks' has ties"]),
    ("hh-empty-final-turn", pair_odd_row({"chosen": "\n\nHuman: hi\n\nAssistant: ",
                                          "rejected": "\n\nHuman: hi\n\nAssistant: no"}),
     "skip", ["prefs.json", "skipped 1 of 40 rows: field 'chosen' has an empty final Assistant turn"]),
    ("pair-over-long", long_pairs, "skip", ["prefs.json", "skipped 1 of 2 rows: longer than max_length=64"]),
    # --- PPO / RLOO prompts and reward model ---
    ("rl-prompt-empty-instruction", rl_odd_prompt, "skip", ["prompts.json", "skipped 1 of 40 rows: field "
                                                                       "'instruction' is empty"]),
    ("rl-prompt-over-long", rl_long_prompts, "skip", ["prompts.json", "skipped 1 of 2 rows: prompt longer than "
                                                                      "max_prompt_length=64"]),
    ("rl-weak-reward-model", rl_weak_reward_model, ConfigError, ["rm", "accuracy 0.500", "on_weak_reward_model"]),
    ("rl-policy-adapter-without-base", rl_policy_adapter_without_base, ModelLoadError,
     ["LoRA adapter whose base model", "deleted-sft-base"]),
    # --- models ---
    ("unknown-model-id", lambda t, m: load_tokenizer("no-such-org/no-such-model-xyz"),
     ModelLoadError, ["no-such-org/no-such-model-xyz", "not a local path"]),
    ("model-path-missing", lambda t, m: load_tokenizer(str(t / "missing-model")),
     ModelLoadError, ["missing-model", "not found"]),
    ("adapter-without-its-base", lambda t, m: load_model(
        ModelArguments(model_name_or_path=adapter_dir(t, str(t / "deleted-base"))), load_tokenizer(m["gpt2"])),
     ModelLoadError, ["adapter is a LoRA adapter whose base model", "deleted-base", "cannot be found"]),
    ("adapter-names-no-base", lambda t, m: load_model(
        ModelArguments(model_name_or_path=adapter_dir(t, None)), load_tokenizer(m["gpt2"])),
     ModelLoadError, ["adapter_config.json", "base_model_name_or_path"]),
    ("lora-targets-not-in-model", lora_targets_missing, ModelLoadError, ["['q_proj', 'v_proj']", "do not exist",
                                                                         "c_attn"]),
    ("rm-tokenizer-differs", rm_tokenizer_differs, ModelLoadError, ["does not use the policy's tokenizer",
                                                                    "vocabularies differ"]),
    ("block-size-beyond-context", block_size_too_big, ConfigError, ["block_size=4096", "1024 positions"]),
    # --- recipe configs ---
    ("yaml-unknown-key", lambda t, m: sft_config(["--config", config_file(t, "lerning_rate: 0.1\n")]),
     ConfigError, ["recipe.yaml", "lerning_rate"]),
    ("negative-learning-rate", lambda t, m: sft_config(["--config", config_file(t, "learning_rate: -0.001\n")]),
     ConfigError, ["recipe.yaml", "learning_rate must be positive", "-0.001"]),
    ("cli-unknown-flag", lambda t, m: sft_config(["--config", config_file(t, ""), "--max_stepz", "3"]),
     ConfigError, ["max_stepz"]),
    ("config-file-missing", lambda t, m: sft_config(["--config", str(t / "nope.yaml")]),
     ConfigError, ["nope.yaml", "not found"]),
    # --- options, all checked by chatgpt_recipes.cli before anything heavy loads ---
    ("yaml-syntax-error", lambda t, m: sft_config(["--config", config_file(t, "max_steps: 3\n  lora_r: : 8\n")]),
     ConfigError, ["recipe.yaml: not valid YAML at line 3, column 9"]),
    ("yaml-not-a-mapping", lambda t, m: sft_config(["--config", write(t, "recipe.yaml", "- max_steps\n")]),
     ConfigError, ["recipe.yaml: expected a YAML mapping of option: value, found a list"]),
    ("yaml-value-of-wrong-type", lambda t, m: sft_config(["--config", config_file(
        t, "per_device_train_batch_size: 2.5\n")]), ConfigError, ["recipe.yaml: per_device_train_batch_size must be "
                                                                  "an integer, got 2.5"]),
    ("cli-value-of-wrong-type", lambda t, m: sft_config(["--config", config_file(t, ""), "--max_length", "long"]),
     ConfigError, ["recipe.yaml or the command line: an option value of the wrong type"]),
    ("output-dir-is-a-file", lambda t, m: sft_config(["--config", config_file(t, ""), "--output_dir",
                                                      write(t, "notes.txt", "x")]),
     ConfigError, ["command-line option --output_dir is", "notes.txt, an existing file, not a directory"]),
    ("dataset-is-a-directory", dataset_directory, ConfigError,
     ["command-line option --dataset_name", "my_data is a directory, not a data file", "train.jsonl"]),
    ("zero-training-steps", lambda t, m: sft_config(["--config", config_file(t, ""), "--num_train_epochs", "0",
                                                     "--max_steps", "-1"]),
     ConfigError, ["--num_train_epochs is 0.0", "--max_steps is -1", "would train 0 steps"]),
    ("negative-eval-split", lambda t, m: sft_config(["--config", config_file(t, "eval_split_size: -0.1\n")]),
     ConfigError, ["recipe.yaml: eval_split_size must not be negative, got -0.1"]),
    ("lora-rank-zero", lambda t, m: sft_config(["--config", config_file(t, "use_peft: true\n"), "--lora_r", "0"]),
     ConfigError, ["command-line option --lora_r must be positive, got 0"]),
    ("lora-dropout-above-one", lambda t, m: sft_config(["--config", config_file(t, "use_peft: true\nlora_dropout: 1.5\n")]),
     ConfigError, ["recipe.yaml: lora_dropout must be between 0 and 1, got 1.5"]),
    ("unknown-choice", lambda t, m: sft_config(["--config", config_file(t, "overlong: cut\n")]),
     ConfigError, ["recipe.yaml: overlong must be one of ['drop', 'truncate'], got 'cut'"]),
    ("merge-dtype-unknown", lambda t, m: flags_of("merge_lora", ["--dtype", "fast"]),
     ConfigError, ["command-line option --dtype must be one of ['auto', 'float32', 'bfloat16'], got 'fast'"]),
    ("chat-max-new-tokens-negative", lambda t, m: flags_of("chat", ["--max_new_tokens", "-1"]),
     ConfigError, ["command-line option --max_new_tokens must be positive, got -1"]),
    ("evaluation-kl-reference-unknown", lambda t, m: __import__("evaluate_model").main(__import__(
        "evaluate_model").EvaluationConfig(models=["base=b", "sft=s"], kl_reference="stf")),
     ConfigError, ["kl_reference: 'stf' is not one of the models ['base', 'sft']"]),
    # --- model directories ---
    ("model-dir-without-weights", sft_model_dir_without_weights, ModelLoadError,
     ["--model_name_or_path", "holds a model config but no weights: no model.safetensors"]),
    ("model-weights-truncated", sft_model_dir_truncated, ModelLoadError,
     ["model weights in", "unusable: model.safetensors is truncated"]),
    ("causal-lm-as-reward-model", rl_causal_lm_as_reward_model, ModelLoadError,
     ["is a GPT2LMHeadModel, not a reward model (a sequence classifier with one score)", "recipes/reward_model.py"]),
    ("reward-model-with-two-labels", rl_classifier_with_two_labels, ModelLoadError,
     ["is a classifier with 2 labels; a reward model has one score output"]),
    # --- every option checked before any model loads: TRL's own checks, late choices, no abbreviation ---
    ("grpo-num-generations-not-dividing", lambda t, m: grpo_config(t, ["--num_generations", "3"]),
     ConfigError, ["grpo/smollm2_alpaca_lora.yaml or the command line", "must be divisible by num_generations (3)",
                   "a multiple of num_generations"]),
    ("grpo-num-generations-one", lambda t, m: grpo_config(t, ["--num_generations", "1",
                                                              "--per_device_train_batch_size", "1"]),
     ConfigError, ["num_generations must be 2 or more"]),
    ("grpo-loss-type-misspelt", lambda t, m: grpo_config(t, ["--loss_type", "dapoo"]),
     ConfigError, ["command-line option --loss_type must be one of ['grpo', 'dr_grpo', 'dapo'", "got 'dapoo'"]),
    ("grpo-reward-weights-wrong-length", lambda t, m: grpo_config(t, ["--reward_weights", "1", "0.5"]),
     ConfigError, ["command-line option --reward_weights has 2 weight(s)", "it needs 1: one for the reward model"]),
    ("dpo-loss-type-misspelt", lambda t, m: dpo_config(t, ["--loss_type", "sigmod"]),
     ConfigError, ["command-line option --loss_type must hold only values of ['sigmoid'", "got ['sigmod']"]),
    ("dpo-f-divergence-with-another-loss", lambda t, m: dpo_config(t, ["--loss_type", "nca_pair",
                                                                       "--f_divergence_type", "js_divergence"]),
     ConfigError, ["command-line option --f_divergence_type 'js_divergence' works only with the loss types",
                   "command-line option --loss_type is ['nca_pair']"]),
    ("cli-abbreviated-flag", lambda t, m: sft_config(["--config", config_file(t, ""), "--max_step", "1"]),
     ConfigError, ["the command line sets unknown option(s) ['max_step'] (options are never abbreviated)"]),
    ("chat-unknown-flag", lambda t, m: flags_of("chat", ["--temprature", "0.5"]),
     ConfigError, ["the command line sets unknown option(s) ['temprature']"]),
    ("merge-abbreviated-flag", lambda t, m: flags_of("merge_lora", ["--dtyp", "float32"]),
     ConfigError, ["the command line sets unknown option(s) ['dtyp'] (options are never abbreviated)"]),
    ("chat-unquoted-prompt", lambda t, m: flags_of("chat", ["--prompt", "Name", "three", "colors."]),
     ConfigError, ["the command line has word(s) ['three', 'colors.'] that belong to no option", "quote a value"]),
    ("option-data-file-missing", lambda t, m: sft_config(["--config", config_file(t, ""), "--dataset_name",
                                                          str(t / "nope.json")]),
     ConfigError, ["command-line option --dataset_name: data file not found", "nope.json"]),
    ("output-dir-not-writable", unwritable_output_dir, ConfigError, ["command-line option --output_dir is",
                                                                     "which cannot be written"]),
    ("chat-default-never-trained", chat_untrained_default, ModelLoadError,
     ["outputs/sft-smollm2-alpaca-lora (the default) has not been trained yet",
      "`accelerate launch recipes/sft_lora.py`"]),
    ("pipeline-stage-key-unknown", lambda t, m: pipeline_with(t, {"grpo": {"num_generation": 3}}),
     ConfigError, ["smollm2_demo.yaml: grpo: ['num_generation'] not option(s) of recipes/grpo.py",
                   "never abbreviated"]),
    ("pipeline-late-stage-value", lambda t, m: pipeline_with(t, {"dpo": {"learning_rate": -1}}),
     ConfigError, ["smollm2_demo.yaml: dpo.learning_rate must be positive, got -1"]),
    # --- rendering recorded and compared ---
    ("system-prompt-with-alpaca", lambda t, m: parse_config(
        (__import__("reward_model").RewardRecipeConfig, ModelArguments), "reward/smollm2_dpo_demo_lora.yaml",
        ["--output_dir", str(t / "out"), "--prompt_format", "alpaca", "--system_prompt", "Be terse."]),
     ConfigError, ["command-line option --system_prompt is set, but command-line option --prompt_format is 'alpaca'",
                   "only the chat format has a system turn"]),
    ("rl-reward-model-system-prompt-differs", rl_reward_model_with_system_prompt, ConfigError,
     ["the reward model", "was trained on prompts rendered with 'You are terse.'", "renders them with the chat "
      "template's own system prompt"]),
    # --- the benchmarks' inputs (other than benchmarks/rm_accuracy.py) ---
    ("bench-saved-run-missing", lambda t, m: saved_run(t, None), DataError, ["run.json: not found"]),
    ("bench-saved-run-of-another-shape", lambda t, m: saved_run(t, [{"loss": 1.0}]),
     DataError, ["run.json is not a saved run of benchmarks/sft_throughput.py: no ['runs', 'matmul_peaks']"]),
    ("bench-sizes-beyond-the-data", lambda t, m: benchmark("ppo_throughput").check_prompt_count(
        __import__("types").SimpleNamespace(batch=400, updates=3)),
     DataError, ["--batch 400 x --updates 3 needs 1600 prompts", "data/alpaca_en_demo.json has", "lower --batch"]),
    ("bench-model-path-missing", lambda t, m: benchmark("bench_utils").check_model(str(t / "no-model")),
     ModelLoadError, ["--model", "no-model: not found"]),
]


# The README's table ("Bad input: what you see"), row by row: case id, the input as the README names it, the recipes
# that read it. test_readme_table_is_the_test_table checks the README against it and against each case's phrases.
README_ROWS = [
    ("malformed-json", "malformed JSON", "all"),
    ("malformed-jsonl-line", "malformed JSONL line", "all"),
    ("latin1-encoding", "Latin-1 file", "all"),
    ("utf16-encoding", "UTF-16 file", "all"),
    ("json-object-not-list", "JSON object instead of a list", "all"),
    ("row-not-an-object", "a row that is not an object", "all"),
    ("empty-file", "empty file", "all"),
    ("unknown-file-type", "unknown file type", "all"),
    ("data-file-missing", "data file missing", "all"),
    ("sft-misnamed-fields", "misnamed fields (`instuction`, `response`) in every row", "SFT"),
    ("sft-missing-output-in-most-rows", "`output` missing in most rows", "SFT"),
    ("sft-one-odd-row", "one row of an unknown shape", "SFT"),
    ("sft-one-row-missing-output", "one row without `output`", "SFT"),
    ("sft-output-null", "`output` null", "SFT"),
    ("sft-output-not-text", "`output` not text", "SFT"),
    ("sft-output-list", "`output` a list", "SFT"),
    ("sft-empty-response", "empty response", "SFT"),
    ("sft-empty-prompt", "empty prompt", "SFT"),
    ("chat-roles-out-of-order", "chat roles out of order in one row", "SFT"),
    ("chat-unknown-role", "unknown chat role", "SFT"),
    ("chat-no-assistant-turn", "chat without an assistant turn", "SFT"),
    ("chat-roles-out-of-order-everywhere", "chat roles out of order in every row", "SFT"),
    ("sft-over-long-sample", "sample longer than `max_length`", "SFT"),
    ("pair-chosen-equals-rejected", "chosen == rejected in one row", "RM, DPO"),
    ("pairs-mostly-chosen-equals-rejected", "chosen == rejected in most rows", "RM, DPO"),
    ("pair-empty-chosen", "empty chosen", "RM, DPO"),
    ("pair-missing-prompt", "pair without a prompt", "RM, DPO"),
    ("pair-misnamed-field", "misnamed `rejectd`", "RM, DPO"),
    ("ranking-of-one", "ranking of one response", "RM"),
    ("ranking-with-ties", "ranking with ties", "RM"),
    ("hh-empty-final-turn", "HH pair with an empty final Assistant turn", "RM, DPO"),
    ("pair-over-long", "pair longer than `max_length`", "RM"),
    ("rl-prompt-empty-instruction", "empty prompt", "PPO, RLOO"),
    ("rl-prompt-over-long", "prompt longer than `max_prompt_length`", "PPO, RLOO"),
    ("rl-weak-reward-model", "reward model near chance", "PPO, RLOO"),
    ("rl-policy-adapter-without-base", "policy adapter whose base is gone", "PPO, RLOO"),
    ("unknown-model-id", "unknown model id", "all"),
    ("model-path-missing", "model path missing", "all"),
    ("adapter-without-its-base", "adapter without its base", "all"),
    ("adapter-names-no-base", "adapter naming no base", "all"),
    ("lora-targets-not-in-model", "LoRA targets not in the model", "all with LoRA"),
    ("rm-tokenizer-differs", "RM tokenizer differs from the policy's", "PPO, RLOO"),
    ("block-size-beyond-context", "`block_size` beyond the model's context", "pretrain"),
    ("yaml-unknown-key", "YAML key that does not exist", "all"),
    ("negative-learning-rate", "negative learning rate", "all"),
    ("cli-unknown-flag", "unknown command-line flag", "all"),
    ("config-file-missing", "config file missing", "all"),
    ("yaml-syntax-error", "YAML syntax error in `--config`", "all"),
    ("yaml-not-a-mapping", "YAML that is not a mapping", "all"),
    ("yaml-value-of-wrong-type", "YAML value of the wrong type", "all"),
    ("cli-value-of-wrong-type", "command-line value of the wrong type", "all"),
    ("output-dir-is-a-file", "`output_dir` an existing file", "all"),
    ("dataset-is-a-directory", "a local directory as `dataset_name`", "all but pretrain (a glob there)"),
    ("zero-training-steps", "`--num_train_epochs 0 --max_steps -1`", "all that train"),
    ("negative-eval-split", "negative `eval_split_size`", "SFT, evaluation"),
    ("lora-rank-zero", "`--lora_r 0`", "all with LoRA"),
    ("lora-dropout-above-one", "`lora_dropout` above 1", "all with LoRA"),
    ("unknown-choice", "a value outside an option's choices", "all"),
    ("merge-dtype-unknown", "`merge_lora.py --dtype fast`", "merge_lora"),
    ("chat-max-new-tokens-negative", "`chat.py --max_new_tokens -1`", "chat"),
    ("evaluation-kl-reference-unknown", "`kl_reference` naming no model of `models`", "evaluation"),
    ("model-dir-without-weights", "model directory without weights (config and tokenizer only)", "all"),
    ("model-weights-truncated", "truncated `model.safetensors`", "all"),
    ("causal-lm-as-reward-model", "a causal LM as `--reward_model_path`", "PPO, RLOO"),
    ("reward-model-with-two-labels", "a classifier with 2 labels as `--reward_model_path`", "PPO, RLOO"),
    ("grpo-num-generations-not-dividing", "`num_generations` not dividing the generation batch", "GRPO, RLOO"),
    ("grpo-num-generations-one", "`--num_generations 1`", "GRPO, RLOO"),
    ("grpo-loss-type-misspelt", "misspelt `loss_type`", "GRPO"),
    ("grpo-reward-weights-wrong-length", "`reward_weights` of the wrong length", "GRPO, RLOO"),
    ("dpo-loss-type-misspelt", "misspelt `loss_type`", "DPO"),
    ("dpo-f-divergence-with-another-loss", "`f_divergence_type` with a loss that has none", "DPO"),
    ("cli-abbreviated-flag", "an abbreviated flag (`--max_step 1`)", "all"),
    ("chat-unknown-flag", "unknown flag", "chat, merge_lora"),
    ("merge-abbreviated-flag", "an abbreviated flag (`--dtyp`)", "chat, merge_lora"),
    ("chat-unquoted-prompt", "unquoted prompt (`--prompt Name three colors.`)", "chat"),
    ("option-data-file-missing", "a data file option naming no file", "all"),
    ("output-dir-not-writable", "`output_dir` that cannot be written", "all"),
    ("chat-default-never-trained", "default model never trained", "chat, merge_lora"),
    ("pipeline-stage-key-unknown", "a stage key that is no option of the stage (`grpo: {num_generation: 3}`)",
     "pipeline"),
    ("pipeline-late-stage-value", "a bad value in a late stage (`dpo: {learning_rate: -1}`)", "pipeline"),
    ("system-prompt-with-alpaca", "`system_prompt` with `prompt_format: alpaca`", "RM"),
    ("rl-reward-model-system-prompt-differs", "reward model trained with a `system_prompt`", "PPO, RLOO, GRPO"),
    ("bench-saved-run-missing", "`--summarise` file missing", "sft_throughput"),
    ("bench-saved-run-of-another-shape", "`--summarise` JSON of another shape", "sft_throughput"),
    ("bench-sizes-beyond-the-data", "`--batch` x `--updates` beyond the prompts", "ppo_throughput"),
    ("bench-model-path-missing", "`--model` path missing", "sft_throughput, ppo_throughput, qlora_memory"),
]


def readme_table() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Bad input: what you see", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input |")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_readme_table_is_the_test_table():
    """Every case of CASES is a README row, in this order, and the README quotes its message: each phrase the test
    finds in the real message is in the README's cell."""
    assert [case_id for case_id, _, _ in README_ROWS] == [case[0] for case in CASES]
    table = readme_table()
    assert [row[:2] for row in table] == [[label, recipes] for _, label, recipes in README_ROWS]
    phrases = {case[0]: case[3] for case in CASES}
    wrong = [f"{case_id}: {phrase!r} not in {row[2]!r}" for (case_id, _, _), row in zip(README_ROWS, table)
             for phrase in phrases[case_id] if phrase not in row[2].replace("\\|", "|")]
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def tiny_models(tiny_gpt2_dir, tiny_llama_dir):
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}


@pytest.mark.parametrize("case_id,call,expected,phrases", CASES, ids=[case[0] for case in CASES])
def test_bad_input(case_id, call, expected, phrases, tiny_models, tmp_path, capsys):
    if expected == "skip":
        call(tmp_path, tiny_models)  # goes on with the good rows
        printed = capsys.readouterr().out
        for phrase in phrases:
            assert phrase in printed, f"{case_id}: {phrase!r} not in the skip report:\n{printed}"
        return
    with pytest.raises(expected) as error:
        call(tmp_path, tiny_models)
    for phrase in phrases:
        assert phrase in str(error.value), f"{case_id}: {phrase!r} not in: {error.value}"


@pytest.mark.parametrize("script,args,message", [
    ("sft_throughput.py", ["--token", "5"], "error: unrecognized arguments: --token 5"),
    ("sft_throughput.py", ["--tokens", "0"], "error: --tokens must be positive, got 0"),
    ("sft_throughput.py", ["--summarise", "missing.json"], "error: missing.json: not found"),
    ("ppo_throughput.py", ["--batch", "400"], "error: --batch 400 x --updates 3 needs 1600 prompts"),
])
def test_a_benchmark_ends_on_one_error_line(script, args, message, tmp_path):
    """As a recipe does: exit status 2, the error last, no traceback, nothing measured first."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("error: ", f"{script}: error: ")) and message[len("error: "):] in last, last


def test_table_covers_the_issue():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


def _recipe_cli(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / "recipes" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _final_error_line(result) -> str:
    """A RecipeError ends the run with exit status 2 and its message alone: no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_cli_malformed_jsonl_ends_on_our_error(tmp_path):
    bad = write(tmp_path, "train.jsonl", json.dumps(ALPACA_ROW) + "\n" + json.dumps(ALPACA_ROW)[:-5] + "\n")
    result = _recipe_cli("sft_lora.py", "--dataset_name", bad, "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert _final_error_line(result).startswith(f"error: {bad}: line 2: not valid JSON (")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (REPO / "recipes" / "reward_model.py").exists(), reason="reward_model.py not written yet")
def test_cli_reward_model_chosen_equals_rejected_ends_on_our_error(tmp_path):
    bad = write(tmp_path, "prefs.json", [PAIR_ROW, {**PAIR_ROW, "rejected": PAIR_ROW["chosen"]}])
    result = _recipe_cli("reward_model.py", "--dataset_name", bad, "--output_dir", str(tmp_path / "out"),
                         cwd=tmp_path)
    last = _final_error_line(result)
    assert last.startswith("error: ") and f"{bad}: row 2" in last and "same text" in last


# ---------------------------------------------------------------- under `accelerate launch`, as the README runs them
# One row per class of error (data, options of a YAML recipe and of a flags-only script, model directories), each
# refused before any model loads; the table above has every case of each class, in-process. The exit statuses are
# the README's ("Errors and exit statuses"): 2 from the recipe itself; accelerate reports any failure as 1.
ACCELERATE_EXIT = 1


def _accelerate_launch(script, *args, cwd, num_processes=1):
    launcher = ["-q"] if num_processes == 1 else [
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", str(num_processes)]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                           str(REPO / "recipes" / script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def _last_line(result) -> str:
    lines = [line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


CLI_CASES = [
    ("data-malformed-jsonl", "sft_lora.py", lambda t, m: [
        "--dataset_name", write(t, "train.jsonl", json.dumps(ALPACA_ROW) + "\n{oops\n"), "--output_dir", t / "out"],
     "train.jsonl: line 2: not valid JSON"),
    ("option-zero-steps", "sft_lora.py", lambda t, m: ["--num_train_epochs", "0", "--max_steps", "-1",
                                                       "--dataset_name", ALPACA_DEMO, "--output_dir", t / "out"],
     "the run would train 0 steps"),
    ("option-merge-dtype", "merge_lora.py", lambda t, m: ["--adapter_path", t / "adapter", "--dtype", "fast"],
     "command-line option --dtype must be one of"),
    ("model-causal-lm-as-reward-model", "ppo.py", lambda t, m: ["--reward_model_path", m["gpt2"],
                                                                "--output_dir", t / "out"],
     "is a GPT2LMHeadModel, not a reward model"),
]


# the same, for the option checks this issue added (a library's late check, a flags-only script's stray words);
# in-process in the table above, here under the launcher (slow lane: one launch each)
SLOW_CLI_CASES = [
    ("option-grpo-loss-type", "grpo.py", lambda t, m: ["--loss_type", "dapoo", "--output_dir", t / "out"],
     "command-line option --loss_type must be one of"),
    ("option-chat-unquoted-prompt", "chat.py", lambda t, m: ["--prompt", "Name", "three", "colors."],
     "the command line has word(s) ['three', 'colors.'] that belong to no option"),
]


@pytest.mark.parametrize("case_id,script,args,message", [
    *CLI_CASES, *[pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CLI_CASES]],
    ids=[case[0] for case in CLI_CASES + SLOW_CLI_CASES])
def test_under_accelerate_launch_the_last_line_is_the_error(case_id, script, args, message, tiny_models, tmp_path):
    result = _accelerate_launch(script, *args(tmp_path, tiny_models), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == ACCELERATE_EXIT, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = _last_line(result)
    assert last.startswith("error: ") and message in last, output[-3000:]
    assert output.count("error: ") == 1
    assert "FutureWarning" not in output, output[-3000:]  # transformers' deprecations that do not apply: silenced


def test_under_two_processes_the_error_is_printed_once_and_named_in_the_launcher_summary(tmp_path):
    """Several processes (torchrun under accelerate): torch's launcher ends with its failure summary and accelerate
    with a ChildFailedError traceback, whatever the recipe does; the README says so. The recipe's line is printed
    once, by the main process, and the summary shows it as each process's failure instead of a link to docs."""
    result = _accelerate_launch("sft_lora.py", "--lora_r", "0", "--use_peft", "true", "--dataset_name", ALPACA_DEMO,
                                "--output_dir", tmp_path / "out", cwd=tmp_path, num_processes=2)
    message = "error: command-line option --lora_r must be positive, got 0"
    assert result.returncode == ACCELERATE_EXIT, result.stderr[-3000:]
    assert result.stderr.count(f"\n{message}\n") + result.stderr.startswith(message) == 1, result.stderr[-3000:]
    assert result.stderr.count(f"traceback : {message}") == 2, result.stderr[-3000:]
    assert "To enable traceback see" not in result.stderr


def test_ctrl_c_ends_on_one_line_naming_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt anywhere in a recipe: one line saying where the run stopped and what rerunning does, exit
    status 130, no traceback. (The checkpoint check itself is tests/training/test_kill_resume.py's.)"""
    from sft_lora import SFTRecipeConfig

    from chatgpt_recipes import cli
    from chatgpt_recipes.cli import run
    from chatgpt_recipes.runtime.errors import EXIT_INTERRUPTED

    def interrupted(config, model_args):
        raise KeyboardInterrupt

    for checkpoint, expected in ((None, f"{tmp_path / 'out'} holds no complete checkpoint yet: rerunning the same "
                                        "command starts from the beginning"),
                                 (str(tmp_path / "out" / "checkpoint-4"), f"the newest complete checkpoint is "
                                  f"{tmp_path / 'out' / 'checkpoint-4'}: rerun the same command to resume from it")):
        monkeypatch.setattr(cli, "last_complete_checkpoint", lambda output_dir, **kwargs: checkpoint)
        monkeypatch.setattr(sys, "argv", ["sft_lora.py", "--output_dir", str(tmp_path / "out")])
        with pytest.raises(SystemExit) as stop:
            run(interrupted, (SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml")
        assert stop.value.code == EXIT_INTERRUPTED
        printed = capsys.readouterr().err.strip().splitlines()
        assert printed[-1] == f"interrupted (Ctrl-C); {expected}", printed[-3:]


def test_the_pipeline_checks_every_stage_before_the_first_runs(tmp_path):
    """A bad option of the last stages is refused before any stage has run (nothing written), and the RL stages
    must render prompts with the reward model's system prompt: one set differently is refused up front."""
    from pipeline import PipelineConfig, main

    for options, message in (({"dpo": {"learning_rate": -1}}, "dpo.learning_rate must be positive"),
                             ({"reward_model": {"prompt_format": "chat", "system_prompt": "Be terse."},
                               "grpo": {"prompt_format": "chat", "system_prompt": "Be kind."}},
                              "grpo.system_prompt is 'Be kind.' but reward_model.system_prompt is 'Be terse.'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            main(PipelineConfig(output_dir=str(tmp_path / "run"), stages=["sft", "reward_model", "grpo", "dpo",
                                                                          "evaluate"], **options))
        assert not (tmp_path / "run").exists()


def test_the_pipelines_ctrl_c_line_names_the_running_stages_checkpoint(tmp_path, capsys, monkeypatch):
    import pipeline

    from chatgpt_recipes import cli
    from chatgpt_recipes.runtime.errors import EXIT_INTERRUPTED

    def interrupted(name, command, log_path):
        raise KeyboardInterrupt

    stage_dir = tmp_path / "run" / "sft"
    monkeypatch.setattr(pipeline, "run_stage", interrupted)
    monkeypatch.setattr(cli, "last_complete_checkpoint",
                        lambda output_dir, **kwargs: f"{output_dir}/checkpoint-10" if output_dir == str(stage_dir)
                        else None)
    with pytest.raises(SystemExit) as stop:
        pipeline.main(pipeline.PipelineConfig(output_dir=str(tmp_path / "run"), stages=["sft"]))
    assert stop.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted (Ctrl-C); the newest complete checkpoint is {stage_dir}/checkpoint-10: rerun the same command "
        "to resume from it")

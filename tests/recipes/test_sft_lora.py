"""recipes/sft_lora.py: an end-to-end `accelerate launch` run on a tiny model lowers eval loss and writes a loadable
adapter; an interrupted run resumes with the same command; packing never mixes examples; QLoRA trains on CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_recipe
from safetensors.torch import load_file
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.data.sft import sft_rows, tokenize_sft
from chatgpt_recipes.modeling.loading import ModelArguments, load_for_inference, load_model, load_tokenizer

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def sft_args(model_dir: str, output_dir: Path) -> list[str]:
    """A few-minute run made tiny: 8 LoRA steps, checkpoints at 4 and 8, eval before and after."""
    return ["--model_name_or_path", model_dir, "--dataset_name", str(REPO / "data" / "alpaca_en_demo.json"),
            "--max_train_samples", "48", "--eval_split_size", "12", "--max_length", "384",
            "--max_steps", "8", "--save_steps", "4", "--eval_steps", "8", "--eval_on_start", "true",
            "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "2",
            "--sample_max_new_tokens", "4", "--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_gpt2_dir):
    output_dir = tmp_path_factory.mktemp("sft") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # a tiny model on a busy 2-core CPU: 6x faster on one thread
        result = run_recipe("sft_lora.py", *sft_args(tiny_gpt2_dir, output_dir))
    return output_dir, result


def test_end_to_end_lowers_eval_loss_and_writes_a_loadable_adapter(sft_run):
    output_dir, result = sft_run
    log = json.loads((output_dir / "log_history.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in log if "eval_loss" in entry]
    assert eval_losses[-1] < eval_losses[0] - 0.05, eval_losses  # evaluation is deterministic: no noise
    # the evaluation at the final step (eval_steps 8) is the final one: reported, not run a third time
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [0, 8]
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_loss"] == eval_losses[-1]
    assert "prompt format 'alpaca'" in result.stdout and "=== Tuned model ===" in result.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md",
                 "report.md", "eval_results.json", "checkpoint-4", "checkpoint-8", "runs"):
        assert (output_dir / name).exists(), name
    assert json.loads((output_dir / "stage_info.json").read_text()) == {"stage": "sft", "prompt_format": "alpaca"}
    tokenizer, model = load_for_inference(str(output_dir))  # the adapter on its base, read from adapter_config.json
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    lora_b = [v for k, v in load_file(output_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained: LoRA's B starts at zero


def test_sft_records_its_split_and_every_later_stage_reads_it(sft_run, tiny_gpt2_dir):
    """SFT held out 12 rows (eval_split_size 12) and wrote them to sft_split.json. The comparison data, PPO/RLOO/GRPO's
    prompts, PPO-ptx and the evaluation take those 12 from the record, although their own size options are left at
    their defaults (40, 0, 0, 40): a changed eval_split_size at SFT needs no second setting."""
    from types import SimpleNamespace

    from chatgpt_recipes.data.rows import column
    from chatgpt_recipes.data.sft import prepare_sft, sft_split
    from chatgpt_recipes.data.sft_split import SPLIT_FILE, sft_held_out_rows, split_examples
    from chatgpt_recipes.data.templates import example_prompt
    from chatgpt_recipes.rl.inputs import RLPromptArguments, ptx_training_rows, rl_prompts

    output_dir, result = sft_run
    data = str(REPO / "data" / "alpaca_en_demo.json")
    record = json.loads((output_dir / SPLIT_FILE).read_text())
    rows = set(record["held_out"]["rows"])
    assert len(rows) == 12 and record["held_out"]["source"] == data and record["prompt_format"] == "alpaca"
    assert f"[split] 12 held-out rows of {data} recorded" in result.stdout
    # the rows SFT evaluated on: its split of the file's usable rows (the same shuffle, computed independently)
    assert rows == {row for row, _ in sft_split(data, "train", 12, 42)[1]}

    assert sft_held_out_rows([str(output_dir)], data, "train", "sft_eval_split_size", 40, 42) == rows  # comparisons
    assert sft_held_out_rows([str(output_dir), str(output_dir)], data, "train", "eval_split_size", 40, 42) == rows
    tokenizer = load_tokenizer(str(output_dir))
    held_out_prompts = {example_prompt(e, tokenizer) for _, e in split_examples(data, "train", frozenset(rows))[1]}

    class Config(RLPromptArguments):  # what PPOConfig/RLOOConfig/GRPOConfig add that rl_prompts reads
        seed: int = 42
        dataset_num_proc = None

    config = Config(dataset_name=data, eval_prompts=12, max_prompt_length=512)  # sft_eval_split_size: default 0
    train, evaluation, _ = rl_prompts(config, tokenizer, False, str(output_dir))
    assert set(evaluation["prompt"]) == held_out_prompts and not set(train["prompt"]) & held_out_prompts
    prepared = prepare_sft(data, "train", tokenizer, 384)
    file_rows = column(prepared.dataset, "row")
    ptx = SimpleNamespace(ptx_dataset_name=data, dataset_name=data, sft_eval_split_size=0, seed=42)
    trained = {file_rows[i] for i in ptx_training_rows(prepared, ptx, str(output_dir))}
    assert not trained & rows and len(trained) == len(prepared.examples) - 12


def test_interrupted_run_resumes_with_the_same_command(sft_run, tiny_gpt2_dir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    finished, _ = sft_run
    # The state of a run stopped after its step-4 checkpoint: only checkpoint-4 is left.
    interrupted = tmp_path / "run"
    shutil.copytree(finished / "checkpoint-4", interrupted / "checkpoint-4")
    result = run_recipe("sft_lora.py", *sft_args(tiny_gpt2_dir, interrupted))
    assert f"Resuming from {interrupted / 'checkpoint-4'}" in result.stdout
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # The resumed run ends where the uninterrupted one did: same data order, same optimizer state.
    resumed = load_file(interrupted / "adapter_model.safetensors")
    for name, weight in load_file(finished / "adapter_model.safetensors").items():
        torch.testing.assert_close(resumed[name], weight, atol=1e-4, rtol=1e-3)

    # The same output_dir with another model: a clear refusal, not an optimizer-state traceback
    other = run_recipe("sft_lora.py", *sft_args(tiny_llama_dir, interrupted), check=False)
    assert other.returncode != 0
    assert f"cannot resume from {interrupted / 'checkpoint-8'}: it was written by a different run" in other.stderr


def per_example_losses(logits, labels, lengths) -> list[float]:
    """Summed next-token loss of each example, from logits and labels laid out one example after another."""
    return [F.cross_entropy(example_logits[:-1], example_labels[1:], ignore_index=-100, reduction="sum").item()
            for example_logits, example_labels in zip(logits.split(lengths), labels.split(lengths))]


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_packed_batch_gives_the_per_example_loss_of_a_padded_one(model_fixture, request):
    path = request.getfixturevalue(model_fixture)
    tokenizer = load_tokenizer(path)
    model = load_model(ModelArguments(model_name_or_path=path, dtype="float32"), tokenizer).eval()
    rows = [{"instruction": "Name a color.", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five, as two plus three is five."},
            {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, friend."},
                          {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye!"}]}]
    dataset = tokenize_sft(sft_rows(rows, "rows.json")[0], tokenizer, max_length=512)
    features = [dataset[i] for i in range(len(dataset))]
    lengths = [len(f["input_ids"]) for f in features]

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(features)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    assert packed["input_ids"].shape == (1, sum(lengths))
    with torch.no_grad():  # use_cache=False as in training: a cache turns off the packed-sequence attention mask
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        naive_logits = model(input_ids=packed["input_ids"], use_cache=False).logits[0]  # one long causal sequence
    unpacked = [per_example_losses(padded_logits[i, :n], padded["labels"][i, :n], [n])[0]
                for i, n in enumerate(lengths)]
    assert per_example_losses(packed_logits, packed["labels"][0], lengths) == pytest.approx(unpacked, rel=1e-5)
    # The check can fail: plain concatenation lets later examples attend to earlier ones
    assert per_example_losses(naive_logits, packed["labels"][0], lengths)[1:] != pytest.approx(unpacked[1:], rel=1e-5)


def test_qlora_trains_on_cpu_with_chat_data(tiny_llama_dir, tmp_path):
    import bitsandbytes as bnb
    from sft_lora import SFTRecipeConfig, main

    args = ["--model_name_or_path", tiny_llama_dir, "--load_in_4bit", "true", "--use_peft", "true",
            "--dataset_name", str(REPO / "data" / "chat_demo.jsonl"), "--max_train_samples", "8",
            "--eval_split_size", "0", "--eval_strategy", "no", "--max_length", "256", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1",
            "--sample_max_new_tokens", "2", "--output_dir", str(tmp_path / "qlora")]
    config, model_args = parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args)
    quantized = load_model(model_args, load_tokenizer(tiny_llama_dir))
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in quantized.modules())
    del quantized

    main(config, model_args)  # generates the base answer first, then trains
    output_dir = tmp_path / "qlora"
    assert json.loads((output_dir / "stage_info.json").read_text()) == {"stage": "sft", "prompt_format": "chat"}
    losses = [e["loss"] for e in json.loads((output_dir / "log_history.json").read_text()) if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    # Every LoRA layer learned, q/k/v and gate/up too: gradients pass through the 4-bit layers even after the
    # eval-mode generation (see chatgpt_recipes.modeling.loading.keep_4bit_layers_trainable)
    lora_b = [v for k, v in load_file(output_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)

    # The QLoRA adapter merges into its base reloaded in float32, not into the 4-bit weights
    from merge_lora import MergeArguments
    from merge_lora import main as merge
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merge(MergeArguments(adapter_path=str(output_dir)))).eval()
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in merged.modules())
    tokenizer, with_adapter = load_for_inference(str(output_dir))
    inputs = tokenizer(["Hello there, how are you?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter(**inputs).logits, atol=1e-5, rtol=1e-5)

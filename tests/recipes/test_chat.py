"""recipes/chat.py: `--prompt` answers, the interactive chat keeps the conversation, and prompts are written the
way the model was tuned (the format its stage_info.json records)."""

import io
import json
import os
import subprocess
import sys

import pytest
from chat import ChatArguments, main, saved_prompt_format
from conftest import REPO
from peft import get_peft_model
from test_merge_lora import make_adapter

from chatgpt_recipes.data.sft import sft_rows
from chatgpt_recipes.data.templates import alpaca_prompt, example_prompt, render_conversation, save_stage_info
from chatgpt_recipes.modeling.generation import generate, stop_token_ids
from chatgpt_recipes.modeling.loading import ModelArguments, load_for_inference, load_model, load_tokenizer, lora_config
from chatgpt_recipes.runtime.errors import ConfigError

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def test_prompt_mode_answers_with_base_plus_adapter(smollm2_dir, tmp_path):
    """The real SmolLM2-135M-Instruct under a fresh (identity) LoRA adapter: chat template, one answer, exit."""
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(ModelArguments(model_name_or_path=smollm2_dir, dtype="bfloat16"), tokenizer)
    get_peft_model(model, lora_config(ModelArguments(use_peft=True, lora_r=4), model)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "chat.py"), "--model_name_or_path", str(tmp_path),
         "--prompt", "What is the capital of France?", "--max_new_tokens", "12", "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout


def test_interactive_chat_keeps_the_conversation(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    adapter = make_adapter(tiny_gpt2_dir, tmp_path / "adapter", prompt_format="alpaca")
    tokenizer, model = load_for_inference(str(adapter))
    first = generate(model, tokenizer, alpaca_prompt("Name a color."), 6)
    history = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Another one."}]
    second = generate(model, tokenizer, render_conversation(history, tokenizer, "alpaca"), 6)
    without_history = generate(model, tokenizer, alpaca_prompt("Another one."), 6)
    assert first.strip() and second != without_history  # so the check below can tell history from none

    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\nAnother one.\n/reset\nAnother one.\n/exit\n"))
    main(ChatArguments(model_name_or_path=str(adapter), max_new_tokens=6, dtype="float32"))  # as generate() above
    out = capsys.readouterr().out
    assert "prompt format: alpaca" in out
    answers = [part.split("\n")[0].strip() for part in out.split("assistant> ")[1:]]
    assert answers == [first, second, without_history]  # after /reset the history is gone


def test_prompt_formats(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    chat_tokenizer, fallback_tokenizer = load_tokenizer(tiny_llama_dir), load_tokenizer(tiny_gpt2_dir)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Name a color."}]
    assert render_conversation(turns, chat_tokenizer, "chat").endswith(
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")
    assert render_conversation(turns, fallback_tokenizer, "chat").endswith(
        "### User:\nName a color.\n\n### Assistant:\n")
    assert render_conversation(turns, chat_tokenizer, "alpaca") == (alpaca_prompt("Hi") + "Hello\n\n"
                                                                    + alpaca_prompt("Name a color."))
    assert render_conversation(turns, chat_tokenizer, "plain") == "Name a color."
    with pytest.raises(ConfigError, match="prompt_format must be one of"):
        render_conversation(turns, chat_tokenizer, "llama2")

    assert chat_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(chat_tokenizer)
    assert stop_token_ids(fallback_tokenizer) == [fallback_tokenizer.eos_token_id]

    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    assert saved_prompt_format(str(run)) == "chat"  # nothing saved: the chat template
    (run / "prompt_format.json").write_text(json.dumps({"prompt_format": "alpaca"}))  # saved before stage_info.json
    assert saved_prompt_format(str(run)) == "alpaca"
    assert saved_prompt_format(str(run / "checkpoint-4")) == "alpaca"  # a checkpoint of that run
    save_stage_info(str(run), "sft", "plain")  # read first
    assert saved_prompt_format(str(run)) == "plain"


def test_chat_prompts_match_what_sft_trained_on(tiny_llama_dir, tiny_gpt2_dir):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a color."}]
    # one file per shape: a mixed file renders every row in its majority format
    (chat_example,), _ = sft_rows([{"messages": turns + [{"role": "assistant", "content": "Blue."}]}], "chat.json")
    (alpaca_example,), _ = sft_rows([{"instruction": "Name a color.", "input": "", "output": "Blue."}], "alpaca.json")
    for tokenizer in (load_tokenizer(tiny_llama_dir), load_tokenizer(tiny_gpt2_dir)):
        assert render_conversation(turns, tokenizer, "chat") == example_prompt(chat_example, tokenizer)
        assert render_conversation(turns[-1:], tokenizer, "alpaca") == example_prompt(alpaca_example, tokenizer)

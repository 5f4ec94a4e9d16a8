"""Rendering recorded and compared (issue 33, item 2): the RL stages and the evaluation render prompts with the
system prompt the reward model was trained with, and refuse one that differs."""

import json

import pytest

from chatgpt_recipes.data.templates import check_system_prompt, example_prompt, save_stage_info
from chatgpt_recipes.modeling.loading import load_tokenizer
from chatgpt_recipes.rl.inputs import prompt_dataset
from chatgpt_recipes.runtime.errors import ConfigError

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                           {"role": "assistant", "content": "Blue."}]} for i in range(12)]


def test_rl_prompts_carry_the_system_prompt_and_the_held_out_prompts_match_them(tmp_path, tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CHAT_ROWS))
    plain = prompt_dataset(str(path), tokenizer, "chat", 128, tokenized=False)["prompt"]
    terse = prompt_dataset(str(path), tokenizer, "chat", 128, tokenized=False, system_prompt="You are terse.")["prompt"]
    assert all("You are terse." in text for text in terse)
    assert not any("You are terse." in text for text in plain)  # a separate cache entry, not the first one's
    # the prompts SFT held out are found among the RL prompts, rendered alike
    assert example_prompt(CHAT_ROWS[0], tokenizer, "You are terse.") == terse[0]
    assert example_prompt(CHAT_ROWS[0], tokenizer) == plain[0]


def test_a_reward_model_trained_with_another_system_prompt_is_refused(tmp_path):
    save_stage_info(str(tmp_path / "rm"), "reward_model", "chat", system_prompt="You are terse.")
    check_system_prompt(str(tmp_path / "rm"), "You are terse.", "the reward model")  # the same: accepted
    with pytest.raises(ConfigError, match="rendered with 'You are terse.', but this run renders them with 'Be kind.'"):
        check_system_prompt(str(tmp_path / "rm"), "Be kind.", "the reward model")
    save_stage_info(str(tmp_path / "rm-default"), "reward_model", "chat", system_prompt=None)
    with pytest.raises(ConfigError, match="rendered with the chat template's own system prompt"):
        check_system_prompt(str(tmp_path / "rm-default"), "Be kind.", "the reward model")

"""The token that ends an answer (templates.answer_end_token_id), for a chat model whose end-of-turn token is not
its EOS (a base model given a ChatML template: EOS <|endoftext|>, turns end with <|im_end|>): the reward model's
sequences, DPO's answers (and TRL's tokenisation of them), PPO/RLOO's stop token, and generate()'s stop ids."""

import copy

import pytest

from chatgpt_recipes.data.preferences import (dpo_pairs, encode_response, ranking_of, ranking_sequences,
                                              tokenize_rankings)
from chatgpt_recipes.data.sft import tokenize_example
from chatgpt_recipes.data.templates import (answer_end_token_id, end_of_turn_token_id, render_prompt,
                                            tokenizer_ending_answers)
from chatgpt_recipes.modeling.generation import stop_token_ids

PAIR = {"prompt": [{"role": "user", "content": "Name a color."}], "chosen": "Blue.", "rejected": "Red."}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from chatgpt_recipes.modeling.loading import load_tokenizer

    return load_tokenizer(tiny_llama_dir)  # SmolLM2's: EOS is its end of turn, <|im_end|>


@pytest.fixture(scope="module")
def base_chatml(tokenizer):
    """The same ChatML template, but EOS <|endoftext|> as in Qwen2.5 base models."""
    base = copy.deepcopy(tokenizer)
    base.eos_token = "<|endoftext|>"
    assert base.eos_token_id != base.convert_tokens_to_ids("<|im_end|>")
    return base


def test_answer_end_is_the_end_of_turn_in_chat_and_eos_otherwise(tokenizer, base_chatml):
    im_end = base_chatml.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_id(base_chatml) == answer_end_token_id(base_chatml, "chat") == im_end
    assert answer_end_token_id(base_chatml, "alpaca") == answer_end_token_id(base_chatml, "plain") == \
        base_chatml.eos_token_id
    assert answer_end_token_id(tokenizer, "chat") == tokenizer.eos_token_id == im_end
    assert set(stop_token_ids(base_chatml)) == {im_end, base_chatml.eos_token_id}


def test_end_of_turn_of_the_fallback_template_is_eos(tiny_gpt2_dir):
    from chatgpt_recipes.modeling.loading import load_tokenizer

    gpt2 = load_tokenizer(tiny_gpt2_dir)  # FALLBACK_CHAT_TEMPLATE: each assistant turn ends with EOS
    assert answer_end_token_id(gpt2, "chat") == gpt2.eos_token_id


@pytest.mark.parametrize("prompt_format", ["chat", "alpaca"])
def test_reward_model_scores_at_the_token_sft_trained(base_chatml, prompt_format):
    """The RM sequence is SFT's trained example token for token: the same end token closes the answer."""
    ranking = ranking_of(PAIR, "prefs.json: row 1")
    (chosen, rejected), _ = ranking_sequences(ranking, base_chatml, prompt_format, None, "drop")
    end = answer_end_token_id(base_chatml, prompt_format)
    assert chosen[-1] == rejected[-1] == end
    assert encode_response("Blue.", base_chatml, prompt_format)[-1] == end
    if prompt_format == "chat":
        sft = tokenize_example({"messages": PAIR["prompt"] + [{"role": "assistant", "content": "Blue."}]}, base_chatml)
        trained = [token for token in sft["labels"] if token != -100]
        assert trained[-1] == end != base_chatml.eos_token_id  # SFT taught <|im_end|>, the RM reads its score there
        assert sft["input_ids"][: len(chosen)] == chosen
    else:
        prompt = render_prompt(PAIR["prompt"], base_chatml, "alpaca")
        sft = tokenize_example({"prompt": prompt, "completion": "Blue."}, base_chatml)
        assert sft["input_ids"] == chosen


def test_truncated_answers_still_end_with_the_end_token(base_chatml):
    ranking = {"prompt": "Q", "responses": ["word " * 200, "other " * 200]}
    rows, _ = tokenize_rankings([ranking], base_chatml, "chat", 64, "prefs.json", overlong="truncate")
    im_end = base_chatml.convert_tokens_to_ids("<|im_end|>")
    assert rows[0]["chosen_ids"][-1] == rows[0]["rejected_ids"][-1] == im_end
    assert len(rows[0]["chosen_ids"]) == 64


def test_trainers_get_the_end_token_as_eos_and_the_saved_tokenizer_keeps_its_own(tokenizer, base_chatml):
    answers = tokenizer_ending_answers(base_chatml, "chat")
    assert answers.eos_token == "<|im_end|>" and base_chatml.eos_token == "<|endoftext|>"
    assert tokenizer_ending_answers(base_chatml, "alpaca") is base_chatml
    assert tokenizer_ending_answers(tokenizer, "chat") is tokenizer


@pytest.mark.parametrize("which, prompt_format", [("tokenizer", "alpaca"), ("tokenizer", "chat"),
                                                  ("base_chatml", "chat"), ("base_chatml", "alpaca")])
def test_dpo_answers_hold_exactly_one_end_token_after_trl_tokenises_them(which, prompt_format, request,
                                                                        tiny_llama_dir, tmp_path):
    """TRL 1.12's DPOTrainer appends its tokenizer's EOS to an answer that does not end with it
    (dpo_trainer.py `add_eos`); the pairs end with the answer's end token and recipes/dpo.py gives TRL the
    tokenizer whose EOS that is: one end token, no second EOS."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = request.getfixturevalue(which)
    pairs = dpo_pairs(ranking_of(PAIR, "prefs.json: row 1"), tok, prompt_format)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                     per_device_train_batch_size=1, max_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer_ending_answers(tok, prompt_format))
    end = answer_end_token_id(tok, prompt_format)
    ends = {end, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for row in trainer.train_dataset:
        for answer in (row["chosen_ids"], row["rejected_ids"]):
            assert answer[-1] == end
            assert sum(token in ends for token in answer) == 1, answer


def test_ppo_and_rloo_stop_and_mask_at_the_end_of_turn(base_chatml, tiny_llama_dir, tmp_path):
    """What recipes/ppo.py and rloo.py give TRL: generation stops, PPO truncates (stop_token: eos) and RLOO ends
    its completion mask at <|im_end|>, not at the <|endoftext|> a ChatML-templated base model never learnt."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer
    from trl.experimental.ppo import PPOConfig

    from chatgpt_recipes.rl.ppo_trainer import RecipePPOTrainer

    im_end = base_chatml.convert_tokens_to_ids("<|im_end|>")
    answers = tokenizer_ending_answers(base_chatml, "chat")
    rloo = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                       reward_funcs=lambda prompts, completions, **kwargs: [0.0] * len(completions),
                       args=RLOOConfig(output_dir=str(tmp_path / "rloo"), report_to="none", bf16=False, use_cpu=True,
                                       per_device_train_batch_size=2, num_generations=2, max_completion_length=4),
                       train_dataset=Dataset.from_dict({"prompt": ["Hi"] * 4}), processing_class=answers)
    assert rloo.generation_config.eos_token_id == im_end
    scorer = lambda: AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1)  # noqa: E731
    ppo = RecipePPOTrainer(
        args=PPOConfig(output_dir=str(tmp_path / "ppo"), report_to="none", bf16=False, use_cpu=True, stop_token="eos",
                       per_device_train_batch_size=2, total_episodes=2, response_length=4),
        processing_class=answers, model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ref_model=None,
        reward_model=scorer(), value_model=scorer(), train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}))
    assert ppo.stop_token_id == ppo.policy.generation_config.eos_token_id == im_end

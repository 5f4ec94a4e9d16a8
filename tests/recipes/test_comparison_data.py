"""recipes/comparison_data.py and the held-out split it shares with SFT, PPO and the evaluation: pairs of the
reference answer over the policy's own sample, never from an instruction SFT held out, resumable; the reward model
reads them; PPO trains on no prompt SFT held out; the evaluation measures KL to a reference model."""

import json

import pytest
from comparison_data import ComparisonDataConfig, main
from conftest import REPO

from chatgpt_recipes.data.preferences import ranking_of, read_rankings, tokenize_rankings
from chatgpt_recipes.data.rows import read_rows, split_train_eval
from chatgpt_recipes.data.sft import sft_rows
from chatgpt_recipes.data.templates import example_prompt, render_prompt
from chatgpt_recipes.modeling.loading import load_tokenizer

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

ALPACA = str(REPO / "data" / "alpaca_en_demo.json")


def sft_held_out(tokenizer, size=40, seed=42) -> set[str]:
    examples, _ = sft_rows(read_rows(ALPACA), ALPACA)
    return {example_prompt(e, tokenizer) for e in split_train_eval(examples, size, seed)[1]}


def test_pairs_prefer_the_reference_skip_sft_held_out_rows_and_resume(tmp_path, tiny_llama_dir):
    settings = dict(model_name_or_path=tiny_llama_dir, output_dir=str(tmp_path), max_answer_tokens=8, batch_size=4,
                    dtype="float32", sft_eval_split_size=40, seed=42)
    main(ComparisonDataConfig(num_pairs=6, **settings))
    main(ComparisonDataConfig(num_pairs=10, **settings))  # a rerun continues the file
    rows = [json.loads(line) for line in (tmp_path / "comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({r["source_row"] for r in rows}) == 10
    tokenizer = load_tokenizer(tiny_llama_dir)
    held_out = sft_held_out(tokenizer)
    source = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())
    for row in rows:
        assert row["prompt"] not in held_out
        reference = source[row["source_row"] - 1]["output"]
        assert reference.startswith(row["chosen"][:20]) and row["chosen"] != row["rejected"]
        assert len(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) <= 8 + 1  # cut to 8 tokens
        assert row["rejected"].strip()
    info = json.loads((tmp_path / "comparisons_info.json").read_text())
    assert info["pairs"] == 10 and info["settings"]["num_pairs"] == 10
    # the reward model reads the file: the prompt rendered exactly as SFT rendered the Alpaca row
    rankings = read_rankings(read_rows(str(tmp_path / "comparisons.jsonl")), "comparisons.jsonl")
    pairs, _ = tokenize_rankings(rankings, tokenizer, "alpaca", 256, "comparisons.jsonl")
    first = source[rows[0]["source_row"] - 1]
    expected = render_prompt({"instruction": first["instruction"], "input": first["input"]}, tokenizer, "alpaca")
    assert rankings[0]["prompt"] == expected and len(pairs) == 10


def test_a_batch_written_but_not_recorded_when_killed_is_not_written_twice(tmp_path, tiny_llama_dir, monkeypatch):
    """The state kill -9 leaves between appending a batch's pairs and recording them in comparisons_info.json
    (plus half a line, a kill inside the write): the rerun ends with exactly the file of an uninterrupted run."""
    import comparison_data

    settings = dict(model_name_or_path=tiny_llama_dir, max_answer_tokens=8, batch_size=3, dtype="float32",
                    sft_eval_split_size=40, seed=42, num_pairs=6)
    main(ComparisonDataConfig(output_dir=str(tmp_path / "whole"), **settings))
    record, calls = comparison_data.record, []

    def killed_on_the_second_record(info_path, info):
        calls.append(info["pairs"])
        if len(calls) == 2:
            raise SystemExit(137)  # dies after the second batch's rows are in the file, before they are recorded
        record(info_path, info)

    monkeypatch.setattr(comparison_data, "record", killed_on_the_second_record)
    with pytest.raises(SystemExit):
        main(ComparisonDataConfig(output_dir=str(tmp_path / "killed"), **settings))
    output = tmp_path / "killed" / "comparisons.jsonl"
    with open(output, "a") as file:
        file.write('{"prompt": "cut sh')
    written = len(output.read_text().splitlines())
    assert written > json.loads((tmp_path / "killed" / "comparisons_info.json").read_text())["pairs"] == calls[0]
    monkeypatch.setattr(comparison_data, "record", record)
    main(ComparisonDataConfig(output_dir=str(tmp_path / "killed"), **settings))
    assert output.read_text() == (tmp_path / "whole" / "comparisons.jsonl").read_text()
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 6 and len({row["source_row"] for row in rows}) == 6


def test_alpaca_style_pairs_render_like_sft(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    ranking = ranking_of({"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "6"}, "r")
    assert render_prompt(ranking["prompt"], tokenizer, "alpaca") == render_prompt(
        {"instruction": "Add the numbers.", "input": "2 and 3"}, tokenizer, "alpaca")
    from chatgpt_recipes.runtime.errors import RowError
    with pytest.raises(RowError, match="instruction"):
        ranking_of({"instruction": "  ", "chosen": "5", "rejected": "6"}, "r")


def test_ppo_prompts_leave_out_what_sft_held_out(tiny_llama_dir):
    from dataclasses import dataclass

    from chatgpt_recipes.rl.inputs import RLPromptArguments, rl_prompts

    @dataclass
    class Config(RLPromptArguments):  # what PPOConfig/RLOOConfig add that rl_prompts reads
        seed: int = 42
        dataset_num_proc: int | None = None

    tokenizer = load_tokenizer(tiny_llama_dir)
    held_out = sft_held_out(tokenizer)
    config = Config(dataset_name=ALPACA, sft_eval_split_size=40, eval_prompts=16, max_prompt_length=512)
    train, evaluation, _ = rl_prompts(config, tokenizer, False, tiny_llama_dir)  # no sft_split.json: recomputed
    assert len(evaluation) == 16 and set(evaluation["prompt"]) <= held_out
    assert not set(train["prompt"]) & held_out and len(train) >= 900
    plain = Config(dataset_name=ALPACA, eval_prompts=16, max_prompt_length=512)  # no split: the first 16 held out
    assert set(rl_prompts(plain, tokenizer, False, tiny_llama_dir)[0]["prompt"]) & held_out


def test_kl_to_reference_is_zero_for_the_same_model_and_positive_for_another(tmp_path, tiny_llama_dir):
    import torch
    from evaluate_model import EvaluationConfig
    from evaluate_model import main as evaluate
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # a near-deterministic policy: its answers are unlikely under the random one
    model.save_pretrained(other)
    load_tokenizer(tiny_llama_dir).save_pretrained(other)
    results = evaluate(EvaluationConfig(
        models=[f"sft={tiny_llama_dir}", f"copy={tiny_llama_dir}", f"other={other}"], kl_reference="sft",
        output_dir=str(tmp_path / "eval"), eval_split_size=8, num_prompts=8, max_new_tokens=8, batch_size=4,
        preference_dataset=None, max_length=256, dtype="float32"))
    models = results["models"]
    assert "kl_to_reference" not in models["sft"]
    assert models["copy"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert models["other"]["kl_to_reference"] > 10  # about 8 tokens x log(vocabulary) nats
    assert all(row["answer_tokens"] > 0 for row in models.values())

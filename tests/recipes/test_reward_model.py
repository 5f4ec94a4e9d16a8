"""recipes/reward_model.py end to end on a tiny model and a preference it can learn (chosen answers carry a marker
word), plus the score position and the centering offset."""

import json
import random

import pytest
import torch
from conftest import REPO, run_recipe

from chatgpt_recipes.data.preferences import read_rankings, tokenize_rankings
from chatgpt_recipes.data.rows import read_rows, split_train_eval
from chatgpt_recipes.modeling.loading import load_tokenizer
from chatgpt_recipes.training.reward import load_reward_model, mean_reward

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


def write_marker_preferences(path, count=120, seed=0):
    """Pairs and 3-way rankings over Alpaca instructions, each after the same long preamble (so every prompt is cut at
    its start to fit MAX_LENGTH): the better answer says 'excellent', the worst 'terrible'."""
    rng = random.Random(seed)
    preamble = "Please read the following request carefully and answer it as well as you can. " * 3
    instructions = [preamble + row["instruction"]
                    for row in json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())]
    words = "the model writes a short answer about this topic with some plain words here".split()
    rows = []
    for i in range(count):
        base = " ".join(rng.sample(words, 6))
        if i % 2:
            rows.append({"prompt": instructions[i], "chosen": f"{base} excellent", "rejected": base})
        else:
            rows.append({"prompt": instructions[i],
                         "responses": [f"excellent {base}", base, f"{base} terrible"]})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


MAX_LENGTH = 40  # under every prompt + answer here: each prompt is cut at its start, the answers stay whole


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_marker_preferences(tmp / "marker.jsonl")
    out = tmp / "rm"
    result = run_recipe("reward_model.py", "--model_name_or_path", tiny_llama_dir, "--dataset_name", data,
                        "--use_peft", "false", "--max_steps", "25", "--learning_rate", "2e-3",
                        "--per_device_train_batch_size", "8", "--eval_split_size", "20", "--max_length", str(MAX_LENGTH),
                        "--centering_samples", "1000", "--bf16", "false", "--report_to", "none",
                        "--save_strategy", "no", "--logging_steps", "5", "--eval_strategy", "steps",
                        "--eval_steps", "10", "--output_dir", out)
    return {"dir": str(out), "data": str(data), "stdout": result.stdout}


def test_tiny_rm_learns_marker_preference(trained_rm):
    """Held-out accuracy far above chance (0.5) after 25 steps, every held-out pair scored although each is longer
    than max_length."""
    results = json.loads(open(trained_rm["dir"] + "/eval_results.json").read())
    assert results["eval_accuracy"] >= 0.85, results
    assert results["eval_margin"] > 0
    info = json.loads(open(trained_rm["dir"] + "/stage_info.json").read())
    assert info["prompt_format"] == "alpaca" and info["eval_accuracy"] == results["eval_accuracy"]
    _, held_out = split_train_eval(read_rankings(read_rows(trained_rm["data"]), "marker"), 20, 42)
    assert info["eval_pairs"] == sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in held_out)
    assert info["truncation"]["eval"]["truncated"] == len(held_out) == 20
    assert "eval pairwise accuracy" in trained_rm["stdout"]


def test_the_final_weights_are_evaluated_once(trained_rm):
    """The trainer evaluates at its last step (eval_strategy steps): the recipe reuses that evaluation for
    eval_results.json, stage_info.json and the report instead of scoring the held-out pairs again."""
    state = json.loads(open(trained_rm["dir"] + "/trainer_state.json").read())
    final = [entry for entry in state["log_history"] if "eval_loss" in entry and entry["step"] == state["global_step"]]
    assert state["global_step"] == 25 and len(final) == 1, final
    results = json.loads(open(trained_rm["dir"] + "/eval_results.json").read())
    assert results["eval_accuracy"] == final[0]["eval_accuracy"] and results["eval_margin"] == final[0]["eval_margin"]


def test_the_recorded_evaluation_counts_every_held_out_pair(trained_rm):
    """stage_info.json records the held-out pairs ranked right and their count, which later stages report instead
    of scoring again: the saved model, scoring the same cut pairs one by one, ranks exactly as many right (TRL's
    own eval_accuracy is a mean of per-batch means, off when the last batch is short)."""
    info = json.loads(open(trained_rm["dir"] + "/stage_info.json").read())
    tokenizer = load_tokenizer(trained_rm["dir"])
    _, held_out = split_train_eval(read_rankings(read_rows(trained_rm["data"]), "marker"), 20, 42)
    pairs, _ = tokenize_rankings(held_out, tokenizer, "alpaca", MAX_LENGTH, "marker", "truncate")
    model = load_reward_model(trained_rm["dir"])
    margins = torch.tensor([mean_reward(model, [p["chosen_ids"]], tokenizer.pad_token_id)
                            - mean_reward(model, [p["rejected_ids"]], tokenizer.pad_token_id) for p in pairs])
    assert info["eval_pairs"] == len(pairs) and info["eval_pairs"] % 8 != 0  # a short last batch of 8
    assert info["eval_correct"] == (margins > 0).sum().item() + 0.5 * (margins == 0).sum().item()
    assert info["eval_accuracy"] == info["eval_correct"] / info["eval_pairs"]
    assert info["eval_margin"] == pytest.approx(margins.mean().item(), abs=1e-3)
    assert info["eval_dataset"] == trained_rm["data"]


def test_centred_rewards_have_mean_zero(trained_rm):
    tokenizer = load_tokenizer(trained_rm["dir"])
    rankings = read_rankings(read_rows(trained_rm["data"]), "marker")
    train, _ = split_train_eval(rankings, 20, 42)  # the recipe's split: same eval size and seed
    rows, _ = tokenize_rankings(train, tokenizer, "alpaca", MAX_LENGTH, "marker", "truncate")
    answers = [list(a) for a in {tuple(ids) for row in rows for ids in (row["chosen_ids"], row["rejected_ids"])}]
    model = load_reward_model(trained_rm["dir"])
    centred = mean_reward(model, answers, tokenizer.pad_token_id)
    spread = torch.tensor([mean_reward(model, [a], tokenizer.pad_token_id) for a in answers[:20]]).std().item()
    assert abs(centred) < 0.02 * max(spread, 1.0), (centred, spread)
    assert model.config.reward_offset != 0.0


def test_score_is_read_at_the_last_real_token(trained_rm):
    """Right-padded batch scores equal unpadded scores, and equal the head applied at the EOS that ends each
    answer (pad != EOS, so padding never hides the EOS)."""
    tokenizer = load_tokenizer(trained_rm["dir"])
    model = load_reward_model(trained_rm["dir"])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == tokenizer.pad_token_id
    short = tokenizer("a short answer")["input_ids"] + [tokenizer.eos_token_id]
    long = tokenizer("a much longer answer with many more words in it")["input_ids"] + [tokenizer.eos_token_id]
    width = len(long)
    batch = torch.tensor([short + [tokenizer.pad_token_id] * (width - len(short)), long])
    mask = (batch != tokenizer.pad_token_id).long()
    with torch.no_grad():
        batched = model(input_ids=batch, attention_mask=mask).logits[:, 0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in (short, long)]
        hidden = model.model(input_ids=batch, attention_mask=mask).last_hidden_state
        at_eos = model.score(hidden)[torch.arange(2), torch.tensor([len(short) - 1, len(long) - 1]), 0]
    assert torch.allclose(batched, torch.stack(alone), atol=1e-4)
    assert torch.allclose(batched, at_eos, atol=1e-5)
    assert not torch.allclose(model.score(hidden)[0, -1, 0], batched[0], atol=1e-4)  # the pad position differs

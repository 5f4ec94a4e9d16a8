"""The reward model and DPO recipes on the real Anthropic HH-RLHF sample as shipped (data/, quirks included: row 55
has an empty final Assistant turn, row 1263 two Assistant turns in a row), through `accelerate launch` with a tiny
model; the reward model also with a separate eval file."""

import gzip
import json

import pytest
from conftest import REPO, run_recipe

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

HH = REPO / "data" / "hh_rlhf_harmless_sample.jsonl.gz"


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]


def test_the_shipped_sample_has_its_quirks():
    rows = [json.loads(line) for line in gzip.open(HH, "rt")]
    assert len(rows) == 1500
    assert rows[54]["chosen"].endswith("\n\nAssistant: ")
    assert "\n\nAssistant: Alrighty, I’ll do my best, here’s the key:\n\nAssistant:" in rows[1262]["chosen"]


def test_reward_model_trains_on_the_real_hh_sample(tmp_path, tiny_llama_dir, data_cache):
    eval_file = tmp_path / "hh_eval.jsonl"
    same = "\n\nHuman: Name a fruit\n\nAssistant: "
    eval_rows = [{"chosen": f"\n\nHuman: Name fruit {i}\n\nAssistant: Apple.", "rejected":
                  f"\n\nHuman: Name fruit {i}\n\nAssistant: No."} for i in range(30)]
    eval_rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Fruit?\n\nAssistant: Pear.",
                      "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Fruit?\n\nAssistant: No."})
    eval_rows.append({"chosen": same, "rejected": same + "Apple."})  # an empty final turn: row 32
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in eval_rows))
    out = tmp_path / "rm"
    result = run_recipe("reward_model.py", "--model_name_or_path", tiny_llama_dir, "--dataset_name", HH,
                        "--prompt_format", "chat", "--eval_dataset_name", eval_file, "--max_steps", "3",
                        "--max_length", "256", "--max_train_samples", "24", "--per_device_train_batch_size", "8",
                        "--centering_samples", "16", "--bf16", "false", "--report_to", "none",
                        "--save_strategy", "no", "--output_dir", out)
    assert f"(from {eval_file}, split train)" in result.stdout
    assert "31 eval pairs" in result.stdout  # 30 plain pairs and the one scored as whole transcripts
    skipped = records(out)
    assert {"source": str(HH), "row": 55, "field": "chosen", "reason": "field 'chosen' has an empty final Assistant "
            "turn", "kind": "defect"} in skipped
    assert {"source": str(eval_file), "row": 32, "field": "chosen", "reason": "field 'chosen' has an empty final "
            "Assistant turn", "kind": "defect"} in skipped
    assert not [r for r in skipped if r["source"] == str(HH) and r["row"] == 1263]  # kept, its turns merged
    assert all(r["kind"] == "unusable" for r in skipped if r["row"] not in (55, 32))  # the rest: too long
    report = (out / "report.md").read_text()
    assert "## Skipped rows" in report and "field 'chosen' has an empty final Assistant turn | defect | 1" in report
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_pairs"] == 31 and results["eval_accuracy"] == results["eval_correct"] / 31  # each counted


def test_dpo_trains_on_the_real_hh_sample(tmp_path, tiny_llama_dir, data_cache):
    out = tmp_path / "dpo"
    result = run_recipe("dpo.py", "--model_name_or_path", tiny_llama_dir, "--dataset_name", HH,
                        "--prompt_format", "chat", "--max_steps", "1", "--max_train_samples", "8",
                        "--eval_split_size", "6", "--max_length", "128", "--bf16", "false", "--report_to", "none",
                        "--save_strategy", "no", "--output_dir", out)
    assert "skipped 1 of 1500 rows: field 'chosen' has an empty final Assistant turn" in result.stdout
    assert [(r["row"], r["field"]) for r in records(out)] == [(55, "chosen")]
    assert "eval_rewards/accuracies" in json.loads((out / "eval_results.json").read_text())
    assert "## Skipped rows" in (out / "report.md").read_text()

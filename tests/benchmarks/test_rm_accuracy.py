"""benchmarks/rm_accuracy.py without training: its statistics on known values, the prompt-disjoint split, bad
input, the held-out pairs it cannot score, the refusal of a training that stopped early, and resume (a finished
training is skipped; the summary is rebuilt from the result files)."""

import gzip
import importlib.util
import json
import random
import types
from pathlib import Path

import pytest
from conftest import REPO

from chatgpt_recipes.evaluation.metrics import wilson_interval
from chatgpt_recipes.runtime.errors import ConfigError, DataError, RecipeError

spec = importlib.util.spec_from_file_location("rm_accuracy", REPO / "benchmarks" / "rm_accuracy.py")
rm_accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rm_accuracy)


# ---------------------------------------------------------------- statistics on known values

def test_wilson_interval_on_known_values():
    # 5 of 10 and 0 of 10 at 95%: 0.2366-0.7634 and 0-0.2775 (Newcombe 1998, Table I, method 3)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_exact_mcnemar_on_known_values():
    # 9 pairs only A ranks right, 1 only B: two-sided exact p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    a = [1.0] * 9 + [0.0] + [1.0] * 5 + [0.5]
    b = [0.0] * 9 + [1.0] + [1.0] * 5 + [1.0]  # both right on 5; a tie is no discordant pair
    assert rm_accuracy.mcnemar_p(a, b) == pytest.approx(22 / 1024)
    # 10 against 2: 2 * (1 + 12 + 66) / 4096
    assert rm_accuracy.mcnemar_p([1.0] * 10 + [0.0] * 2, [0.0] * 10 + [1.0] * 2) == pytest.approx(158 / 4096)
    assert rm_accuracy.mcnemar_p([1.0, 0.0], [1.0, 0.0]) == 1.0  # no discordant pair
    assert rm_accuracy.mcnemar_p([1.0] * 5 + [0.0] * 5, [0.0] * 5 + [1.0] * 5) == 1.0


def test_paired_bootstrap_on_known_values():
    assert rm_accuracy.paired_bootstrap([1.0] * 50, [0.0] * 50) == (1.0, 1.0)
    assert rm_accuracy.paired_bootstrap([0.5] * 50, [0.5] * 50) == (0.0, 0.0)
    # a difference of 1 on half of 400 pairs, 0 on the rest: mean 0.5, standard error 0.025, so the 95% interval
    # is about 0.5 -+ 1.96 * 0.025 = [0.451, 0.549]
    a, b = [1.0] * 200 + [0.0] * 200, [0.0] * 400
    low, high = rm_accuracy.paired_bootstrap(a, b)
    assert low == pytest.approx(0.451, abs=0.012) and high == pytest.approx(0.549, abs=0.012)


# ---------------------------------------------------------------- split and input

def hh(user: str, answer: str, later: str = "") -> str:
    return f"\n\nHuman: {user}\n\nAssistant: {answer}" + later


def hh_rows(groups: int = 40, seed: int = 0) -> list[dict]:
    rng, rows = random.Random(seed), []
    for g in range(groups):
        for k in range(rng.randint(1, 3)):
            rows.append({"chosen": hh(f"Question {g}?", f"A helpful answer {k}."),
                         "rejected": hh(f"Question {g}?", f"Go away {k}.")})
    rng.shuffle(rows)
    return rows


def test_the_split_holds_out_whole_prompt_groups_whatever_the_row_order():
    rows = hh_rows()
    train, held_out = rm_accuracy.split_by_prompt(rows, 12)
    first_turn = {json.dumps(row): row["chosen"].split("\n\nAssistant:")[0] for row in rows}
    held_turns = {first_turn[json.dumps(row)] for row in held_out}
    assert len(held_out) >= 12 and len(train) + len(held_out) == len(rows)
    assert held_turns.isdisjoint(first_turn[json.dumps(row)] for row in train)
    assert len(held_out) - 12 < 3  # it stops at the group that reaches eval_rows
    shuffled = rows[::-1]
    _, again = rm_accuracy.split_by_prompt(shuffled, 12)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, held_out))  # seed-free: the same prompts
    assert [json.dumps(r) for r in train] == [json.dumps(r) for r in rows if json.dumps(r) not in
                                              set(map(json.dumps, held_out))]  # file order kept


def test_eval_rows_the_data_cannot_hold_are_refused():
    rows = hh_rows(groups=5)
    with pytest.raises(ConfigError, match="--eval_rows"):
        rm_accuracy.split_by_prompt(rows, len(rows))
    with pytest.raises(ConfigError, match="--eval_rows"):
        rm_accuracy.split_by_prompt(rows, 0)


def test_bad_data_gets_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        rm_accuracy.read_rows(str(tmp_path / "missing.jsonl"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}] * 3))
    with pytest.raises(DataError, match="no preference rows.*Alpaca"):
        rm_accuracy.rankings_of(rm_accuracy.read_rows(str(alpaca)), str(alpaca))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(DataError, match="line 2"):
        rm_accuracy.read_rows(str(broken))


def test_a_json_list_of_pairs_and_gzipped_hh_rows_are_read_as_the_recipe_reads_them(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": f"Q{i}?", "chosen": "Yes, gladly.", "rejected": "No."} for i in range(6)]))
    rankings = rm_accuracy.rankings_of(rm_accuracy.read_rows(str(pairs)), "pairs.json")
    assert [r["responses"] for r in rankings] == [["Yes, gladly.", "No."]] * 6
    packed = tmp_path / "hh.jsonl.gz"
    with gzip.open(packed, "wt") as file:
        file.write("".join(json.dumps(row) + "\n" for row in hh_rows(groups=4)))
    assert len(rm_accuracy.read_rows(str(packed))) >= 4


# ---------------------------------------------------------------- held-out pairs that cannot be scored

@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return rm_accuracy.load_tokenizer(tiny_llama_dir)


def test_a_pair_either_model_cannot_score_is_named_and_left_out_of_both(tokenizer):
    old = "".join(hh(f"An old question number {i} about the weather far away?", f"Old answer {i}, it rains.")
                  for i in range(5))
    held_out = [
        {"chosen": hh("Name a fruit", "Apple."), "rejected": hh("Name a fruit", "No.")},
        {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"},  # no final answer: malformed
        # the same final answer after different opening turns: identical once the opening turns are cut away
        {"chosen": hh("Hi", "Hello, how can I help?", old + hh("Name a fruit", "Apple.")),
         "rejected": hh("Hi", "Go away.", old + hh("Name a fruit", "Apple."))},
        {"chosen": hh("Name a colour", "Blue."), "rejected": hh("Name a colour", "I will not.")},
    ]
    settings = types.SimpleNamespace(prompt_format="chat", max_length=64, system_prompt=None)
    pairs, left_out, rows, _ = rm_accuracy.eval_pairs(held_out, tokenizer, settings)
    assert [p["row"] for p in pairs] == [1, 4] and rows == [held_out[0], held_out[3]]
    assert {x["row"] for x in left_out} == {2, 3}
    assert any(x["row"] == 3 and x["model"] == "recipe" and "identical" in x["reason"] for x in left_out)
    assert any(x["row"] == 2 and x["model"] == "both" for x in left_out)
    for pair in pairs:  # both models get a pair for every scored row, each within max_length
        assert all(len(ids) <= 64 for model in ("recipe", "stock") for ids in pair[model])


# ---------------------------------------------------------------- stopped early, resume, summary

def test_a_training_that_stopped_early_is_refused(tmp_path):
    rm_accuracy.check_finished(tmp_path, 150, 150, "recipe")  # a whole training passes
    with pytest.raises(RecipeError, match="stopped at step 90 of 150"):
        rm_accuracy.check_finished(tmp_path, 90, 150, "stock")
    (tmp_path / "time_budget_stop.json").write_text(json.dumps(
        {"stopped_at_step": 120, "max_steps": 150, "max_train_minutes": 40}))
    with pytest.raises(RecipeError, match="stopped early at step 120 of 150"):
        rm_accuracy.check_finished(tmp_path, 150, 150, "recipe")


SETTINGS = {"learning_rate": 1e-4, "max_length": 256, "lora": {"r": 16}}


def write_result(results: Path, model: str, seed: int, right: int, total: int = 16, variant=None,
                 sha: str = "abc", settings=SETTINGS) -> None:
    """A result file whose model ranks the first `right` of `total` pairs right, the rest wrong."""
    chosen = [1.0] * total
    rejected = [0.0] * right + [2.0] * (total - right)
    pairs = [{"row": i + 1} for i in range(total)]
    trained = {"train_rows_given": 100, "train_rows_used": 80 if model == "stock" else 100,
               "train_rows_cut_or_dropped": 20, "cut_or_dropped": "dropped", "seconds": 60.0, "global_step": 13}
    record = rm_accuracy.result_record(model, variant, seed, chosen, rejected, pairs, [], sha, trained, settings,
                                       {"recipe_args": ""})
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{rm_accuracy.result_name(model, seed, variant)}.json").write_text(json.dumps(record))


def test_result_files_hold_the_fields_the_issue_lists(tmp_path):
    write_result(tmp_path, "stock", 42, right=12)
    record = json.loads((tmp_path / "stock-seed42.json").read_text())
    assert set(rm_accuracy.RESULT_FIELDS) <= set(record)
    assert record["accuracy"] == 0.75 and record["stopped_early"] is False and len(record["pair_scores"]) == 16
    assert record["interval"] == pytest.approx(list(wilson_interval(12, 16)))


def test_a_finished_training_is_skipped_and_the_summary_is_rebuilt_from_the_files(tmp_path, capsys):
    results = tmp_path / "results"
    write_result(results, "stock", 42, right=8)
    write_result(results, "recipe", 42, right=12)
    args = types.SimpleNamespace(variant=None)
    for model in ("stock", "recipe"):  # nothing to train: no config, no model, no data is touched
        rm_accuracy.run_one(model, 42, args, None, results, None, None, None, None, None, None)
    assert capsys.readouterr().out.count("done already") == 2
    table = rm_accuracy.summary(results)
    # seed 42: recipe right on 12, stock on 8 (the first 8 of the same 16): +25 points, 4 discordant pairs, p = 2/16
    assert "| recipe | 42 | 75.0 [" in table and "| stock | 42 | 50.0 [" in table
    assert "+25.0 [" in table and "| 0.125 |" in table
    write_result(results, "stock", 43, right=8)
    write_result(results, "recipe", 43, right=10)
    table = rm_accuracy.summary(results)
    # over seeds 42 and 43: recipe 75.0 and 62.5, differences +25.0 and +12.5 (sd 8.84)
    assert "| recipe | 68.8 ± 8.8 (2 seeds) | +18.8 ± 8.8 (2 seeds) |" in table
    assert "| stock | 50.0 ± 0.0 (2 seeds) |" in table


def test_the_summary_refuses_files_that_scored_other_pairs_or_trained_otherwise(tmp_path):
    write_result(tmp_path / "a", "stock", 42, right=8)
    write_result(tmp_path / "a", "recipe", 42, right=12, sha="other")
    with pytest.raises(DataError, match="different held-out pairs"):
        rm_accuracy.summary(tmp_path / "a")
    write_result(tmp_path / "b", "stock", 42, right=8)
    write_result(tmp_path / "b", "recipe", 42, right=12, settings={**SETTINGS, "learning_rate": 2e-4})
    with pytest.raises(DataError, match="different settings: learning_rate"):
        rm_accuracy.summary(tmp_path / "b")
    # the same difference is the point of a variant: listed, with what differs
    write_result(tmp_path / "b", "recipe", 42, right=12, variant="lr2e-4", settings={**SETTINGS,
                                                                                      "learning_rate": 2e-4})
    (tmp_path / "b" / "recipe-seed42.json").unlink()
    table = rm_accuracy.summary(tmp_path / "b")
    assert "| recipe (lr2e-4) | 42 |" in table and "learning_rate 0.0002 (stock 0.0001)" in table
    record = json.loads((tmp_path / "b" / "stock-seed42.json").read_text())
    record["stopped_early"] = True
    (tmp_path / "b" / "stock-seed42.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="stopped early"):
        rm_accuracy.summary(tmp_path / "b")


def test_a_variant_is_paired_with_the_recipes_default_on_the_same_seed(tmp_path):
    write_result(tmp_path, "stock", 42, right=8)
    write_result(tmp_path, "recipe", 42, right=12)
    write_result(tmp_path, "recipe", 42, right=14, variant="lr2e-4", settings={**SETTINGS, "learning_rate": 2e-4})
    table = rm_accuracy.summary(tmp_path)
    # right on the first 14 against the default's first 12: +12.5 points, 2 discordant pairs, exact p = 2 * 1/4
    row = next(line for line in table.splitlines() if line.startswith("| lr2e-4 | 42 |"))
    assert "| 87.5 | +12.5 [" in row and "| 0.500 |" in row and "learning_rate 0.0002 (stock 0.0001)" in row
    write_result(tmp_path, "recipe", 42, right=14, variant="lr2e-4", sha="other",
                 settings={**SETTINGS, "learning_rate": 2e-4})
    with pytest.raises(DataError, match="recipe-lr2e-4-seed42 and stock-seed42 scored different held-out pairs"):
        rm_accuracy.summary(tmp_path)


def test_only_the_full_size_benchmark_writes_into_the_committed_results(tmp_path):
    committed = str(rm_accuracy.DEFAULT_RESULTS)
    assert rm_accuracy.parse_args(["--seed", "42"]).results_dir == committed
    assert rm_accuracy.parse_args(["--seed", "42", "--models", "recipe", "--variant", "len512", "--recipe_args",
                                   "--max_length 512"]).results_dir == committed
    assert rm_accuracy.parse_args(["--summary"]).results_dir == committed
    for small in (["--max_steps", "2"], ["--train_rows", "24"], ["--eval_rows", "16"],
                  ["--recipe_args", "--lora_r 32"]):
        args = rm_accuracy.parse_args(small + ["--output_dir", str(tmp_path)])
        assert args.results_dir == str(tmp_path / "results"), small
    with pytest.raises(SystemExit):  # a variant is recipe-only and names what it changes
        rm_accuracy.parse_args(["--variant", "len512", "--recipe_args", "--max_length 512"])


def test_stock_reads_each_shape_with_its_prompt(tokenizer):
    rows = [{"chosen": hh("Name a fruit", "Apple."), "rejected": hh("Name a fruit", "No.")},
            {"instruction": "Name a fruit", "input": "", "chosen": "Apple.", "rejected": "No."},
            {"prompt": "Name a fruit. ", "chosen": "Apple.", "rejected": "No."},
            {"prompt": [{"role": "user", "content": "Name a fruit"}], "chosen": [{"role": "assistant", "content":
                                                                                  "Apple."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    texts = [rm_accuracy.stock_text(row, rm_accuracy.ranking_of(row, "row"), tokenizer) for row in rows]
    assert texts[0] == (rows[0]["chosen"], rows[0]["rejected"])
    assert texts[1] == ("Name a fruitApple.", "Name a fruitNo.")  # TRL joins prompt and answer as they are
    assert texts[2] == ("Name a fruit. Apple.", "Name a fruit. No.")
    assert texts[3][0].endswith("<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\nApple.<|im_end|>\n")

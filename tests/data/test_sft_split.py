"""chatgpt_recipes/data/sft_split.py: the rows SFT held out, read from its record by every later stage. A data file
that changed since SFT recorded it is refused (its row numbers would name other examples); other data has no rows
SFT held out; without a record the split is recomputed and a line says so. (SFT writing the record and the stages
reading it: tests/recipes/test_sft_lora.py.)"""

import json
import shutil

import pytest
from conftest import REPO

from chatgpt_recipes.data.sft_split import (SPLIT_FILE, carry_sft_split, record_sft_split, sft_held_out_rows,
                                            split_examples)
from chatgpt_recipes.runtime.errors import ConfigError

ALPACA = str(REPO / "data" / "alpaca_en_demo.json")


@pytest.fixture
def recorded(tmp_path):
    """A copy of the Alpaca sample and an SFT model directory whose record holds rows 2, 5 and 9 of it out."""
    data = tmp_path / "alpaca.json"
    shutil.copyfile(ALPACA, data)
    model = tmp_path / "sft"
    model.mkdir()
    record_sft_split(str(model), (str(data), "train"), (str(data), "train"), [9, 2, 5], "alpaca", 3, 42)
    return str(model), data


def test_the_record_is_read_whatever_the_stages_own_size(recorded, capsys):
    model, data = recorded
    assert sft_held_out_rows([model], str(data), "train", "eval_split_size", 40, 1) == {2, 5, 9}
    assert "SFT's 3 held-out rows" in capsys.readouterr().out
    train, held_out = split_examples(str(data), "train", frozenset({2, 5, 9}))
    assert [row for row, _ in held_out] == [2, 5, 9] and not {row for row, _ in train} & {2, 5, 9}
    rows = json.loads(data.read_text())
    assert held_out[0][1]["prompt"].startswith("Below is an instruction") or held_out[0][1]
    assert rows[1]["instruction"] in json.dumps(held_out[0][1])  # row 2 is the file's second row


def test_a_data_file_changed_since_sft_is_refused_naming_the_record(recorded):
    model, data = recorded
    rows = json.loads(data.read_text())
    data.write_text(json.dumps(rows[1:]))  # one row removed: every row number now names the next example
    with pytest.raises(ConfigError, match=f"{data} has changed since SFT recorded.*{SPLIT_FILE}"):
        sft_held_out_rows([model], str(data), "train", "sft_eval_split_size", 40, 42)


def test_other_data_has_no_rows_sft_held_out_and_says_so(recorded, capsys):
    model, _ = recorded
    assert sft_held_out_rows([model], str(REPO / "data" / "chat_demo.jsonl"), "train", "x", 40, 42) == frozenset()
    assert "is not the data SFT held rows out of" in capsys.readouterr().out


def test_models_of_different_sft_runs_are_refused(recorded, tmp_path):
    model, data = recorded
    other = tmp_path / "other-sft"
    other.mkdir()
    record_sft_split(str(other), (str(data), "train"), (str(data), "train"), [1, 2, 3], "alpaca", 3, 7)
    with pytest.raises(ConfigError, match="different SFT runs"):
        sft_held_out_rows([model, str(other)], str(data), "train", "eval_split_size", 40, 42)


def test_a_model_trained_from_sft_carries_the_record_on(recorded, tmp_path):
    model, data = recorded
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    carry_sft_split(model, str(ppo))
    assert sft_held_out_rows([str(ppo)], str(data), "train", "eval_split_size", 40, 42) == {2, 5, 9}


def test_without_a_record_the_split_is_recomputed_with_one_line(tmp_path, capsys):
    held_out = sft_held_out_rows([str(tmp_path), "smollm2-135m-instruct"], ALPACA, "train", "eval_split_size", 40, 42)
    output = capsys.readouterr().out
    assert len(held_out) == 40 and output.count("[split] no sft_split.json") == 1
    assert "recomputed from eval_split_size=40, seed=42" in output
    assert sft_held_out_rows([str(tmp_path)], ALPACA, "train", "sft_eval_split_size", 0, 42) == frozenset()

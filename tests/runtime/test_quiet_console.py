"""A console with only what applies (issue 33, item 4): the library lines that do not apply to a recipe run are
kept off it. bitsandbytes logs its line at import, and only on a CPU with AVX512-BF16: the first test checks, on
any CPU, that its filter is in place before bitsandbytes is imported; the slow one runs a recipe that builds a
reward model and fails on any of the lines (on a CPU with AVX512-BF16 that includes bitsandbytes')."""

import ast
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_recipe

QUIET_IMPORT = "chatgpt_recipes.runtime.output"
NOT_APPLYING = ("Failed to load CPU gemm_4bit_forward from kernels-community", "LOAD REPORT",
                "Consider training on your downstream task", "Setting accelerator to CPU")


def first_import(path) -> str:
    node = next(node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom)))
    return node.names[0].name if isinstance(node, ast.Import) else node.module


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO / "recipes").glob("*.py")))
def test_every_recipe_imports_the_log_filters_before_any_library(recipe):
    assert first_import(REPO / "recipes" / recipe) == QUIET_IMPORT


def test_the_bitsandbytes_filter_is_on_its_logger_when_bitsandbytes_is_imported(tmp_path):
    """In a fresh interpreter, importing a recipe: at the moment bitsandbytes is first looked for (trl imports it
    through peft), its logger already has the filter, and the line is dropped (logged or not on this CPU)."""
    probe = tmp_path / "probe.py"
    probe.write_text(f'''
import json, logging, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" and not seen:
            seen.append([f.__name__ for f in logging.getLogger("bitsandbytes.backends.cpu.ops").filters])
        return None
sys.meta_path.insert(0, Watch())
sys.path.insert(0, {str(REPO / "recipes")!r})
import grpo
print(json.dumps(seen))
''')
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == [["_not_kernels_missing"]], seen
    assert NOT_APPLYING[0] not in result.stderr


def test_the_filters_keep_other_lines_of_the_same_loggers(monkeypatch):
    import logging

    from chatgpt_recipes.runtime import output

    def passes(logger, message, *args):
        record = logging.getLogger(logger).makeRecord(logger, logging.WARNING, __file__, 1, message, args, None)
        return all(keep(record) for keep in logging.getLogger(logger).filters), record.getMessage()

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not passes("DeepSpeed", "Setting accelerator to CPU. If you have GPU ...")[0]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert passes("DeepSpeed", "Setting accelerator to CPU. If you have GPU ...")[0]
    head = ("\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: sft\nKey          | Status  | \n"
            "-------------+---------+-\nscore.weight | MISSING | \n\nNotes:\n- MISSING:\tthose params were newly "
            "initialized because missing from the checkpoint. Consider training on your downstream task.")
    assert passes("transformers.modeling_utils", head) == (
        True, "sft: new score head (score.weight), initialised for this recipe to train")
    other = head.replace("score.weight | MISSING", "model.layers.0.mlp.up_proj.weight | MISSING")
    assert passes("transformers.modeling_utils", other) == (True, other)  # a weight that should be there: kept
    assert output._new_score_head_as_one_line in logging.getLogger("transformers.modeling_utils").filters


@pytest.mark.slow
def test_a_recipe_run_prints_none_of_the_lines_that_do_not_apply(tmp_path, tiny_llama_dir):
    rows = [{"prompt": f"Name colour {i}.", "chosen": "Blue, the sky.", "rejected": "No."} for i in range(24)]
    (tmp_path / "prefs.json").write_text(json.dumps(rows))
    result = run_recipe("reward_model.py", "--model_name_or_path", tiny_llama_dir, "--dataset_name",
                        tmp_path / "prefs.json", "--use_peft", "true", "--dtype", "float32",  # merged into a reload
                        "--max_steps", "1", "--eval_split_size", "4",
                        "--per_device_train_batch_size", "4", "--max_length", "32", "--centering_samples", "8",
                        "--report_to", "none", "--save_strategy", "no", "--output_dir", tmp_path / "rm")
    output = result.stdout + result.stderr
    shown = [line for line in NOT_APPLYING if line in output]
    assert not shown, output[-4000:]
    assert output.count("new score head (score.weight)") == 1, output[-4000:]  # not again for the merge's base
    # the line the README's bad-input table quotes for a pair longer than max_length is the line printed
    row = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("| pair longer than `max_length` |"))
    quoted = re.search(r"`(\[data\] \d+ training pairs[^`]*)`", row).group(1)
    assert re.search(re.sub(r"\d+", r"\\d+", re.escape(quoted)), output), (quoted, output[-3000:])

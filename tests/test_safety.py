"""Safe by default: a checkpoint's own Python code never runs unless trust_remote_code is set (and the error says
ChatGLM-style models need it), pickle weights are refused unless allow_pickle_weights is set, and a recipe writes
nothing outside its output directory and the cache it names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.modeling.loading import ModelArguments, load_for_inference, load_model, load_tokenizer
from chatgpt_recipes.runtime.errors import ModelLoadError

# A ChatGLM-style checkpoint: its config names a model type transformers does not know, and maps the Auto
# classes to Python files shipped next to the weights. Importing those files leaves a marker: proof the code ran.
REMOTE_CONFIG = '''
import os
from transformers import GPT2Config

open(os.environ["REMOTE_CODE_MARKER"], "w").write("remote code ran")


class ChatGLMConfig(GPT2Config):
    model_type = "chatglm"
'''


@pytest.fixture
def remote_code_model(tmp_path, tiny_gpt2_dir, monkeypatch):
    model_dir = tmp_path / "chatglm-style"
    model_dir.mkdir()
    for name in os.listdir(tiny_gpt2_dir):
        (model_dir / name).write_bytes((Path(tiny_gpt2_dir) / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="chatglm", architectures=["ChatGLMModel"],
                  auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_chatglm.py").write_text(REMOTE_CONFIG)
    marker = tmp_path / "marker"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    return model_dir, marker


def test_recipe_configs_default_to_no_remote_code():
    from sft_lora import SFTRecipeConfig

    config, model_args = parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", [])
    assert config.trust_remote_code is False and getattr(model_args, "trust_remote_code", False) is False
    assert model_args.allow_pickle_weights is False


def test_remote_code_is_refused_with_a_message_that_names_chatglm(remote_code_model, tiny_gpt2_dir):
    model_dir, marker = remote_code_model
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelArguments(model_name_or_path=str(model_dir)), load_tokenizer(tiny_gpt2_dir))
    message = str(error.value)
    assert "ChatGLM" in message and "trust_remote_code: true" in message and str(model_dir) in message
    assert not marker.exists(), "the checkpoint's code ran although trust_remote_code was off"


def test_remote_code_runs_only_when_asked(remote_code_model, tiny_gpt2_dir):
    from transformers import AutoConfig

    model_dir, marker = remote_code_model
    AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    assert marker.read_text() == "remote code ran"


@pytest.fixture
def pickle_only_model(tmp_path, tiny_gpt2_dir):
    """The tiny model with its weights as pytorch_model.bin (pickle) only, as old hub checkpoints ship."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickle-only"
    model_dir.mkdir()
    for name in os.listdir(tiny_gpt2_dir):
        if name != "model.safetensors":
            (model_dir / name).write_bytes((Path(tiny_gpt2_dir) / name).read_bytes())
    torch.save(load_file(Path(tiny_gpt2_dir) / "model.safetensors"), model_dir / "pytorch_model.bin")
    return model_dir


def test_pickle_checkpoint_is_refused_unless_allowed(pickle_only_model, tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelArguments(model_name_or_path=str(pickle_only_model)), tokenizer)
    assert "no safetensors weights" in str(error.value) and "allow_pickle_weights: true" in str(error.value)
    with pytest.raises(ModelLoadError):
        load_for_inference(str(pickle_only_model))

    model = load_model(ModelArguments(model_name_or_path=str(pickle_only_model), allow_pickle_weights=True),
                       tokenizer)
    reference = load_model(ModelArguments(model_name_or_path=tiny_gpt2_dir), load_tokenizer(tiny_gpt2_dir))
    for (name, loaded), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(loaded, expected, msg=name)


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts}


def test_a_recipe_writes_only_to_its_output_dir_and_its_cache(tiny_gpt2_dir, tmp_path):
    """SFT with the home directory, working directory and temp directory pointed at empty folders: afterwards
    they are still empty, and the repository's data/ and outputs/ are unchanged."""
    home, cwd, tmp, cache, output_dir = (tmp_path / name for name in ("home", "cwd", "tmp", "cache", "out"))
    for folder in (home, cwd, tmp):
        folder.mkdir()
    watched = {name: _files_under(REPO / name) for name in ("data", "outputs") if (REPO / name).is_dir()}
    top_level = set(os.listdir(REPO))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_HOME", "XDG_", "TRANSFORMERS_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), RECIPES_CACHE=str(cache), PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft_lora.py"), "--model_name_or_path", tiny_gpt2_dir,
         "--dataset_name", str(REPO / "data" / "alpaca_en_demo.json"), "--max_train_samples", "8",
         "--eval_split_size", "4", "--max_length", "1024", "--per_device_train_batch_size", "2", "--max_steps", "2",
         "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--sample_max_new_tokens", "2",
         "--bf16", "false", "--output_dir", str(output_dir)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "checkpoint-2").is_dir()
    assert _files_under(home) == set(), "wrote into the home directory"
    assert _files_under(cwd) == set(), "wrote into the working directory"
    assert _files_under(tmp) == set(), "left files in the temp directory"
    assert set(os.listdir(REPO)) == top_level
    for name, before in watched.items():
        assert _files_under(REPO / name) == before, f"wrote into the repository's {name}/"

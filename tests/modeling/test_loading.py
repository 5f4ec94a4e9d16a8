"""chatgpt_recipes/modeling/loading.py: LoRA targets per architecture, clear errors for unknown models, wrong targets and a resume
from another run's checkpoint, and the distinct pad token."""

import pytest
import torch
import transformers
from peft import get_peft_model

from chatgpt_recipes.modeling.loading import (ModelArguments, check_checkpoint_matches, load_model, load_tokenizer,
                                              lora_config)
from chatgpt_recipes.runtime.errors import ModelLoadError

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0)
# config class, model class, extra config fields, the projections LoRA must wrap
ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=32, n_layer=1, n_head=4),
             {"c_attn", "c_proj", "c_fc"}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY,
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY,
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**TINY, "head_dim": 8},
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {**TINY, "head_dim": 8},
             {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "glm": ("GlmConfig", "GlmForCausalLM", {**TINY, "head_dim": 8},
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}),
}


def tiny_model(architecture: str):
    config_class, model_class, fields, _ = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**fields))


def wrapped_modules(peft_model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_lora_targets_resolve_per_architecture(architecture):
    model = tiny_model(architecture)
    assert model.config.model_type == architecture
    config = lora_config(ModelArguments(use_peft=True, lora_r=4), model)
    assert wrapped_modules(get_peft_model(model, config)) == ARCHITECTURES[architecture][3]


def test_all_linear_and_user_targets():
    config = lora_config(ModelArguments(use_peft=True, lora_target_modules=["all-linear"]), tiny_model("llama"))
    assert config.target_modules == "all-linear"
    config = lora_config(ModelArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), tiny_model("qwen2"))
    assert set(config.target_modules) == {"q_proj", "v_proj"}


def test_absent_lora_targets_name_the_real_layers():
    # LLaMA names on GPT-2, the most common mix-up
    with pytest.raises(ModelLoadError, match=r"\['q_proj', 'v_proj'\] do not exist in this gpt2 model.*c_attn"):
        lora_config(ModelArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), tiny_model("gpt2"))


def test_full_fine_tuning_has_no_lora_and_quantized_full_tuning_is_refused():
    assert lora_config(ModelArguments(use_peft=False), tiny_model("llama")) is None
    with pytest.raises(ModelLoadError, match="cannot be fully fine-tuned"):
        lora_config(ModelArguments(use_peft=False, load_in_4bit=True), tiny_model("llama"))


@pytest.mark.parametrize("name, message", [
    ("/no/such/model/dir", "model path not found: /no/such/model/dir"),
    ("./missing-model.gguf", "model file not found"),
    ("no-such-org/no-such-model-xyz", "could not load tokenizer 'no-such-org/no-such-model-xyz'"),
])
def test_unknown_model_names_give_clear_errors(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_tokenizer(name)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no model"):
        load_tokenizer(str(tmp_path))


def test_pad_token_is_distinct_from_eos(tiny_gpt2_dir, tiny_llama_dir):
    for path in (tiny_gpt2_dir, tiny_llama_dir):
        tokenizer = load_tokenizer(path)
        assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
        model = load_model(ModelArguments(model_name_or_path=path), tokenizer)
        assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
        assert model.config.pad_token_id == tokenizer.pad_token_id


def test_resuming_from_another_runs_checkpoint_is_refused(tmp_path):
    llama_run = get_peft_model(tiny_model("llama"), lora_config(ModelArguments(use_peft=True, lora_r=4),
                                                                tiny_model("llama")))
    llama_run.save_pretrained(tmp_path / "lora" / "checkpoint-2")
    check_checkpoint_matches(tmp_path / "lora" / "checkpoint-2", llama_run)  # the same run resumes

    gpt2 = tiny_model("gpt2")
    gpt2_run = get_peft_model(gpt2, lora_config(ModelArguments(use_peft=True, lora_r=4), gpt2))
    with pytest.raises(ModelLoadError, match="cannot resume from .*checkpoint-2: it was written by a different run"):
        check_checkpoint_matches(tmp_path / "lora" / "checkpoint-2", gpt2_run)
    with pytest.raises(ModelLoadError, match="different run"):
        check_checkpoint_matches(tmp_path / "lora" / "checkpoint-2", tiny_model("llama"))  # full run, LoRA ckpt

    tiny_model("llama").save_pretrained(tmp_path / "full" / "checkpoint-2")
    check_checkpoint_matches(tmp_path / "full" / "checkpoint-2", tiny_model("llama"))
    with pytest.raises(ModelLoadError, match="different run.*gpt2"):
        check_checkpoint_matches(tmp_path / "full" / "checkpoint-2", tiny_model("gpt2"))


@pytest.mark.parametrize("dtype, norm_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_qlora_keeps_bf16_norms_and_embeddings(tiny_llama_dir, dtype, norm_dtype):
    """PEFT's prepare_model_for_kbit_training would upcast them to fp32, making every activation fp32 and QLoRA's
    peak memory higher than LoRA's (benchmarks/qlora_memory.py); only fp16 ones are upcast (fp16 norms overflow)."""
    import bitsandbytes as bnb

    model = load_model(ModelArguments(model_name_or_path=tiny_llama_dir, load_in_4bit=True, dtype=dtype),
                       load_tokenizer(tiny_llama_dir))
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    assert model.get_input_embeddings().weight.dtype == norm_dtype
    assert model.model.norm.weight.dtype == norm_dtype
    assert not any(param.requires_grad for param in model.parameters())


def test_4bit_layers_stay_trainable_and_a_bitsandbytes_rename_is_refused(tiny_llama_dir, monkeypatch):
    """load_model turns off bitsandbytes' CPU repacking of 4-bit weights (it would stop gradients after an eval-mode
    forward); a bitsandbytes without that switch, or another version, is refused rather than silently ignored."""
    import bitsandbytes as bnb

    from chatgpt_recipes.runtime.errors import LibraryMismatchError

    args = ModelArguments(model_name_or_path=tiny_llama_dir, load_in_4bit=True)
    tokenizer = load_tokenizer(tiny_llama_dir)
    layers = [m for m in load_model(args, tokenizer).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    monkeypatch.setattr(bnb, "__version__", "0.51.0")
    with pytest.raises(LibraryMismatchError, match="bitsandbytes 0.51.0 is installed: pin bitsandbytes==0.50.2"):
        load_model(args, tokenizer)


# ---------------------------------------------------------------- model directories diagnosed (issue 24)

def copy_model_dir(source: str, target) -> str:
    import shutil

    shutil.copytree(source, target)
    return str(target)


def test_directory_with_config_and_tokenizer_but_no_weights(tiny_gpt2_dir, tmp_path):
    folder = copy_model_dir(tiny_gpt2_dir, tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"holds a model config but no weights: no model.safetensors") as error:
        load_model(ModelArguments(model_name_or_path=folder), load_tokenizer(folder))
    assert "pickle" not in str(error.value)


def test_truncated_safetensors_is_named(tiny_gpt2_dir, tmp_path):
    folder = copy_model_dir(tiny_gpt2_dir, tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model weights in .*truncated are unusable: model.safetensors is "
                                             r"truncated"):
        load_model(ModelArguments(model_name_or_path=folder), load_tokenizer(folder))


def test_pickle_only_directory_is_refused_as_pickle(tiny_gpt2_dir, tmp_path):
    folder = copy_model_dir(tiny_gpt2_dir, tmp_path / "pickle")
    (tmp_path / "pickle" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="has no safetensors weights; pickle checkpoints"):
        load_model(ModelArguments(model_name_or_path=folder), load_tokenizer(folder))


def test_causal_lm_or_multi_label_classifier_as_reward_model(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from chatgpt_recipes.rl.inputs import check_reward_model_path

    with pytest.raises(ModelLoadError, match=r"is a GPT2LMHeadModel, not a reward model \(a sequence classifier"):
        check_reward_model_path(tiny_gpt2_dir)
    for labels, message in ((3, "is a classifier with 3 labels; a reward model has one score"),
                            (2, "is a classifier with 2 labels"), (1, None)):
        folder = tmp_path / f"classifier-{labels}"
        AutoModelForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=labels).save_pretrained(folder)
        if message:
            with pytest.raises(ModelLoadError, match=message):
                check_reward_model_path(str(folder))
        else:
            check_reward_model_path(str(folder))


def test_backbone_copy_into_a_classifier_refuses_dropped_keys(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from chatgpt_recipes.modeling.loading import copy_backbone

    causal = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=1)
    with torch.no_grad():
        causal.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    copy_backbone(causal, classifier, "sft")  # only the heads differ: fine, and the backbone is copied
    assert torch.equal(classifier.transformer.h[0].mlp.c_fc.weight, causal.transformer.h[0].mlp.c_fc.weight)
    llama_config = tiny_model("llama").config
    llama_config.num_labels = 1
    other = AutoModelForSequenceClassification.from_config(llama_config)
    with pytest.raises(ModelLoadError, match=r"their weights do not match \(classifier weights the causal LM lacks: "
                                             r"\d+ \(\['model."):
        copy_backbone(causal, other, "sft")


def test_sft_adapter_under_a_score_head_copies_every_backbone_weight(tiny_llama_dir, tmp_path):
    """load_model(num_labels=1) of an SFT (causal-LM) LoRA adapter: merged into its base, copied into the
    classifier through copy_backbone, which would refuse any key but the heads that does not match."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_llama_dir)
    causal = load_model(ModelArguments(model_name_or_path=tiny_llama_dir, dtype="float32"), tokenizer)
    adapter_config = lora_config(ModelArguments(use_peft=True, lora_r=4, lora_alpha=8), causal)
    adapter_config.init_lora_weights = False
    torch.manual_seed(0)
    get_peft_model(causal, adapter_config).save_pretrained(tmp_path / "sft")
    classifier = load_model(ModelArguments(model_name_or_path=str(tmp_path / "sft"), dtype="float32"), tokenizer,
                            num_labels=1)
    merged = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_config)
    merged.load_adapter(str(tmp_path / "sft"), adapter_name="default")
    expected = merged.merge_and_unload().state_dict()
    for name, weight in classifier.state_dict().items():
        if not name.startswith("score."):
            assert torch.allclose(weight, expected[name][: weight.shape[0]]), name


def test_two_processes_filling_the_same_cache_entry_fill_it_once(tmp_path):
    """The ranks of `accelerate launch` (and parallel test workers) may ask for the offline model at once: one
    fills the cache entry (download and conversion: here a slow fill that writes through a temporary directory as
    the conversion does), the other waits for it and reads the same directory. (CI's empty cache and its two test
    workers also run the real download and conversion this way, in the `smollm2_dir` fixture.)"""
    import os
    import subprocess
    import sys

    code = """
import os, sys, time
from pathlib import Path
from chatgpt_recipes.runtime.cache import fill_cache_entry_once

def fill(out):
    with open(out.parent / "fills.log", "a") as log:
        log.write(str(os.getpid()) + "\\n")
    tmp = out.parent / f"{out.name}.tmp{os.getpid()}"
    tmp.mkdir()
    time.sleep(2)
    (tmp / "config.json").write_text("{}")
    tmp.rename(out)

print(fill_cache_entry_once(Path(sys.argv[1]) / "entry", fill))
"""
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=os.environ) for _ in range(2)]
    results = [(process.communicate(timeout=120), process.returncode) for process in processes]
    for (stdout, stderr), returncode in results:
        assert returncode == 0, stderr[-3000:]
    assert {stdout.strip() for (stdout, _), _ in results} == {str(tmp_path / "entry")}
    assert len((tmp_path / "fills.log").read_text().split()) == 1  # filled once
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["entry"]

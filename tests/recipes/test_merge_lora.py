"""recipes/merge_lora.py: the merged model loads with plain transformers and gives the logits of base + adapter."""

import json
from pathlib import Path

import pytest
import torch
from merge_lora import MergeArguments, main
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatgpt_recipes.data.templates import save_stage_info
from chatgpt_recipes.modeling.loading import ModelArguments, load_for_inference, load_model, load_tokenizer, lora_config
from chatgpt_recipes.runtime.errors import ModelLoadError

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core CPU run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_adapter(base_dir: str, output_dir: Path, prompt_format: str | None = None) -> Path:
    """A LoRA adapter with random (not zero) weights on `base_dir`, saved the way sft_lora.py saves one."""
    tokenizer = load_tokenizer(base_dir)
    model = load_model(ModelArguments(model_name_or_path=base_dir, dtype="float32"), tokenizer)
    config = lora_config(ModelArguments(use_peft=True, lora_r=4, lora_alpha=8), model)
    config.init_lora_weights = False  # random A and B, so that the adapter changes the outputs
    torch.manual_seed(0)
    get_peft_model(model, config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if prompt_format:
        save_stage_info(str(output_dir), "sft", prompt_format)
    return output_dir


def test_merged_model_gives_the_logits_of_base_plus_adapter(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    # saved before stage_info.json existed: the merged model gets a stage_info.json all the same
    (adapter / "prompt_format.json").write_text(json.dumps({"prompt_format": "alpaca"}))
    merged_dir = Path(main(MergeArguments(adapter_path=str(adapter))))
    assert merged_dir == tmp_path / "adapter-merged"

    with safe_open(merged_dir / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "lora" in name]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert json.loads((merged_dir / "stage_info.json").read_text()) == {"stage": "sft", "prompt_format": "alpaca"}

    _, with_adapter = load_for_inference(str(adapter))
    _, base = load_for_inference(tiny_llama_dir)
    inputs = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        adapter_logits = with_adapter(**inputs).logits
        base_logits = base(**inputs).logits
    # fp32: merging only reorders the same sums, so the outputs agree to float rounding
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model


def test_the_base_is_merged_at_full_precision(tiny_llama_dir, tmp_path):
    """A QLoRA adapter's base is reloaded in float, never 4-bit: no quantized layers in the merged model."""
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merged_dir = main(MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "bf16"), dtype="bfloat16"))
    config = json.loads((Path(merged_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    linears = [m for m in AutoModelForCausalLM.from_pretrained(merged_dir).modules() if "Linear" in type(m).__name__]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)


def test_not_an_adapter_is_a_clear_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="is not a LoRA adapter directory"):
        main(MergeArguments(adapter_path=tiny_llama_dir))
    with pytest.raises(ModelLoadError, match="is not a LoRA adapter directory"):
        main(MergeArguments(adapter_path=str(tmp_path / "missing")))

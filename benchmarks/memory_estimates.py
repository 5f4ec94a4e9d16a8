"""Memory per GPU for the model states (weights, gradients, optimizer states) of each training mode, by model size
and launcher: the numbers behind the config table in the README. No weights are downloaded: each model is built
from its architecture on PyTorch's meta device and its parameters counted exactly.

    python benchmarks/memory_estimates.py            # markdown table on stdout

Full fine-tuning: DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs
and stage3.estimate_zero3_model_states_mem_needs, the functions behind estimate_zero{2,3}_model_states_mem_needs_all_cold),
bf16 mixed precision with Adam: 18 bytes/parameter sharded (+2 replicated under ZeRO-2). One GPU without DeepSpeed
(single_gpu.yaml, multi_gpu.yaml) is the ZeRO-2 estimate for one GPU. LoRA and QLoRA have no estimator in either
library; their formula is written out in `adapter_states` (frozen bf16 or NF4 weights, LoRA weights trained in fp32
with Adam). Activations come on top and grow with batch x sequence length: gradient_checkpointing: true cuts them to
about one layer's worth.
"""

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

GB = 1024**3
# Architectures as published in each model's config.json on the Hugging Face hub.
MODELS = {
    "SmolLM2-135M": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Qwen2.5-0.5B": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Llama-3.2-1B": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B": LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=False),
    "Qwen2.5-14B": Qwen2Config(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                               num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-32B": Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                               num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3.1-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the recipes' default
LORA_R = 16


def count(model) -> dict:
    """Total parameters (tied ones once), the largest single module's own parameters (what ZeRO-3 gathers at
    once), the parameters of the linear layers LoRA wraps (what 4-bit quantizes) and the LoRA weights at rank r."""
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    targets = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS]
    return {"total": sum(unique.values()), "largest_layer": largest,
            "quantizable": sum(m.weight.numel() for m in targets),
            "lora": sum(LORA_R * (m.in_features + m.out_features) for m in targets)}


def adapter_states(params: dict, four_bit: bool) -> int:
    """Bytes for LoRA (frozen bf16 weights) or QLoRA (NF4 linear weights with double-quantized block scales:
    4 + 0.127 bits per weight; embeddings, norms and head stay bf16). LoRA weights: fp32 weight, gradient and
    two Adam moments = 16 bytes each."""
    frozen = (params["quantizable"] * (4 + 0.127) / 8 + (params["total"] - params["quantizable"]) * 2 if four_bit
              else params["total"] * 2)
    return int(frozen + 16 * params["lora"])


def main() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    local = Path(os.environ.get("RECIPES_CACHE", Path.home() / ".cache" / "chatgpt-recipes")) / "models" / \
        "smollm2-135m-instruct" / "config.json"
    if local.is_file():  # the demo model's real config, when materialised: a check on the numbers above
        real = json.loads(local.read_text())
        assert (real["hidden_size"], real["num_hidden_layers"]) == (576, 30), real

    print("Model states per GPU in GiB (weights + gradients + optimizer states; activations come on top).")
    print("full: DeepSpeed's estimators; ZeRO-3 offload puts the rest in CPU RAM (per node, DeepSpeed's "
          "estimate incl. its 1.5x buffer factor). LoRA/QLoRA: r=16 on q,k,v,o,gate,up,down.\n")
    header = ["model", "params", "LoRA params", "full, 1 GPU", "full, ZeRO-2 x8", "full, ZeRO-3 x8",
              "full, ZeRO-3 4 nodes x8", "full, ZeRO-3 offload x8 (GPU / CPU RAM per node)", "LoRA, 1 GPU",
              "QLoRA, 1 GPU"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, config in MODELS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = count(model)
        total, largest = params["total"], params["largest_layer"]

        def zero2(gpus):
            return estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)[1]

        def zero3(gpus, nodes=1, offload=False):
            return estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=nodes,
                                                         cpu_offload=offload, cpu_offload_params=offload)[:2]

        offload_cpu, offload_gpu = zero3(8, offload=True)
        row = [name, f"{total / 1e9:.2f}B", f"{params['lora'] / 1e6:.1f}M", f"{zero2(1) / GB:.1f}",
               f"{zero2(8) / GB:.1f}", f"{zero3(8)[1] / GB:.1f}", f"{zero3(8, nodes=4)[1] / GB:.1f}",
               f"{offload_gpu / GB:.1f} / {offload_cpu / GB:.0f}",
               f"{adapter_states(params, False) / GB:.1f}", f"{adapter_states(params, True) / GB:.1f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

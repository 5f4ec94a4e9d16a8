"""Packed attention on a CPU: which kernel should the CPU path keep? One SmolLM2-135M attention layer (9 query heads,
3 key/value heads, head dim 64), forward + backward, on one packed row of 2048 tokens (the recipe's 4 x 512) cut into
examples of Alpaca-like lengths, fp32, as the CPU trains:
  sdpa_packed   causal SDPA per example (chatgpt_recipes.modeling.kernels.packed_sdpa_attention, the CPU path)
  masked_sdpa   one SDPA call with the block-diagonal causal mask (transformers' sdpa on a padding-free batch)
  flex_eager    flex_attention with a document block mask (built once), without torch.compile (eager flex
                materialises the full score matrix); torch 2.13 has no flex backward on a CPU, which the table
                records: flex cannot train on a CPU

    python benchmarks/cpu_packed_attention.py          # prints the table, writes benchmarks/cpu_packed_attention.txt
"""

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bench_utils import machine, versions

HEADS, KV_HEADS, DIM, ROUNDS = 9, 3, 64, 7
LENGTHS = [183, 402, 96, 311, 250, 148, 512, 146]  # 2048 tokens


def inputs():
    torch.manual_seed(0)
    tokens = sum(LENGTHS)
    return [torch.randn(1, heads, tokens, DIM, requires_grad=True) for heads in (HEADS, KV_HEADS, KV_HEADS)]


def sdpa_packed(q, k, v, _):
    from chatgpt_recipes.modeling.kernels import packed_sdpa_attention

    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    module = type("Attention", (), {"num_key_value_groups": HEADS // KV_HEADS})()
    return packed_sdpa_attention(None, module, q, k, v, None, position_ids=positions)[0]


def masked_sdpa(q, k, v, _):
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    causal = torch.ones(doc.numel(), doc.numel(), dtype=torch.bool).tril()
    mask = causal & (doc[:, None] == doc[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def flex_eager(q, k, v, block_mask):
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def main():
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None,
                                   doc.numel(), doc.numel(), device="cpu")
    lines = [f"{time.strftime('%Y-%m-%d')} | {machine()} | {versions()}",
             f"one attention layer, {HEADS}/{KV_HEADS} heads x {DIM}, {len(LENGTHS)} examples in {sum(LENGTHS)} "
             f"tokens, fp32, forward + backward, best of {ROUNDS} interleaved rounds", "",
             "| kernel | ms | max abs diff vs sdpa_packed |",
             "|---|---|---|"]
    kernels = {"sdpa_packed": sdpa_packed, "masked_sdpa": masked_sdpa, "flex_eager": flex_eager}
    best, outputs, failed = {name: float("inf") for name in kernels}, {}, {}
    for _ in range(ROUNDS):  # interleaved, best of ROUNDS each: the machine is shared
        for name, kernel in kernels.items():
            if name in failed:
                continue
            q, k, v = inputs()
            start = time.perf_counter()
            try:
                out = kernel(q, k, v, block_mask)
                out = out.transpose(1, 2) if name != "sdpa_packed" else out  # -> [1, tokens, heads, dim]
                out.sum().backward()
            except NotImplementedError as error:
                failed[name] = str(error).splitlines()[0]
                continue
            best[name] = min(best[name], time.perf_counter() - start)
            outputs[name] = out.detach()
    for name in kernels:
        if name in failed:
            lines.append(f"| {name} | cannot train here: {failed[name]} | - |")
        else:
            difference = (outputs[name] - outputs["sdpa_packed"]).abs().max()
            lines.append(f"| {name} | {1000 * best[name]:.1f} | {difference:.1e} |")
    lines.append(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above the core "
                 "count: contended, other jobs ran beside it)")
    text = "\n".join(lines)
    print(text)
    Path(__file__).with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

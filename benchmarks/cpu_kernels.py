"""The kernel timings behind two of the CPU levers, on this machine: LoRA dropout masks (torch's Bernoulli vs the
recipe's FastDropout, against a matmul of the same activations) and the GEMMs of one decoding step (PPO's sampling,
batch 4) in bf16 vs fp32. Not a test.

    python benchmarks/cpu_kernels.py
"""

import time

import torch

from chatgpt_recipes.modeling.kernels import FastDropout  # noqa: E402

from bench_utils import machine  # noqa: E402

HIDDEN, INTERMEDIATE, TOKENS = 576, 1536, 2048  # SmolLM2-135M's widths, one packed 4 x 512-token batch


def milliseconds(function, repeats: int = 20) -> float:
    for _ in range(3):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {machine()} | torch {torch.__version__}\n")
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
    weight = torch.randn(INTERMEDIATE, HIDDEN, dtype=torch.bfloat16)
    fast = FastDropout(0.05).train()
    print(f"LoRA dropout p=0.05 on [{TOKENS} x {HIDDEN}] bf16 activations:")
    print("| op | ms |\n|---|---|")
    print(f"| torch.nn.functional.dropout (bernoulli_) | {milliseconds(lambda: torch.nn.functional.dropout(x, 0.05, True)):.2f} |")
    print(f"| FastDropout | {milliseconds(lambda: fast(x)):.2f} |")
    print(f"| for scale: [{TOKENS} x {HIDDEN}] x [{HIDDEN} x {INTERMEDIATE}] bf16 matmul | "
          f"{milliseconds(lambda: torch.nn.functional.linear(x, weight)):.2f} |")

    print("\nOne decoding step's GEMMs at batch 4 (PPO sampling), microseconds per call:")
    print("| shape | bf16 | fp32 | fp32 / bf16 |\n|---|---|---|---|")
    for k, n in ((HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 192)):
        times = {}
        for dtype in (torch.bfloat16, torch.float32):
            a, w = torch.randn(4, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            times[dtype] = 1e3 * milliseconds(lambda: torch.nn.functional.linear(a, w), repeats=200)
        print(f"| [4 x {k}] x [{k} x {n}] | {times[torch.bfloat16]:.0f} | {times[torch.float32]:.0f} | "
              f"{times[torch.float32] / times[torch.bfloat16]:.2f} |")


if __name__ == "__main__":
    main()

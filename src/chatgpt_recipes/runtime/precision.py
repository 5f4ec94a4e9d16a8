"""One precision decision for every recipe: bf16 where the hardware computes it natively, fp16 mixed precision on
CUDA GPUs without bf16, fp32 everywhere else.

Apple MPS (Apple-silicon GPUs) is used, as accelerate and transformers pick it: bf16 where PyTorch supports it there
(macOS 14 or newer, transformers' own test), else fp32 (fp16 mixed precision on MPS is not offered: it needs a loss
scaler we have not tested there).

On a CPU, bf16 is only fast with AVX512-BF16 or AMX: without them (AVX2-only CPUs such as AMD Zen 3 and most
Intel laptops before Sapphire Rapids) PyTorch emulates bf16 matmuls, about 80x slower than fp32. So the CPU is
probed twice: its flags (and oneDNN's own query), then a few-millisecond matmul timing, since flags can lie
(a hypervisor that passes the flag without the unit). `bf16`, `fp16` and `dtype` set to `auto` (the defaults) get
this decision; an explicit setting wins, with a warning when it is slow here.

`RECIPES_NATIVE_BF16=0` (or 1) overrides the probe, for tests of the other CPU kind and for hardware that lies.
"""

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)

FORCE_ENV = "RECIPES_NATIVE_BF16"
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# Native bf16 matmuls run at least as fast as fp32 ones; emulated ones 10-100x slower. Below this speed ratio
# (fp32 time / bf16 time) the flags are not believed.
_MIN_NATIVE_SPEEDUP = 0.5


@dataclass(frozen=True)
class Capability:
    """What the device computes natively. `bf16_speedup`: measured fp32 / bf16 matmul time (CPU only)."""

    device: str  # "cuda", "mps" or "cpu"
    native_bf16: bool
    fp16: bool  # fp16 mixed precision (CUDA only)
    evidence: str
    bf16_speedup: float | None = None


@dataclass(frozen=True)
class Precision:
    """The chosen mixed precision (`bf16`/`fp16` autocast flags) and the dtype computation runs in."""

    bf16: bool
    fp16: bool
    reason: str

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    def weights_dtype(self, trains_all_weights: bool) -> str:
        """Storage dtype of the weights: frozen ones (LoRA/QLoRA base, reference, reward model) in the compute
        dtype, so no per-step casts; weights that are trained in full keep fp32 master copies."""
        return "float32" if trains_all_weights else self.compute_dtype


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _onednn_bf16() -> bool:
    # A private torch query (torch 2.x); a torch without it falls back on the CPU flags and the timing.
    query = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(query()) if query is not None else False
    except RuntimeError:
        return False


def measure_bf16_speedup(rounds: int = 3) -> float:
    """fp32 matmul time / bf16 matmul time on this CPU ([128 x 256] x [256 x 256], best of `rounds`): about 3
    with native bf16, about 0.01 where bf16 is emulated. Takes a few milliseconds either way."""
    def best_time(dtype) -> float:
        a, b = torch.ones(128, 256, dtype=dtype), torch.ones(256, 256, dtype=dtype)
        a @ b  # warm-up: oneDNN picks its kernel on the first call
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return best_time(torch.float32) / max(best_time(torch.bfloat16), 1e-9)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def inference_device(use_cpu: bool = False) -> torch.device:
    """The device inference-only recipes run on: CUDA or Apple MPS when present (unless `use_cpu`), else the CPU."""
    if use_cpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("mps") if _mps_available() else torch.device("cpu")


def _forced() -> bool | None:
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    return None


@functools.lru_cache(maxsize=None)
def detect_capability(use_cpu: bool = False) -> Capability:
    """Probe the device the recipes will run on (Apple MPS or CUDA unless `use_cpu` or none is present)."""
    forced = _forced()
    if _mps_available() and not use_cpu:
        native = torch.backends.mps.is_macos_or_newer(14, 0) if forced is None else forced
        evidence = "Apple MPS: " + ("bf16 (macOS 14+)" if native else "no bf16 before macOS 14")
        return Capability("mps", native, False, evidence)
    if torch.cuda.is_available() and not use_cpu:
        name = torch.cuda.get_device_name()
        native = torch.cuda.is_bf16_supported(including_emulation=False) if forced is None else forced
        return Capability("cuda", native, True, f"{name}: {'bf16 supported' if native else 'no bf16 units'}")
    if forced is not None:
        return Capability("cpu", forced, False, f"{FORCE_ENV}={os.environ[FORCE_ENV]} overrides the CPU probe")
    flags = sorted(_CPU_BF16_FLAGS & _cpu_flags())
    speedup = measure_bf16_speedup()
    claims = bool(flags) or _onednn_bf16()
    if not claims:
        evidence = f"no AVX512-BF16 or AMX; bf16 matmul measured {1 / speedup:.0f}x slower than fp32"
    elif speedup < _MIN_NATIVE_SPEEDUP:
        evidence = (f"the CPU claims bf16 ({', '.join(flags) or 'oneDNN'}) but bf16 matmul measured "
                    f"{1 / speedup:.0f}x slower than fp32")
    else:
        evidence = f"{', '.join(flags) or 'oneDNN bf16'}; bf16 matmul measured {speedup:.1f}x fp32"
    return Capability("cpu", claims and speedup >= _MIN_NATIVE_SPEEDUP, False, evidence, speedup)


def choose_precision(capability: Capability, bf16: bool | None = None, fp16: bool | None = None) -> Precision:
    """The precision for `capability`. `bf16`/`fp16`: the user's explicit setting, or None for auto."""
    if bf16 or fp16:
        if bf16 and fp16:
            raise ConfigError("bf16 and fp16 are both set to true: choose one (or set both to auto)")
        what = "bf16" if bf16 else "fp16"
        if bf16 and not capability.native_bf16:
            slower = (f"bf16 matmul measured {1 / capability.bf16_speedup:.0f}x slower than fp32 here"
                      if capability.bf16_speedup else "bf16 is emulated here")
            logger.warning("bf16 was set explicitly, but this %s has no native bf16 (%s): expect a much slower "
                           "run than with bf16: auto (fp32 here)", capability.device, slower)
        return Precision(bool(bf16), bool(fp16), f"{what} set explicitly ({capability.evidence})")
    if capability.native_bf16 and bf16 is None:
        return Precision(True, False, f"bf16 autocast: {capability.device} computes bf16 natively "
                                      f"({capability.evidence})")
    if capability.device == "cuda" and capability.fp16 and not capability.native_bf16 and fp16 is None:
        return Precision(False, True, f"fp16 mixed precision with loss scaling: {capability.evidence}")
    if bf16 is False or fp16 is False:
        return Precision(False, False, f"fp32: bf16/fp16 set to false ({capability.evidence})")
    return Precision(False, False, f"fp32: {capability.device} has no native bf16 ({capability.evidence})")


def parse_flag(value) -> bool | None:
    """A bf16/fp16 setting from YAML or the command line: True, False, or None for auto/unset."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"expected true, false or auto, got {value!r}")


@functools.lru_cache(maxsize=None)
def announce(reason: str) -> None:
    """Print the precision line once per process (and only on the main process of a multi-process launch)."""
    if int(os.environ.get("RANK", "0")) == 0:
        say(f"[precision] {reason}", flush=True)


def inference_dtype(dtype: str, use_cpu: bool = False) -> torch.dtype:
    """The torch dtype for inference-only recipes (chat, evaluation): `auto` is the decision's compute dtype."""
    capability = detect_capability(use_cpu)
    chosen = choose_precision(capability, bf16=True if dtype == "bfloat16" else None)  # warns if bf16 is emulated
    if dtype in (None, "auto"):
        announce(chosen.reason)
        return getattr(torch, chosen.compute_dtype)
    announce(f"{dtype} set explicitly ({capability.evidence})")
    return getattr(torch, dtype)

"""What every benchmark prints the same way: the machine, the library versions, and a mean with its range."""

import importlib.util
import os
import platform
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_module(name: str):
    """recipes/<name>.py imported as the module `name` (the recipes are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (GPU)"
    from chatgpt_recipes.runtime.precision import detect_capability

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    capability = detect_capability()
    return (f"{model}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
            f"{'native' if capability.native_bf16 else 'no native'} bf16 ({capability.evidence})")


def spread(values: list[float], form: str = ".4g") -> str:
    """The mean, and [min-max] when there is more than one value."""
    mean = sum(values) / len(values)
    return f"{mean:{form}}" if len(values) == 1 else f"{mean:{form}} [{min(values):{form}}-{max(values):{form}}]"


class GpuBusy:
    """The GPU's utilisation while the block runs, as `nvidia-smi dmon` shows it: nvidia-smi samples
    utilization.gpu (the share of each sample period in which a kernel ran) every `period_ms`. `share` is their
    mean (0-1), None without a CUDA GPU or nvidia-smi. The block's own CUDA work is synchronised before it ends."""

    def __init__(self, period_ms: int = 100):
        self.period_ms, self.share, self.samples, self._process = period_ms, None, 0, None

    def __enter__(self):
        import shutil
        import subprocess
        import tempfile

        import torch

        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self._log = tempfile.TemporaryFile(mode="w+")
            index = torch.cuda.current_device()
            self._process = subprocess.Popen(
                ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms)], stdout=self._log, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self._process is None:
            return False
        import torch

        torch.cuda.synchronize()
        self._process.terminate()
        self._process.wait(timeout=10)
        self._log.seek(0)
        values = [float(line) for line in self._log.read().split() if line.replace(".", "", 1).isdigit()]
        self._log.close()
        if values:
            self.share, self.samples = sum(values) / len(values) / 100, len(values)
        return False

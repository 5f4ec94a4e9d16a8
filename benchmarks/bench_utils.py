"""What every benchmark prints the same way: the machine, the library versions, and a mean with its range."""

import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import chatgpt_recipes.runtime.output  # noqa: F401  before any library: quiets log lines that do not apply
from chatgpt_recipes.runtime.errors import EXIT_ERROR, DataError, ModelLoadError, RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_module(name: str):
    """recipes/<name>.py imported as the module `name` (the recipes are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_checked(parser, positive: tuple[str, ...] = (), args: list[str] | None = None):
    """A benchmark's options as the recipes take theirs: a flag is never abbreviated (`--token 5` is an error, not
    --tokens), and each option of `positive` is > 0; argparse prints its `error:` line and exits 2."""
    parser.allow_abbrev = False
    parsed = parser.parse_args(args)
    for name in positive:
        value = getattr(parsed, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    return parsed


def run_benchmark(main) -> None:
    """A benchmark's entry point: an input error (a missing file, a wrong shape, sizes beyond the data, a model that
    is not there) ends on one `error:` line with exit status 2, as a recipe's does."""
    try:
        main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_ERROR)


def check_model(value: str, option: str = "--model") -> None:
    """A local model directory must hold a whole model; a path that does not exist is refused here rather than in a
    worker process. Hub ids and the offline names (smollm2-135m-instruct) pass."""
    path = Path(value).expanduser()
    if path.exists():
        from chatgpt_recipes.cli import check_model_option

        check_model_option(value, option, False, False)
    elif value.startswith(("/", "./", "../", "~")) or value.endswith("/") or value.count("/") > 1:
        raise ModelLoadError(f"{option} {value}: not found (a model directory, a hub id or an offline model name)")


def read_saved_run(path: str, keys: tuple[str, ...], what: str) -> dict:
    """A benchmark's saved JSON (--summarise): a missing file, text that is not JSON and JSON of another shape are
    errors that name the file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: not found" if not file.exists() else f"{path} is a directory, not a saved run")
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise DataError(f"{path} is not a saved run of {what}: no {missing} (found "
                        f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__})")
    return saved


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

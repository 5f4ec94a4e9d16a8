"""chatgpt_recipes/runtime/precision.py: the one precision decision (bf16 where native, fp16 on CUDA without bf16, fp32 elsewhere),
explicit settings winning with a warning, the CPU probe, and a recipe run with the probe forced to each CPU kind."""

import logging

import pytest
import torch
from conftest import REPO, sft_config

from chatgpt_recipes.modeling.loading import ModelArguments, quantization_config
from chatgpt_recipes.runtime import precision
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.precision import Capability, choose_precision, detect_capability, inference_dtype

CUDA_BF16 = Capability("cuda", native_bf16=True, fp16=True, evidence="A100")
CUDA_NO_BF16 = Capability("cuda", native_bf16=False, fp16=True, evidence="T4")
CPU_BF16 = Capability("cpu", native_bf16=True, fp16=False, evidence="avx512_bf16", bf16_speedup=2.4)
CPU_NO_BF16 = Capability("cpu", native_bf16=False, fp16=False, evidence="AVX2 only", bf16_speedup=1 / 80)
MPS_BF16 = Capability("mps", native_bf16=True, fp16=False, evidence="Apple MPS: bf16 (macOS 14+)")
MPS_OLD = Capability("mps", native_bf16=False, fp16=False, evidence="Apple MPS: no bf16 before macOS 14")


@pytest.mark.parametrize("capability, bf16, fp16, compute", [
    (CUDA_BF16, True, False, "bfloat16"),
    (CUDA_NO_BF16, False, True, "float16"),
    (CPU_BF16, True, False, "bfloat16"),
    (CPU_NO_BF16, False, False, "float32"),
    (MPS_BF16, True, False, "bfloat16"),
    (MPS_OLD, False, False, "float32"),
])
def test_auto_follows_the_hardware(capability, bf16, fp16, compute):
    chosen = choose_precision(capability)
    assert (chosen.bf16, chosen.fp16, chosen.compute_dtype) == (bf16, fp16, compute)
    assert chosen.weights_dtype(trains_all_weights=False) == compute  # frozen LoRA base in the compute dtype
    assert chosen.weights_dtype(trains_all_weights=True) == "float32"  # full fine-tuning keeps fp32 masters


def test_explicit_settings_win_and_emulated_bf16_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="chatgpt_recipes.runtime.precision"):
        chosen = choose_precision(CPU_NO_BF16, bf16=True)
    assert chosen.bf16 and not chosen.fp16
    assert "80x slower than fp32" in caplog.text  # the measured slowdown factor
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatgpt_recipes.runtime.precision"):
        assert choose_precision(CPU_BF16, bf16=True).bf16
    assert caplog.text == ""
    assert not choose_precision(CPU_BF16, bf16=False).bf16
    off = choose_precision(CUDA_BF16, bf16=False)  # bf16 turned off on a bf16 GPU: fp32, not fp16 behind the back
    assert (off.bf16, off.fp16) == (False, False)
    assert choose_precision(CUDA_NO_BF16, fp16=False).compute_dtype == "float32"
    assert choose_precision(CUDA_BF16, fp16=True).fp16
    with pytest.raises(ConfigError, match="both"):
        choose_precision(CPU_BF16, bf16=True, fp16=True)


def test_cpu_probe_does_not_believe_flags_that_lie(monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 0.02)
    detect_capability.cache_clear()
    try:
        capability = detect_capability(use_cpu=True)
        assert not capability.native_bf16 and "claims bf16" in capability.evidence and "50x slower" in capability.evidence
        monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 2.4)
        detect_capability.cache_clear()
        assert detect_capability(use_cpu=True).native_bf16
        monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
        monkeypatch.setattr(precision, "_onednn_bf16", lambda: False)
        detect_capability.cache_clear()
        assert not detect_capability(use_cpu=True).native_bf16  # fast or not, no flag: not trusted as native
    finally:
        detect_capability.cache_clear()


def test_measured_speedup_is_a_real_timing():
    speedup = precision.measure_bf16_speedup()
    assert 0 < speedup < 100


@pytest.fixture
def forced(monkeypatch):
    def force(native: bool):
        monkeypatch.setenv(precision.FORCE_ENV, "1" if native else "0")
        detect_capability.cache_clear()
        precision.announce.cache_clear()
    yield force
    detect_capability.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_yaml_auto_resolves_per_cpu_kind(forced, native, capsys):
    forced(native)
    config, model_args = sft_config([])
    assert (config.bf16, config.fp16) == (native, False)
    assert model_args.dtype == ("bfloat16" if native else "float32")
    assert capsys.readouterr().out.count("[precision]") == 1  # one line says what was chosen and why
    assert quantization_config(ModelArguments(load_in_4bit=True, dtype=model_args.dtype)).bnb_4bit_compute_dtype == (
        torch.bfloat16 if native else torch.float32)
    full_config, full_args = sft_config(["--use_peft", "false"])
    assert full_args.dtype == "float32"  # fully trained weights keep fp32 master copies
    assert inference_dtype("auto", use_cpu=True) == (torch.bfloat16 if native else torch.float32)


def test_explicit_flags_on_the_command_line_and_in_yaml_win(forced, tmp_path):
    forced(False)
    config, model_args = sft_config(["--bf16", "true"])
    assert config.bf16 and model_args.dtype == "bfloat16"  # frozen weights follow the chosen compute dtype
    config, model_args = sft_config(["--bf16", "true", "--dtype", "float32"])
    assert config.bf16 and model_args.dtype == "float32"
    yaml = tmp_path / "explicit.yaml"
    yaml.write_text((REPO / "recipes/configs/sft/smollm2_alpaca_lora.yaml").read_text()
                    .replace("bf16: auto", "bf16: true"))
    config, _ = sft_config(["--config", str(yaml)])
    assert config.bf16
    with pytest.raises(ConfigError, match="true, false or auto"):
        sft_config(["--bf16", "sometimes"])


@pytest.mark.parametrize("native", [False, True])
def test_sft_recipe_trains_in_the_forced_precision(forced, native, tiny_llama_dir, tmp_path, monkeypatch):
    """The SFT recipe itself, run with the probe forced: with no native bf16 every forward runs without autocast
    over float32 frozen weights; with native bf16 (the control) under bf16 autocast over bf16 frozen weights."""
    import sft_lora
    from trl.trainer import sft_trainer

    monkeypatch.setattr(sft_trainer, "_chunked_cross_entropy_loss", sft_trainer._chunked_cross_entropy_loss)
    forced(native)
    seen = {"autocast": set(), "frozen_dtypes": set()}

    def observe(module, args, output):
        if module.training and isinstance(module, torch.nn.Linear):
            seen["autocast"].add(torch.is_autocast_enabled("cpu"))
            if not module.weight.requires_grad:
                seen["frozen_dtypes"].add(module.weight.dtype)

    config, model_args = sft_config([
        "--model_name_or_path", tiny_llama_dir, "--max_train_samples", "16", "--eval_split_size", "4",
        "--max_length", "256", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--sample_max_new_tokens", "2", "--output_dir", str(tmp_path / "run")])
    handle = torch.nn.modules.module.register_module_forward_hook(observe)
    try:
        sft_lora.main(config, model_args)
    finally:
        handle.remove()
    assert seen["autocast"] == {native}
    assert seen["frozen_dtypes"] == {torch.bfloat16 if native else torch.float32}


def test_mps_is_detected_and_used(monkeypatch):
    """An Apple-silicon GPU is the run's device (bf16 on macOS 14+, else fp32), not the CPU path; use_cpu wins."""
    monkeypatch.setattr(precision, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (14, 0))
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    detect_capability.cache_clear()
    try:
        capability = detect_capability()
        assert capability.device == "mps" and capability.native_bf16
        assert choose_precision(capability).reason.startswith("bf16 autocast: mps")
        assert precision.inference_device().type == ("cuda" if torch.cuda.is_available() else "mps")
        assert precision.inference_device(use_cpu=True).type == "cpu"
        assert detect_capability(use_cpu=True).device == "cpu"
    finally:
        detect_capability.cache_clear()


def test_training_weights_stay_on_the_cpu_without_a_gpu():
    from chatgpt_recipes.modeling.loading import training_device_map

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: tests/test_gpu.py checks the GPU placement")
    assert training_device_map(quantized=False) is None and training_device_map(quantized=True) is None

"""chatgpt_recipes.modeling.kernels: the packed attention and the fused loss give what the code they replace gives."""

import types

import pytest
import torch
import trl.trainer.sft_trainer as trl_sft
from conftest import REPO, tiny_llama

from chatgpt_recipes.modeling import kernels
from chatgpt_recipes.runtime import compat

STOCK_TRL_LOSS = trl_sft._chunked_cross_entropy_loss


def assert_stock_trl_loss():
    """TRL's own loss is installed: nothing earlier in this process left the fused one behind."""
    loss = trl_sft._chunked_cross_entropy_loss
    assert loss is STOCK_TRL_LOSS and isinstance(loss, types.FunctionType) and loss.__module__ == trl_sft.__name__


@pytest.fixture
def count_fused_loss(monkeypatch):
    """Counts the calls of the fused loss that enable_fast_training installs (it looks it up when called)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    fused = kernels.fused_linear_cross_entropy
    monkeypatch.setattr(kernels, "fused_linear_cross_entropy", counted)
    return calls


def test_packed_segment_bounds():
    assert kernels.packed_segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [0, 3, 5, 6]
    assert kernels.packed_segment_bounds(torch.tensor([[0, 1, 2, 3]])) is None  # one example: plain causal sdpa
    assert kernels.packed_segment_bounds(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # not one packed row


def test_packed_attention_matches_masked_sdpa():
    """Three examples packed in one row: per-example causal SDPA equals transformers' block-diagonal-mask sdpa,
    and each example alone; padded batches (the fallback) equal plain sdpa."""
    lengths = [5, 9, 3]
    ids = torch.randint(0, 300, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    reference, packed = tiny_llama("sdpa"), tiny_llama(kernels.PACKED_SDPA)
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = packed(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = reference(input_ids=ids[:, 5:14]).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, 5:14], alone, atol=1e-5, rtol=1e-4)

        padded = torch.randint(0, 300, (2, 7))
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        torch.testing.assert_close(packed(input_ids=padded, attention_mask=mask).logits,
                                   reference(input_ids=padded, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,autocast,weight_trains", [(torch.float32, False, False), (torch.float32, True, False),
                                                          (torch.bfloat16, False, True)])
def test_fused_loss_matches_trl_chunked_loss(dtype, autocast, weight_trains):
    """Same loss, accuracy count, entropy, and gradients (hidden states and a trained head) as TRL's chunked_nll,
    over more tokens than one chunk, with masked tokens inside and between examples."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 700, 32, dtype=dtype, requires_grad=True)
    weight = (0.2 * torch.randn(500, 32)).to(dtype).requires_grad_(weight_trains)
    labels = torch.randint(0, 500, (2, 700))
    labels[:, :50] = -100
    labels[1, 300:420] = -100
    results = []
    assert_stock_trl_loss()
    for loss_function in (kernels.fused_linear_cross_entropy, trl_sft._chunked_cross_entropy_loss):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, correct, entropy, valid = loss_function(hidden, weight, 256, labels=labels, num_items_in_batch=1000)
        loss.backward()
        results.append((loss, correct, entropy, valid, hidden.grad, weight.grad))
    (loss, correct, entropy, valid, grad, weight_grad), reference = results
    precise = dtype == torch.float32 and not autocast
    tolerance = dict(atol=1e-6, rtol=1e-5) if precise else dict(atol=2e-3, rtol=2e-2)
    assert int(valid) == int(reference[3]) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, reference[0], **tolerance)
    assert abs(int(correct) - int(reference[1])) <= (0 if precise else 2)
    # TRL sums the entropy in bf16 under autocast (6600.0 vs 6608.1 here); the fused loss sums in fp32
    torch.testing.assert_close(entropy, reference[2].float(), atol=0, rtol=1e-5 if precise else 5e-3)
    torch.testing.assert_close(grad.float(), reference[4].float(), atol=1e-5 if precise else 2e-4, rtol=2e-2)
    if weight_trains:
        torch.testing.assert_close(weight_grad.float(), reference[5].float(), atol=1e-4, rtol=5e-2)


def test_enable_fast_training_in_sft_trainer(tmp_path, count_fused_loss, smollm2_dir):
    """Through SFTTrainer with packing: the fast model uses packed attention and the fused loss, and its loss on a
    packed batch equals that of TRL's stock path; the fused loss is installed only inside that trainer's
    compute_loss."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)  # only its pad token is used; ids stay below 300

    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 300, (n,)).tolist()} for n in (20, 33, 12, 40, 7, 25)]
    for row in rows:
        row["labels"] = [-100] * 4 + row["input_ids"][4:]
    config = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=64, per_device_train_batch_size=2,
                       use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False)
    losses = []
    for fast in (False, True):
        model = tiny_llama("sdpa").train()
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        if fast:
            kernels.enable_fast_training(trainer)
            assert model.config._attn_implementation == kernels.PACKED_SDPA
        assert_stock_trl_loss()
        batch = next(iter(trainer.get_train_dataloader()))
        assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # padding-free packed row
        losses.append(trainer.compute_loss(trainer.model, batch))
        assert len(count_fused_loss) == fast
        assert_stock_trl_loss()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_sft_recipe_in_process_leaves_trl_stock(tiny_llama_dir, tmp_path, count_fused_loss):
    """sft_lora.main trains and evaluates with the fused loss, and afterwards TRL's own loss is back, so a later
    "stock TRL" comparison in the same process really is stock."""
    from sft_lora import SFTRecipeConfig, main

    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    args = ["--model_name_or_path", tiny_llama_dir, "--dataset_name", str(REPO / "data" / "alpaca_en_demo.json"),
            "--max_train_samples", "4", "--eval_split_size", "2", "--eval_strategy", "steps", "--eval_steps", "1",
            "--max_length", "256", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--save_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "1",
            "--output_dir", str(tmp_path / "sft")]
    config, model_args = parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args)
    assert_stock_trl_loss()
    main(config, model_args)
    assert len(count_fused_loss) >= 2  # a training step and an evaluation
    assert_stock_trl_loss()


def test_fast_dropout_is_dropout():
    """FastDropout drops with probability p (each of the four 16-bit lanes of a 64-bit draw alike), scales the kept
    values by 1/(1-p), repeats under the same seed, passes gradients through the same mask, and is the identity in
    eval mode."""
    dropout = kernels.FastDropout(0.1).train()
    torch.manual_seed(0)
    out = dropout(torch.ones(1000, 1000))
    dropped = (out == 0).float()
    assert dropped.mean().item() == pytest.approx(0.1, abs=2e-3)
    assert torch.allclose(dropped.flatten().view(-1, 4).mean(0), torch.full((4,), 0.1), atol=3e-3)
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(1000, 1000)), out)
    x = torch.randn(30, 40, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.9)
    assert torch.equal(dropout.eval()(x), x)


def test_fast_lora_dropout_swaps_only_lora_dropouts():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj", "down_proj"]))
    assert kernels.use_fast_lora_dropout(model) == 4  # 2 layers x 2 targets
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(isinstance(m, kernels.FastDropout) and m.p == 0.05 for m in dropouts)
    assert kernels.use_fast_lora_dropout(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.0))) == 0


def test_lora_folded_for_sampling_gives_the_adapter_model_and_restores_the_base():
    """Inside the context every LoRA linear runs its base layer alone, with the update folded into a temporary
    weight: same logits as the adapter path; afterwards the original base weights are back, bit for bit."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    bases = {id(m): (m.base_layer.weight, m.base_layer.weight.data.clone()) for m in layers}
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with compat.lora_folded_for_sampling(model):
            assert all(m.merged for m in layers)
            folded = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
    assert not (reference - expected).abs().max() < 1e-3  # the adapter does change the logits
    for m in layers:
        weight, values = bases[id(m)]
        assert not m.merged and m.base_layer.weight is weight and torch.equal(weight.data, values)


def test_gpu_check_dry_run_lists_its_steps_and_limits():
    """scripts/gpu_check.sh --dry-run needs no GPU: every step with its time limit, in priority order, and the
    global deadline of 8 minutes."""
    import subprocess

    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    steps = [row[2].strip() for row in rows]
    assert steps[:3] == ["decisions", "sft_lora_default", "gpu_tests"]
    assert {"qlora_sft", "sft_full_zero2", "sft_full_zero3", "reward_model_zero2", "reward_model_zero3", "ppo_zero2",
            "ppo_zero3", "sft_throughput_1.7b", "ppo_throughput", "alpaca_epoch_135m"} <= set(steps)
    assert all(0 < int(row[3]) <= 300 for row in rows)
    assert "--rows 52002 --epoch" in result.stdout and "global deadline: 480 s" in result.stdout
    assert not (REPO / "nonexistent").exists()


def test_packed_attention_choice_and_batch_bounds():
    """The CPU keeps per-example SDPA (benchmarks/cpu_packed_attention.txt); CUDA in bf16/fp16 gets a varlen kernel,
    fp32 CUDA the per-example path. The varlen bounds of a packed row: cumulative starts, longest example."""
    assert kernels.packed_attention_choice("cpu", False)[0] == kernels.PACKED_SDPA
    assert kernels.packed_attention_choice("cpu", True)[0] == kernels.PACKED_SDPA
    assert kernels.packed_attention_choice("cuda", False)[0] == kernels.PACKED_SDPA
    assert kernels.packed_attention_choice("cuda", True)[0] in (kernels.PACKED_VARLEN, "flash_attention_2",
                                                              "flash_attention_3")
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu_seqlens, longest = kernels.packed_cu_seqlens(positions)
    assert cu_seqlens.tolist() == [0, 3, 5, 9] and cu_seqlens.dtype == torch.int32 and longest == 4
    assert kernels.packed_cu_seqlens(positions)[0] is cu_seqlens  # the same batch: computed once, reused by each layer


def test_varlen_attention_falls_back_to_per_example_sdpa_off_cuda():
    """Registered as varlen_packed, on a CPU (no varlen kernel here) the model computes what per-example SDPA
    computes, so a CUDA-chosen name never breaks a CPU run."""
    kernels.register_varlen_attention()
    lengths = [6, 4, 9]
    ids = torch.randint(0, 300, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        expected = tiny_llama(kernels.PACKED_SDPA)(input_ids=ids, position_ids=positions).logits
        got = tiny_llama(kernels.PACKED_VARLEN)(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected)


def test_gpu_training_defaults_change_nothing_off_cuda_and_keep_the_examples_seen_on_cuda(capsys):
    from types import SimpleNamespace

    yaml = dict(use_liger_kernel=False, loss_type="chunked_nll", gpu_tokens_per_step=8192, max_length=512,
                per_device_train_batch_size=4, gradient_accumulation_steps=8, max_steps=100, num_train_epochs=3.0,
                warmup_steps=10, eval_steps=20, save_steps=0.5, logging_steps=1)
    config = SimpleNamespace(**yaml)
    kernels.gpu_training_defaults(config, "cpu")
    assert config == SimpleNamespace(**yaml) and capsys.readouterr().out == ""
    kernels.gpu_training_defaults(config, "cuda")  # the CUDA-only arithmetic, run on a CPU
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (16, 2)  # 8192 / 512 tokens
    assert config.max_steps == 100  # 16 x 2 = 4 x 8 sequences per optimizer step: the same examples seen
    assert config.use_liger_kernel == kernels.liger_available()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("[batch] cuda: per_device_train_batch_size 4 -> 16, gradient_accumulation_steps 8 -> 2")
    assert "32 sequences per optimizer step per process (the YAML's 32), max_steps 100: the same examples" in printed

    # the SFT default: 4 sequences, no accumulation to trade: a 16-sequence step, a quarter of the steps
    config = SimpleNamespace(**{**yaml, "gradient_accumulation_steps": 1})
    kernels.gpu_training_defaults(config, "cuda")
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (16, 1)
    assert (config.max_steps, config.warmup_steps, config.eval_steps, config.save_steps, config.logging_steps) == (
        25, 3, 5, 0.5, 1)  # 25 x 16 = 100 x 4 sequences; a share (0.5) and 1 stay
    assert config.max_steps * 16 == yaml["max_steps"] * yaml["per_device_train_batch_size"]
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "16 sequences per optimizer step per process (the YAML's 4), max_steps 100 -> 25, warmup_steps 10 -> 3, " \
           "eval_steps 20 -> 5: the same examples seen" in printed


@pytest.mark.parametrize("batch,accumulation,tokens,max_length,expected", [
    (4, 8, 8192, 512, (16, 2)),
    (4, 1, 8192, 512, (16, 1)),    # nothing to trade: the batch grows alone (the run is shortened to match)
    (2, 6, 8192, 1024, (6, 2)),    # 8 would not divide the 12 sequences per step: the largest divisor under it
    (8, 4, 2048, 512, (8, 4)),     # the YAML's batch already holds the tokens: unchanged, never lowered
    (1, 7, 8192, 512, (16, 1)),
])
def test_the_gpu_batch_trades_accumulation_first(batch, accumulation, tokens, max_length, expected):
    assert kernels.gpu_batch(batch, accumulation, tokens, max_length) == expected


def test_the_varlen_call_fits_the_varlen_attn_of_torch_2_11_and_2_13():
    """Our call binds to both signatures, read from the wheels' torch/nn/attention/varlen.py (2.13: the installed
    one, inspected; 2.11: its signature as published, no enable_gqa); grouped key/value heads are repeated where
    enable_gqa is missing. The kernel itself is CUDA-only (tests/test_gpu.py)."""
    import inspect

    calls = []

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):
        calls.append(("2.11", key.shape, window_size))
        return query

    installed = _installed_varlen()

    def torch_2_13(*args, **kwargs):
        inspect.signature(installed).bind(*args, **kwargs)  # raises TypeError on an option it does not take
        calls.append(("2.13", args[1].shape, kwargs["window_size"], kwargs.get("enable_gqa")))
        return args[0]

    torch_2_13.__signature__ = inspect.signature(installed)
    q, k = torch.randn(10, 4, 8), torch.randn(10, 2, 8)  # 4 query heads, 2 key/value heads
    bounds = torch.tensor([0, 6, 10], dtype=torch.int32)
    for varlen in (torch_2_11, torch_2_13):
        kernels.varlen_keywords.cache_clear()
        kernels.varlen_call(varlen, q, k, k, bounds, 6, 0.35)
    assert calls == [("2.11", (10, 4, 8), (-1, 0)), ("2.13", (10, 2, 8), (-1, 0), True)]

    def without_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
        return query

    assert kernels.varlen_keywords(without_window) is None  # unknown signature: the SDPA path is taken


def _installed_varlen():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn

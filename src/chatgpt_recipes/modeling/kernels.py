"""Training speed: what the libraries leave on the table for packed (padding-free), bf16-autocast LoRA SFT.

- `sdpa_packed` attention. Padding-free packing flattens a batch into one row whose `position_ids` restart at every
  example. With `sdpa`, transformers then builds a (tokens x tokens) block-diagonal mask and SDPA computes every
  block, masked or not: for 4 x 512 tokens that is ~20x the attention FLOPs of the examples themselves, and a
  mask-taking kernel. `sdpa_packed` runs causal SDPA on each example instead (exact FLOPs, no mask); any other
  input (padded batches, generation with a cache) goes to transformers' `sdpa` unchanged.
- A fused linear + cross-entropy loss in place of TRL's `chunked_nll`. TRL already skips the LM head on masked
  tokens, but it runs the head on each 256-token chunk under activation checkpointing (so the head runs twice),
  upcasts the head's weight to fp32 per chunk (a copy of the whole vocabulary matrix when the model is bf16), and
  then computes the loss, accuracy and entropy in extra passes over the logits. The fused loss computes the loss,
  its gradient and the same metrics in one forward pass per chunk, and backward only rescales the stored gradient.
- Under autocast, LoRA inputs are not cast to the adapters' fp32 (PEFT's default) only for autocast to cast them back.
- LoRA dropout on a CPU draws its keep mask from 16 random bits per element (`FastDropout`): torch's CPU
  `bernoulli_` draws one generator call per element, and on the AMD EPYC we measured one [2048 x 576] mask cost as
  much as a [2048 x 576] x [576 x 1536] bf16 matmul: a fifth of the step with dropout on all 7 projections.

On a CUDA GPU the per-example SDPA would sync the host in every layer (the bounds) and launch one kernel per
example, so packed attention there is a varlen kernel, chosen by `packed_attention_choice` and printed once as the
`[attention]` line: FlashAttention-3/2 when installed (transformers' own `flash_attention_3`/`_2`, padding-free by
position_ids), else PyTorch's own `varlen_attn` (`varlen_packed`: the example bounds computed once per batch and
reused by every layer). The CPU keeps `sdpa_packed`: there a host sync costs nothing and per-example SDPA is the
fastest kernel measured (docs/speed.md). On CUDA `gpu_training_defaults` also turns on Liger kernels when
liger-kernel is installed (requirements-gpu.txt) and sizes the batch by tokens per step; `[batch]` line.
FastDropout and the LoRA dropout swap act on a CPU only.

`enable_fast_training(trainer)` turns them on for an SFT run; the recipe calls it once the trainer is built.
PPO (chatgpt_recipes/rl/ppo_trainer.py) uses the LoRA-input switch too, and samples through `lora_folded_for_sampling`.
What these touch inside the libraries is in chatgpt_recipes/runtime/compat.py, checked against the versions it was written for.
"""

import functools
import importlib.util
import inspect
import math
import os
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting
from transformers import TrainerCallback

from chatgpt_recipes.runtime import compat
from chatgpt_recipes.runtime.output import say

PACKED_SDPA = "sdpa_packed"
PACKED_VARLEN = "varlen_packed"
_INT16_MIN = -(2**15)
LOSS_CHUNK_TOKENS = 512  # loss memory: 2 x chunk x vocab fp32 (200 MB for a 49K vocabulary)


def packed_segment_bounds(position_ids: torch.Tensor | None) -> list[int] | None:
    """Start offsets (plus the end) of the examples in a single packed row, where position_ids restart; None when
    the input is not one packed row of several examples."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    positions = position_ids[0]
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    return [0, *starts.tolist(), positions.numel()]


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, tokens, dim] -> [batch, kv_heads * groups, tokens, dim], each head repeated in place."""
    if groups == 1:
        return states
    batch, heads, tokens, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, tokens, dim).reshape(batch, heads * groups, tokens, dim)


def packed_sdpa_attention(sdpa, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal SDPA per packed example (query/key/value: [1, heads, tokens, head_dim]); else `sdpa`, transformers'
    sdpa attention."""
    bounds = packed_segment_bounds(kwargs.get("position_ids"))
    if bounds is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:  # not packed, or cached decoding
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split (not slicing): its backward is one concatenation, a slice's is a zero-filled full-size tensor per example
    parts = zip(query.split(lengths, dim=2), _repeat_kv(key, groups).split(lengths, dim=2),
                _repeat_kv(value, groups).split(lengths, dim=2))
    outputs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
               for q, k, v in parts]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    """Make `attn_implementation="sdpa_packed"` available (with sdpa's mask, used only when the input is not
    packed, the sdpa fallback). A name of its own: registering changes no other attention."""
    compat.register_sdpa_variant(PACKED_SDPA, packed_sdpa_attention)


def _torch_varlen_attention():
    """PyTorch's own varlen (FlashAttention) kernel, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA,
    bf16/fp16), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def varlen_keywords(varlen) -> frozenset[str] | None:
    """The keyword options of this torch's `varlen_attn` that causal packed attention uses: `window_size` (causal as
    (-1, 0)) in torch 2.11 and 2.13, `enable_gqa` (fewer key/value heads than query heads) from 2.13 on (torch
    2.11's varlen_attn takes the same number of heads; read from both wheels' torch/nn/attention/varlen.py). None
    when it has no window_size: a signature these recipes were not written for, so the SDPA path is used."""
    parameters = inspect.signature(varlen).parameters
    if "window_size" not in parameters:
        return None
    return frozenset(name for name in ("window_size", "enable_gqa") if name in parameters)


def varlen_call(varlen, q, k, v, cu_seqlens, max_length, scale):
    """Causal varlen attention of [tokens, heads, dim] q, k, v with the options this torch's varlen_attn takes;
    without enable_gqa the key/value heads are repeated to the query heads (what enable_gqa does inside)."""
    grouped = k.shape[1] != q.shape[1]
    options = {"scale": scale, "window_size": (-1, 0)}
    if grouped and "enable_gqa" in varlen_keywords(varlen):
        options["enable_gqa"] = True
    elif grouped:
        k, v = (states.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for states in (k, v))
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **options)


class _BatchBounds:
    """The cumulative example bounds (int32, on the device) and the longest example of the packed batch whose
    position_ids tensor is `position_ids`: computed at the first attention layer, reused by the others (and by a
    gradient-checkpointing recomputation), so a batch costs one host sync, not one per layer."""

    position_ids = None
    cu_seqlens = None
    max_length = 0


def packed_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens [examples + 1] int32 on position_ids' device, longest example) of a packed [1, tokens] row."""
    if _BatchBounds.position_ids is position_ids:
        return _BatchBounds.cu_seqlens, _BatchBounds.max_length
    positions = position_ids[0]
    restarts = torch.ones_like(positions, dtype=torch.bool)
    restarts[1:] = positions[1:] != positions[:-1] + 1
    starts = torch.nonzero(restarts).flatten()
    cu_seqlens = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # the batch's one host sync
    _BatchBounds.position_ids, _BatchBounds.cu_seqlens, _BatchBounds.max_length = position_ids, cu_seqlens, max_length
    return cu_seqlens, max_length


def varlen_packed_attention(sdpa, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention within each packed example in one varlen kernel call (PyTorch's varlen_attn); inputs it
    cannot take (not one packed row, cached decoding, attention dropout, fp32) go to `packed_sdpa_attention`."""
    position_ids = kwargs.get("position_ids")
    varlen = _torch_varlen_attention()
    if (varlen is None or varlen_keywords(varlen) is None or position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1
            or query.shape[0] != 1 or key.shape[2] != query.shape[2] or dropout > 0
            or query.dtype not in (torch.float16, torch.bfloat16) or query.device.type != "cuda"):
        return packed_sdpa_attention(sdpa, module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
    cu_seqlens, max_length = packed_cu_seqlens(position_ids)
    # [1, heads, tokens, dim] -> [tokens, heads, dim]
    q, k, v = (states[0].transpose(0, 1) for states in (query, key, value))
    output = varlen_call(varlen, q, k, v, cu_seqlens, max_length, scaling)
    return output.unsqueeze(0), None  # [1, tokens, heads, dim], as transformers' attentions return


def register_varlen_attention() -> None:
    """Make `attn_implementation="varlen_packed"` available (sdpa's mask, for the sdpa fallback)."""
    compat.register_sdpa_variant(PACKED_VARLEN, varlen_packed_attention)


def packed_attention_choice(device_type: str, half_precision: bool) -> tuple[str, str]:
    """(attn_implementation, why) for packed, padding-free training on `device_type` (`half_precision`: bf16 or
    fp16 compute, which the varlen kernels need)."""
    if device_type == "cuda" and half_precision:
        if importlib.util.find_spec("flash_attn_interface") is not None:
            return "flash_attention_3", "FlashAttention-3 is installed: transformers' flash_attention_3, padding-free"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2", "FlashAttention-2 is installed: transformers' flash_attention_2, padding-free"
        varlen = _torch_varlen_attention()
        if varlen is not None and varlen_keywords(varlen) is not None:
            return PACKED_VARLEN, ("PyTorch's varlen_attn (no flash-attn installed): one kernel per layer, example "
                                   "bounds computed once per batch")
    if device_type == "cuda":
        return PACKED_SDPA, "causal SDPA per packed example: fp32 on CUDA (the varlen kernels need bf16/fp16)"
    return PACKED_SDPA, f"causal SDPA per packed example on {device_type} (the fastest measured on a CPU)"


@functools.lru_cache(maxsize=None)
def announce_attention(line: str) -> None:
    """Print the attention line once per process (main process only), as the precision line is."""
    if int(os.environ.get("RANK", "0")) == 0:
        say(f"[attention] {line}", flush=True)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def gpu_training_defaults(config, device_type: str) -> None:
    """SFT settings for a CUDA GPU, set on `config` before the trainer is built and printed: Liger kernels (fused
    linear cross-entropy, RMSNorm, RoPE, SwiGLU through TRL/transformers' `use_liger_kernel`) when liger-kernel is
    installed, and up to `gpu_tokens_per_step` tokens per device step (`gpu_batch`), the YAML's meaning kept: the
    same examples seen. Nothing changes on other devices."""
    if device_type != "cuda":
        return
    if liger_available() and not config.use_liger_kernel:
        config.use_liger_kernel = True
        if config.loss_type == "chunked_nll":  # TRL refuses chunked_nll with Liger; Liger's fused loss replaces it
            config.loss_type = "nll"
        say("[kernels] liger-kernel installed: Liger's fused linear cross-entropy, RMSNorm, RoPE and SwiGLU",
            flush=True)
    tokens = getattr(config, "gpu_tokens_per_step", 0)
    if not (tokens and config.max_length):
        return
    before = (config.per_device_train_batch_size, config.gradient_accumulation_steps)
    batch, accumulation = gpu_batch(*before, tokens, config.max_length)
    if (batch, accumulation) == before:
        return
    config.per_device_train_batch_size, config.gradient_accumulation_steps = batch, accumulation
    ratio = before[0] * before[1] / (batch * accumulation)  # optimizer steps per step of the YAML, <= 1
    scaled = []
    if config.max_steps > 0 and ratio != 1:
        for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "logging_steps"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:  # steps (a float < 1: a share)
                setattr(config, name, max(1, math.ceil(value * ratio)))
                scaled.append(f"{name} {value} -> {getattr(config, name)}")
    length = ", ".join(scaled) if scaled else (f"max_steps {config.max_steps}" if config.max_steps > 0 else
                                                f"num_train_epochs {config.num_train_epochs}")
    say(f"[batch] cuda: per_device_train_batch_size {before[0]} -> {batch}, gradient_accumulation_steps {before[1]} "
        f"-> {accumulation} ({batch * config.max_length} tokens per device step, gpu_tokens_per_step={tokens}; 0 "
        f"keeps the YAML's): {batch * accumulation} sequences per optimizer step per process (the YAML's "
        f"{before[0] * before[1]}), {length}: the same examples seen", flush=True)


def gpu_batch(batch: int, accumulation: int, tokens_per_step: int, max_length: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) with about `tokens_per_step` tokens per device step. A larger
    device batch first takes the place of accumulation (the sequences per optimizer step unchanged: it grows only to
    a divisor of batch x accumulation); past that, it grows alone and gpu_training_defaults shortens the run to the
    same examples seen. Never below the YAML's batch."""
    per_optimizer_step = batch * accumulation
    target = max(batch, tokens_per_step // max_length)
    if target >= per_optimizer_step:
        return target, 1
    accumulation = next(steps for steps in range(1, per_optimizer_step + 1)
                        if per_optimizer_step % steps == 0 and per_optimizer_step // steps <= target)
    return per_optimizer_step // accumulation, accumulation


class FastDropout(torch.nn.Dropout):
    """nn.Dropout (inverted: kept values scaled by 1/(1-p)) whose keep mask on a CPU comes from 16 random bits per
    element, four per 64-bit draw of torch's generator (so seeded runs repeat); p is rounded to a multiple of
    1/65536. On other devices it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1).view(torch.int16)
        keep = bits[:n].view(x.shape) >= _INT16_MIN + round(self.p * 2**16)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


def use_fast_lora_dropout(model) -> int:
    """Swap every LoRA dropout (nn.Dropout with p > 0) of a PEFT model for FastDropout; returns how many."""
    return compat.replace_lora_dropouts(
        model, lambda dropout: FastDropout(dropout.p) if type(dropout) is torch.nn.Dropout and dropout.p > 0 else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token NLLs of `hidden @ weight.T` against `labels` (all valid), with the gradient computed in the
    forward pass chunk by chunk, so the [tokens, vocab] logits never exist all at once and never twice."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            head = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            loss = hidden.new_zeros((), dtype=torch.float32)
            correct, entropy = loss.clone(), loss.clone()
            for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
                h = hidden[start:start + LOSS_CHUNK_TOKENS].to(compute_dtype)
                target = labels[start:start + LOSS_CHUNK_TOKENS]
                logits = (h @ head.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                correct += (logits.argmax(dim=-1) == target).sum()
                probs = torch.exp(logits - lse[:, None])
                entropy += (lse - (probs[:, None, :] @ logits[:, :, None]).flatten()).sum()
                del logits
                probs[torch.arange(target.numel(), device=target.device), target] -= 1.0  # d(NLL)/d(logits)
                probs = probs.to(compute_dtype)
                grad_hidden[start:start + LOSS_CHUNK_TOKENS] = probs @ head
                if grad_weight is not None:
                    grad_weight += (probs.t() @ h).float()
        ctx.mark_non_differentiable(correct, entropy)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss, correct, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None


def fused_linear_cross_entropy(hidden_states, lm_head_weight, chunk_size=None, labels=None, shift_labels=None,
                               num_items_in_batch=None, logit_scale=1.0, final_logit_softcapping=None,
                               lm_head_bias=None, stock=None):
    """Drop-in for `trl.trainer.sft_trainer._chunked_cross_entropy_loss` (same arguments and results: loss, number
    of correct tokens, entropy sum, number of valid tokens). `chunk_size` is ignored (LOSS_CHUNK_TOKENS is used).
    Scaled, soft-capped or biased heads go to `stock`, TRL's function (compat.trl_sft_loss passes it)."""
    if logit_scale != 1.0 or final_logit_softcapping is not None or lm_head_bias is not None:
        if stock is None:
            raise ValueError("fused_linear_cross_entropy: a scaled, soft-capped or biased head needs `stock`")
        return stock(hidden_states, lm_head_weight, chunk_size, labels, shift_labels, num_items_in_batch,
                     logit_scale, final_logit_softcapping, lm_head_bias)
    if shift_labels is not None:
        hidden, labels = hidden_states.reshape(-1, hidden_states.shape[-1]), shift_labels.reshape(-1)
    else:
        hidden = hidden_states[..., :-1, :].reshape(-1, hidden_states.shape[-1])
        labels = labels[..., 1:].reshape(-1)
    valid = torch.nonzero(labels != -100).flatten()
    compute_dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                     else hidden.dtype)
    loss, correct, entropy = _FusedLinearCrossEntropy.apply(
        hidden.index_select(0, valid), lm_head_weight, labels.index_select(0, valid), compute_dtype)
    n_valid = torch.tensor(valid.numel(), device=hidden.device)
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss, correct, entropy, n_valid


def enable_fast_training(trainer) -> None:
    """Speed-ups for an SFTTrainer built with TRL's defaults: packed attention when it packs without padding (and
    the model uses sdpa; the kernel by packed_attention_choice, printed), the fused loss in place of TRL's
    chunked_nll during this trainer's compute_loss only, under autocast LoRA inputs left in the compute dtype (see
    below), and on a CPU FastDropout."""
    args, model = trainer.args, trainer.model
    device_type = trainer.accelerator.device.type
    packs = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if packs and compat.attn_implementation(model) == "sdpa":
        attention, why = packed_attention_choice(device_type, bool(args.bf16 or args.fp16))
        if attention == PACKED_SDPA:
            register_packed_attention()
        elif attention == PACKED_VARLEN:
            register_varlen_attention()
        model.set_attn_implementation(attention)
        announce_attention(f"{attention}: {why}")
    if args.loss_type == "chunked_nll":
        compat.use_trl_sft_loss(trainer, fused_linear_cross_entropy)
    if args.bf16 or args.fp16:
        trainer.add_callback(LoraInputsInComputeDtype(model))
    if device_type == "cpu":  # FastDropout is a CPU kernel; elsewhere it would be nn.Dropout anyway
        use_fast_lora_dropout(model)


class LoraInputsInComputeDtype(TrainerCallback):
    """During training (all under autocast), PEFT's cast of each LoRA input to the adapter's fp32, which autocast
    then casts back to bf16 for the matmul, is switched off: two copies of every activation per adapted layer.
    It is switched back on after training, for generation without autocast."""

    def __init__(self, model):
        self.model, self.casts_off = model, ExitStack()

    def on_train_begin(self, args, state, control, **kwargs):
        self.casts_off.close()  # a train() that raised never reached on_train_end
        self.casts_off.enter_context(disable_input_dtype_casting(self.model))  # PEFT's public switch

    def on_train_end(self, args, state, control, **kwargs):
        self.casts_off.close()

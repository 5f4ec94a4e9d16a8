"""Every place the recipes touch a library's internals: a private function replaced, a private attribute read or
set, a class imported from a module the library does not export, an assumption about what a library does inside.

Each touch checks, when it is applied (a patch when it is made; a subclass of a library class when the module that
defines it is imported, as ppo_trainer.py's PPOTrainer is, since the class is built on the library's then), that the
installed library is in the range it was written and tested for (the versions below, as pinned in requirements.txt,
up to the next minor release) and that the attributes it relies on exist. A mismatch raises LibraryMismatchError naming the library, its version and the pin;
nothing falls back silently to something that would change results. Patches are scoped (a context manager, or
local to one trainer or model) and undone afterwards.
"""

import functools
import importlib
import inspect
from contextlib import contextmanager

import torch
from packaging.version import Version

from chatgpt_recipes.runtime.errors import LibraryMismatchError

# The versions every touch below was written and tested against (requirements.txt)
TRANSFORMERS = "5.23.0"
TRL = "1.12.0"
PEFT = "0.21.2"
BITSANDBYTES = "0.50.2"


def installed(library: str) -> str:
    return importlib.import_module(library).__version__


def check_version(library: str, tested: str, touch: str) -> None:
    """Refuse `library` outside [tested, next minor release): `touch` (what relies on it) was written for it."""
    version, low = Version(installed(library)), Version(tested)
    if not low <= version < Version(f"{low.major}.{low.minor + 1}"):
        raise LibraryMismatchError(
            f"{touch} relies on internals of {library} {low.major}.{low.minor}.x (tested with {tested}), but "
            f"{library} {version} is installed: pin {library}=={tested} (requirements.txt), or port "
            "src/chatgpt_recipes/runtime/compat.py to the new version")


def require(owner, names: list[str], library: str, tested: str, touch: str) -> None:
    """Refuse when `owner` (a module, class or object) lacks one of the attributes `touch` reads or sets."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        what = getattr(owner, "__name__", type(owner).__name__)
        raise LibraryMismatchError(
            f"{touch}: {library} {installed(library)}'s {what} has no {', '.join(missing)}; it was written for "
            f"{library} {tested}: pin {library}=={tested} (requirements.txt), or port src/chatgpt_recipes/runtime/compat.py")


# --- TRL: the SFT loss (chatgpt_recipes/modeling/kernels.py's fused loss) -------------------------------------------------------------

_TRL_LOSS = "the fused SFT loss (replaces trl.trainer.sft_trainer._chunked_cross_entropy_loss)"
_TRL_LOSS_PARAMETERS = ["hidden_states", "lm_head_weight", "chunk_size", "labels", "shift_labels",
                        "num_items_in_batch", "logit_scale", "final_logit_softcapping", "lm_head_bias"]


def _trl_sft_module():
    from trl.trainer import sft_trainer

    check_version("trl", TRL, _TRL_LOSS)
    require(sft_trainer, ["_chunked_cross_entropy_loss", "_patch_chunked_ce_lm_head"], "trl", TRL, _TRL_LOSS)
    parameters = list(inspect.signature(sft_trainer._chunked_cross_entropy_loss).parameters)
    if parameters != _TRL_LOSS_PARAMETERS:
        raise LibraryMismatchError(
            f"{_TRL_LOSS}: trl {installed('trl')} calls it with ({', '.join(parameters)}), not "
            f"({', '.join(_TRL_LOSS_PARAMETERS)}): pin trl=={TRL} (requirements.txt)")
    return sft_trainer


@contextmanager
def trl_sft_loss(loss):
    """Inside, TRL's `chunked_nll` forward (sft_trainer._patch_chunked_ce_lm_head, which looks
    `_chunked_cross_entropy_loss` up by name at every call) calls `loss` with TRL's arguments plus `stock=` TRL's
    own function; afterwards TRL's function is back."""
    module = _trl_sft_module()
    stock = module._chunked_cross_entropy_loss
    module._chunked_cross_entropy_loss = functools.partial(loss, stock=stock)
    try:
        yield
    finally:
        module._chunked_cross_entropy_loss = stock


def use_trl_sft_loss(trainer, loss) -> None:
    """Trainer-local: every compute_loss of this SFTTrainer (training and evaluation) runs inside trl_sft_loss(loss);
    other trainers, and everything outside compute_loss, see TRL's stock loss."""
    _trl_sft_module()  # refuse now, not at the first step
    compute_loss = trainer.compute_loss

    def compute_loss_with(*args, **kwargs):
        with trl_sft_loss(loss):
            return compute_loss(*args, **kwargs)

    trainer.compute_loss = compute_loss_with


# --- transformers: attention and config ----------------------------------------------------------------------------

def register_sdpa_variant(name: str, attention) -> None:
    """Register `attention(sdpa, module, query, key, value, attention_mask, **kwargs)` under `name`, where `sdpa` is
    transformers' sdpa attention (for the inputs it leaves to it), with sdpa's mask function. Registering is public
    API and adds a name without changing any other; the sdpa functions come from modules transformers does not
    export, and the attention relies on models passing `position_ids` down to it (LLaMA-style models do)."""
    touch = f"the '{name}' attention"
    check_version("transformers", TRANSFORMERS, touch)
    from transformers import AttentionInterface, AttentionMaskInterface, masking_utils
    from transformers.integrations import sdpa_attention

    require(sdpa_attention, ["sdpa_attention_forward"], "transformers", TRANSFORMERS, touch)
    require(masking_utils, ["sdpa_mask"], "transformers", TRANSFORMERS, touch)
    AttentionInterface.register(name, functools.partial(attention, sdpa_attention.sdpa_attention_forward))
    AttentionMaskInterface.register(name, masking_utils.sdpa_mask)


def attn_implementation(model) -> str | None:
    """The attention a transformers model runs (its config's private `_attn_implementation`)."""
    check_version("transformers", TRANSFORMERS, "reading a model's attention implementation")
    require(model.config, ["_attn_implementation"], "transformers", TRANSFORMERS, "reading the attention")
    return model.config._attn_implementation


# --- PEFT: LoRA layers -----------------------------------------------------------------------------------------------

def _lora_layers(model, attributes: list[str], touch: str) -> list:
    from peft.tuners.lora import LoraLayer

    check_version("peft", PEFT, touch)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        require(layer, attributes, "peft", PEFT, touch)
    return layers


def replace_lora_dropouts(model, replace) -> int:
    """Put `replace(dropout)` in place of each LoRA dropout module (entries of a LoraLayer's `lora_dropout`) for
    which it returns a module; returns how many. Local to `model`."""
    swapped = 0
    for layer in _lora_layers(model, ["lora_dropout"], "replacing LoRA dropouts"):
        for name, dropout in layer.lora_dropout.items():
            new = replace(dropout)
            if new is not None:
                layer.lora_dropout[name] = new
                swapped += 1
    return swapped


_FOLD = "folding LoRA into the base weights for sampling (chatgpt_recipes.runtime.compat.lora_folded_for_sampling)"
_FOLD_ATTRIBUTES = ["base_layer", "lora_A", "lora_B", "scaling", "active_adapters", "merged", "merged_adapters",
                    "disable_adapters", "lora_variant", "cast_input_dtype_enabled"]


@contextmanager
def lora_folded_for_sampling(model):
    """Sampling (one token per forward) with each LoRA layer's update folded into a temporary copy of its base
    weight, so every projection is one matmul instead of three plus casts (PPO's rollouts: see
    benchmarks/RESULTS.md). The original base weights are put back untouched afterwards, so there is no
    merge/unmerge rounding and the adapter-disabled reference stays exact; the copy costs the adapted weights' size
    while sampling. Layers that cannot be folded (4/8-bit or Conv1D bases, DoRA, sharded weights) run their adapter,
    with PEFT's input casts on (sampling runs outside autocast).

    PEFT internals: a layer whose `merged_adapters` is non-empty reports `merged` and runs its base layer alone
    (peft 0.21). Were that to change, the folded update would be applied twice, hence the checks."""
    folded, casts = [], []
    try:
        for module in _lora_layers(model, _FOLD_ATTRIBUTES, _FOLD):
            casts.append((module, module.cast_input_dtype_enabled))
            module.cast_input_dtype_enabled = True
            base, active = module.base_layer, [name for name in module.active_adapters if name in module.lora_A]
            if (type(base) is not torch.nn.Linear or module.merged or module.disable_adapters or not active
                    or any(name in module.lora_variant for name in active) or base.weight.numel() == 0):
                continue
            original = base.weight.data
            folded_weight = original
            for name in active:  # W + scaling * B @ A, one new tensor in W's dtype
                folded_weight = torch.addmm(folded_weight, module.lora_B[name].weight.to(original.dtype),
                                            module.lora_A[name].weight.to(original.dtype), alpha=module.scaling[name])
            base.weight.data = folded_weight
            folded.append((module, original))
            module.merged_adapters = active  # PEFT's forward then runs the base layer alone
            if not module.merged:
                raise LibraryMismatchError(f"{_FOLD}: peft {installed('peft')} no longer "
                                           f"reads `merged` from `merged_adapters`: pin peft=={PEFT}")
        yield
    finally:
        for module, original in folded:
            module.base_layer.weight.data, module.merged_adapters = original, []
        for module, enabled in casts:
            module.cast_input_dtype_enabled = enabled


# --- bitsandbytes ---------------------------------------------------------------------------------------------------

def turn_off_4bit_cpu_repacking(model) -> None:
    """Set bitsandbytes' `support_avx512bf16_for_cpu` off on every 4-bit layer of `model` (see
    chatgpt_recipes.modeling.loading.keep_4bit_layers_trainable for why). Were it renamed, setting the old name would do nothing and
    the no-gradient bug would be back, hence the checks."""
    touch = "keeping 4-bit layers trainable after an eval-mode forward (support_avx512bf16_for_cpu)"
    check_version("bitsandbytes", BITSANDBYTES, touch)
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            require(module, ["support_avx512bf16_for_cpu"], "bitsandbytes", BITSANDBYTES, touch)
            module.support_avx512bf16_for_cpu = False


# --- TRL and transformers: reward models -----------------------------------------------------------------------------

def trl_preference_collator(pad_token_id: int):
    """TRL's RewardTrainer collator (chosen_ids/rejected_ids -> one padded batch, chosen first), from
    trl.trainer.reward_trainer, which trl does not export."""
    touch = "the reward model's collator (trl.trainer.reward_trainer.DataCollatorForPreference)"
    check_version("trl", TRL, touch)
    from trl.trainer import reward_trainer

    require(reward_trainer, ["DataCollatorForPreference"], "trl", TRL, touch)
    return reward_trainer.DataCollatorForPreference(pad_token_id=pad_token_id)


def keep_dataset_columns(trainer, columns: list[str]) -> None:
    """Trainer-local: transformers' Trainer drops every dataset column not in its private `_signature_columns`
    (filled once by `_set_signature_columns_if_needed`, which RewardTrainer sets to chosen/rejected/margin when
    unset); these `columns` are kept instead, for training and evaluation."""
    touch = "keeping extra dataset columns (transformers' Trainer._signature_columns)"
    check_version("transformers", TRANSFORMERS, touch)
    require(trainer, ["_signature_columns", "_set_signature_columns_if_needed", "_remove_unused_columns"],
            "transformers", TRANSFORMERS, touch)
    trainer._signature_columns = list(columns)


def no_step_past_max_steps(trainer) -> None:
    """Trainer-local: transformers' epoch loop (`Trainer._run_epoch`) looks for the end of training only after a
    step, so a run resumed from a checkpoint saved at `max_steps` (killed after its last checkpoint, before its final
    save) would train one step more than the uninterrupted run. Its epochs are skipped instead: the checkpoint is
    loaded and training ends at once."""
    touch = "resuming from a checkpoint at max_steps (transformers' Trainer._run_epoch)"
    check_version("transformers", TRANSFORMERS, touch)
    require(trainer, ["_run_epoch", "state"], "transformers", TRANSFORMERS, touch)
    run_epoch = trainer._run_epoch

    @functools.wraps(run_epoch)
    def run_epoch_unless_done(*args, **kwargs):
        if 0 < trainer.state.max_steps <= trainer.state.global_step:
            return None
        return run_epoch(*args, **kwargs)

    trainer._run_epoch = run_epoch_unless_done


def offset_score_head(model, offset: float) -> None:
    """Subtract `offset` from every output of a sequence classifier's `score` head, as a forward hook: TRL's
    get_reward (PPO, RLOO) reads `model.score` directly, not through forward, and the hook leaves the head's weights
    alone, so it works as well on weights that ZeRO-3 sharded at load time."""
    touch = "centring a reward model's score head, read directly by TRL's get_reward"
    check_version("trl", TRL, touch)
    require(model, ["score"], "transformers", TRANSFORMERS, touch)
    model.score.register_forward_hook(lambda head, inputs, output: output - offset)


def value_model_for_trl_ppo(peft_model):
    """The transformers model inside a PEFT-wrapped value model, as TRL's PPOTrainer wants it (it reads the backbone
    and `score` directly), its `score` head fed fp32 inputs: TRL hands it the backbone's last hidden state in the
    backbone's dtype, outside autocast."""
    touch = "PPO's value model (TRL reads its backbone and score head directly)"
    check_version("trl", TRL, touch)
    model = peft_model.get_base_model()
    require(model, ["score"], "transformers", TRANSFORMERS, touch)
    model.score.register_forward_pre_hook(lambda head, inputs: tuple(x.float() for x in inputs))
    return model


# --- TRL: PPOTrainer (trl.experimental.ppo), subclassed by chatgpt_recipes.rl.ppo_trainer.RecipePPOTrainer ------------

_PPO = "the PPO trainer (chatgpt_recipes.rl.ppo_trainer.RecipePPOTrainer, a subclass of TRL's PPOTrainer)"
# What the subclass overrides or calls, and what it assumes TRL's train() does: it reads `self.dataloader` (replaced
# by a seeded prompt order), loops over range(1, args.num_total_batches + 1) (shortened on resume), zeroes the step
# counters before on_train_begin (put back by a callback on resume), backpropagates each micro-batch's loss with one
# `accelerator.backward(loss)` (PPO-ptx's loss and fp16 loss scaling are applied there: ppo_backward) and steps
# `optimizer` after it (wrapped for fp16 loss scaling), and saves through _save_checkpoint (which adds the value
# model).
_PPO_METHODS = ["train", "log", "generate_completions", "_save_checkpoint", "_load_rng_state", "null_ref_context",
                "save_model"]
_PPO_TRAIN_SOURCE = ["self.dataloader", "range(1, args.num_total_batches + 1)", "self.state.global_step = 0",
                     "on_train_begin", "accelerator.backward(loss)", "optimizer.step()",
                     "self._save_checkpoint(model, trial=None)", "unwrapped_model.policy"]


def trl_ppo_trainer():
    """TRL's PPOTrainer class, checked: the version the subclass was written for, the methods it overrides and
    what it assumes about TRL's train()."""
    touch = _PPO
    try:
        from trl.experimental.ppo import PPOTrainer
    except ImportError as error:
        raise LibraryMismatchError(
            f"{touch}: trl {installed('trl')} has no trl.experimental.ppo.PPOTrainer (TRL removed it in 1.13): "
            f"pin trl=={TRL} (requirements.txt)") from error
    check_version("trl", TRL, touch)
    require(PPOTrainer, _PPO_METHODS, "trl", TRL, touch)
    source = inspect.getsource(PPOTrainer.train)
    missing = [line for line in _PPO_TRAIN_SOURCE if line not in source]
    if missing:
        raise LibraryMismatchError(f"{touch}: trl {installed('trl')}'s PPOTrainer.train no longer contains "
                                   f"{missing}; it was written for trl {TRL}: pin trl=={TRL} (requirements.txt)")
    return PPOTrainer


@contextmanager
def ppo_backward(accelerator, transform):
    """Inside, `accelerator.backward(loss)` backpropagates `transform(loss)` instead (an instance attribute, removed
    afterwards). TRL's PPO loop (checked by trl_ppo_trainer) calls it once per micro-batch with the PPO loss: what
    is added there is in the same backward, which under DeepSpeed is also the engine's step at the end of an
    accumulation."""
    touch = "PPO-ptx and fp16 loss scaling in TRL's PPO backward"
    check_version("trl", TRL, touch)
    require(accelerator, ["backward"], "accelerate", installed("accelerate"), touch)
    original = accelerator.backward
    accelerator.backward = lambda loss, **kwargs: original(transform(loss), **kwargs)
    try:
        yield
    finally:
        del accelerator.backward


def expose_policy_on_wrapper(model) -> None:
    """trl#2375: TRL's PPOTrainer reads `self.model.policy` (reference log-probs with a LoRA policy, null_ref_context,
    save_model) and `self.model.config` (the model card written with each checkpoint) on the model accelerate
    prepared, which under DDP is a DistributedDataParallel wrapper without those attributes. The wrapper gets plain
    (unregistered) references to the inner module's: DDP's parameters, hooks and state dict stay as they are, and
    TRL calls the policy that way only without gradients or to save it."""
    touch = "the PPO policy on a DDP wrapper (trl#2375)"
    check_version("trl", TRL, touch)
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return  # one process, or a DeepSpeed engine (which forwards attribute access, and has a config of its own)
    inner = model.module
    require(inner, _PPO_WRAPPER_ATTRIBUTES, "trl", TRL, touch)
    for name in _PPO_WRAPPER_ATTRIBUTES:
        if name not in vars(model):
            object.__setattr__(model, name, getattr(inner, name))


def complete_ppo_trainer_state(trainer) -> None:
    """TRL 1.12's PPOTrainer.__init__ does not run transformers' Trainer.__init__, and so lacks
    `is_distributed_loading_by_transformers` (transformers 5.x), which Trainer._save reads on every process that is
    not the main one: a multi-process PPO run failed at its first checkpoint. Set as Trainer.__init__ sets it for a
    model loaded the usual way."""
    touch = "PPO checkpoints on the non-main processes (Trainer.is_distributed_loading_by_transformers)"
    check_version("transformers", TRANSFORMERS, touch)
    check_version("trl", TRL, touch)
    if not hasattr(trainer, "is_distributed_loading_by_transformers"):
        trainer.is_distributed_loading_by_transformers = False


_PPO_WRAPPER_ATTRIBUTES = ["policy", "value_model", "config"]


def match_scheduler_to_prepared_optimizer(trainer) -> None:
    """TRL 1.12's PPOTrainer builds its LR scheduler before accelerate prepares the optimizer. DeepSpeed (ZeRO-2/3)
    drops empty parameter groups when it wraps the optimizer (with LoRA the no-decay group is empty), and since
    torch 2.10 the scheduler's first step fails on the mismatch (`zip() argument 2 is longer than argument 1`;
    transformers' own Trainer fixed it in transformers#43711 by building the scheduler after prepare). Rebuilt here,
    after prepare, from the learning rate every group had, only when the group counts differ."""
    touch = "the PPO LR scheduler rebuilt after DeepSpeed prepared the optimizer"
    check_version("trl", TRL, touch)
    require(trainer, ["lr_scheduler", "optimizer", "create_scheduler"], "trl", TRL, touch)
    scheduler, groups = trainer.lr_scheduler, trainer.optimizer.param_groups
    if len(scheduler.base_lrs) == len(groups):
        return
    if len(set(scheduler.base_lrs)) != 1:
        raise LibraryMismatchError(f"{touch}: the scheduler has several learning rates {scheduler.base_lrs}; "
                                   f"it was written for trl {TRL}'s one learning rate for all groups")
    for group in groups:
        group["lr"] = group["initial_lr"] = scheduler.base_lrs[0]
    trainer.lr_scheduler = None
    trainer.create_scheduler(num_training_steps=trainer.args.num_total_batches, optimizer=trainer.optimizer)


@contextmanager
def replaced_generate(model, generate):
    """`model.generate` is `generate(original, *args, **kwargs)` inside, the model's own afterwards. TRL's PPO loop
    samples through `lm_backbone.generate`, looked up on the policy at every call."""
    touch = "timing PPO's sampling (policy.generate replaced during train)"
    check_version("transformers", TRANSFORMERS, touch)
    require(model, ["generate"], "transformers", TRANSFORMERS, touch)
    own = vars(model).get("generate")  # an instance attribute set before (else the class's method)
    model.generate = functools.partial(generate, own or model.generate)
    try:
        yield
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own


# --- transformers: loading a model outside ZeRO-3's sharded construction ----------------------------------------------

@contextmanager
def models_built_whole():
    """Inside, `from_pretrained` builds a model whole even when a ZeRO-3 run is active (transformers builds every
    model sharded, through zero.Init, while its DeepSpeed config is registered): for a model that lives outside the
    DeepSpeed engine, such as the base an adapter is merged into after training. The registration is put back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    touch = "building a model whole during a ZeRO-3 run (transformers' registered DeepSpeed config)"
    check_version("transformers", TRANSFORMERS, touch)
    require(hf_deepspeed, ["_hf_deepspeed_config_weak_ref", "set_hf_deepspeed_config", "unset_hf_deepspeed_config"],
            "transformers", TRANSFORMERS, touch)
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = registered() if registered is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


_TRL_PACKING_WARNINGS = ("You are using packing, but the attention implementation is not set to a supported Flash",
                         "Padding-free training is enabled, but the attention implementation is not set to a")


@contextmanager
def quiet_trl_packing_warnings(args, model):
    """While SFTTrainer is built: drop TRL 1.12's two warnings that packing (padding-free batches) without
    FlashAttention lets examples attend to each other, when the recipe then swaps the model's sdpa for its own
    per-example attention (chatgpt_recipes.modeling.kernels.enable_fast_training, the same condition), where they do not
    apply. Any other attention keeps them. Relies on TRL logging them by that text on its sft_trainer logger."""
    import logging

    packs = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if not (packs and attn_implementation(model) == "sdpa"):
        yield
        return
    check_version("trl", TRL, "silencing SFTTrainer's packing warnings by their text")
    trl_logger = logging.getLogger("trl.trainer.sft_trainer")

    def not_applicable(record) -> bool:  # accelerate's logger adapter puts "[RANK n] " before the text
        return not any(text in str(record.msg) for text in _TRL_PACKING_WARNINGS)

    trl_logger.addFilter(not_applicable)
    try:
        yield
    finally:
        trl_logger.removeFilter(not_applicable)

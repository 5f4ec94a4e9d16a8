"""chatgpt_recipes/runtime/compat.py: every touch of a library's internals refuses a library version it was not written for and a
library that lacks what it relies on, with an error naming the library, its version and the pin; every patch is
undone afterwards."""

import types

import pytest
import torch
import trl.trainer.sft_trainer as trl_sft
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from chatgpt_recipes.modeling import kernels as speed
from chatgpt_recipes.runtime import compat
from chatgpt_recipes.runtime.errors import LibraryMismatchError

STOCK_TRL_LOSS = trl_sft._chunked_cross_entropy_loss


def tiny_lora_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def tiny_4bit_model():
    import bitsandbytes as bnb

    return torch.nn.Sequential(bnb.nn.Linear4bit(16, 16, quant_type="nf4"))


def fake_trainer(**attributes):
    return types.SimpleNamespace(compute_loss=lambda *args, **kwargs: trl_sft._chunked_cross_entropy_loss,
                                 **attributes)


def enter(context):
    with context:
        pass


PACKING = types.SimpleNamespace(padding_free=False, packing=True, packing_strategy="bfd")

# Each touch, by the library whose version it checks first
TOUCHES = {
    "trl_sft_loss": ("trl", lambda: enter(compat.trl_sft_loss(speed.fused_linear_cross_entropy))),
    "use_trl_sft_loss": ("trl", lambda: compat.use_trl_sft_loss(fake_trainer(), speed.fused_linear_cross_entropy)),
    "trl_preference_collator": ("trl", lambda: compat.trl_preference_collator(0)),
    "offset_score_head": ("trl", lambda: compat.offset_score_head(types.SimpleNamespace(score=None), 0.5)),
    "value_model_for_trl_ppo": ("trl", lambda: compat.value_model_for_trl_ppo(tiny_lora_model())),
    "register_sdpa_variant": ("transformers", lambda: compat.register_sdpa_variant("sdpa_test", print)),
    "attn_implementation": ("transformers", lambda: compat.attn_implementation(tiny_lora_model())),
    "keep_dataset_columns": ("transformers", lambda: compat.keep_dataset_columns(fake_trainer(), ["a"])),
    "no_step_past_max_steps": ("transformers",
                               lambda: compat.no_step_past_max_steps(fake_trainer(_run_epoch=print, state=None))),
    "replace_lora_dropouts": ("peft", lambda: compat.replace_lora_dropouts(tiny_lora_model(), lambda d: None)),
    "lora_folded_for_sampling": ("peft", lambda: enter(compat.lora_folded_for_sampling(tiny_lora_model()))),
    "trl_ppo_trainer": ("trl", compat.trl_ppo_trainer),
    "expose_policy_on_wrapper": ("trl", lambda: compat.expose_policy_on_wrapper(torch.nn.Linear(1, 1))),
    "complete_ppo_trainer_state": ("transformers", lambda: compat.complete_ppo_trainer_state(types.SimpleNamespace())),
    "replaced_generate": ("transformers", lambda: enter(compat.replaced_generate(tiny_lora_model(), print))),
    "turn_off_4bit_cpu_repacking": ("bitsandbytes", lambda: compat.turn_off_4bit_cpu_repacking(tiny_4bit_model())),
    "quiet_trl_packing_warnings": ("trl", lambda: enter(compat.quiet_trl_packing_warnings(PACKING, tiny_lora_model()))),
}
TESTED = {"trl": compat.TRL, "transformers": compat.TRANSFORMERS, "peft": compat.PEFT,
          "bitsandbytes": compat.BITSANDBYTES}


def test_tested_versions_are_the_installed_ones():
    import importlib.metadata

    for library, version in TESTED.items():
        assert importlib.metadata.version(library) == version, library


def test_check_version_accepts_patch_releases_only(monkeypatch):
    import trl

    for accepted in ("1.12.0", "1.12.7"):
        monkeypatch.setattr(trl, "__version__", accepted)
        compat.check_version("trl", "1.12.0", "a touch")
    for refused in ("1.13.0", "1.11.9", "2.12.0", "1.12.0.dev0"):
        monkeypatch.setattr(trl, "__version__", refused)
        with pytest.raises(LibraryMismatchError, match=rf"trl {refused} is installed: pin trl==1.12.0"):
            compat.check_version("trl", "1.12.0", "a touch")


@pytest.mark.parametrize("touch", TOUCHES)
def test_every_touch_refuses_another_version(touch, monkeypatch):
    library, apply = TOUCHES[touch]
    module = __import__(library)
    tested = compat.Version(TESTED[library])
    other = f"{tested.major}.{tested.minor + 1}.0"
    monkeypatch.setattr(module, "__version__", other)
    pin = rf"{library} {other} is installed: pin {library}=={TESTED[library]}"
    with pytest.raises(LibraryMismatchError, match=pin):
        apply()
    assert trl_sft._chunked_cross_entropy_loss is STOCK_TRL_LOSS


def test_trl_loss_guards_name_and_signature(monkeypatch):
    with monkeypatch.context() as patch:
        patch.delattr(trl_sft, "_chunked_cross_entropy_loss")
        with pytest.raises(LibraryMismatchError, match=r"trl 1\.12\.0's trl.trainer.sft_trainer has no "
                                                       r"_chunked_cross_entropy_loss.*pin trl==1.12.0"):
            enter(compat.trl_sft_loss(speed.fused_linear_cross_entropy))
    monkeypatch.setattr(trl_sft, "_chunked_cross_entropy_loss", lambda hidden_states, lm_head_weight, labels: None)
    with pytest.raises(LibraryMismatchError, match=r"calls it with \(hidden_states, lm_head_weight, labels\)"):
        compat.use_trl_sft_loss(fake_trainer(), speed.fused_linear_cross_entropy)


def test_trl_loss_is_replaced_only_inside_and_restored_after_an_error():
    def loss(*args, stock=None, **kwargs):
        return stock

    with compat.trl_sft_loss(loss):
        assert trl_sft._chunked_cross_entropy_loss() is STOCK_TRL_LOSS  # the replacement, handed TRL's own
    assert trl_sft._chunked_cross_entropy_loss is STOCK_TRL_LOSS
    with pytest.raises(RuntimeError), compat.trl_sft_loss(loss):
        raise RuntimeError("a failed step")
    assert trl_sft._chunked_cross_entropy_loss is STOCK_TRL_LOSS


def test_trl_loss_is_local_to_one_trainer():
    fast, stock = fake_trainer(), fake_trainer()
    compat.use_trl_sft_loss(fast, speed.fused_linear_cross_entropy)
    seen = fast.compute_loss(None, {})  # what TRL's forward would find while this trainer computes its loss
    assert seen.func is speed.fused_linear_cross_entropy and seen.keywords == {"stock": STOCK_TRL_LOSS}
    assert stock.compute_loss(None, {}) is STOCK_TRL_LOSS
    assert trl_sft._chunked_cross_entropy_loss is STOCK_TRL_LOSS


def test_attention_guards(monkeypatch):
    from transformers import AttentionInterface, masking_utils
    from transformers.integrations import sdpa_attention

    stock_sdpa = AttentionInterface._global_mapping["sdpa"]
    compat.register_sdpa_variant("sdpa_test", lambda sdpa, *args, **kwargs: sdpa)
    assert AttentionInterface._global_mapping["sdpa_test"]() is sdpa_attention.sdpa_attention_forward
    assert AttentionInterface._global_mapping["sdpa"] is stock_sdpa  # only a name is added
    for module, name in ((sdpa_attention, "sdpa_attention_forward"), (masking_utils, "sdpa_mask")):
        with monkeypatch.context() as patch:
            patch.delattr(module, name)
            with pytest.raises(LibraryMismatchError, match=rf"has no {name}.*pin transformers==5.23.0"):
                compat.register_sdpa_variant("sdpa_test", print)
    with pytest.raises(LibraryMismatchError, match="has no _attn_implementation"):
        compat.attn_implementation(types.SimpleNamespace(config=types.SimpleNamespace()))


def test_packed_attention_gets_position_ids():
    """The packed attention splits at position_ids restarts: models must pass position_ids down to it."""
    from conftest import tiny_llama

    seen = []
    model = tiny_llama(speed.PACKED_SDPA)
    original = speed.packed_segment_bounds
    try:
        speed.packed_segment_bounds = lambda position_ids: seen.append(position_ids) or original(position_ids)
        with torch.no_grad():
            model(input_ids=torch.randint(0, 300, (1, 6)), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]),
                  use_cache=False)
    finally:
        speed.packed_segment_bounds = original
    assert len(seen) == 2 and all(torch.equal(p, torch.tensor([[0, 1, 2, 0, 1, 2]])) for p in seen)  # 2 layers


def test_lora_dropout_guard():
    model = tiny_lora_model()
    layer = next(m for m in model.modules() if hasattr(m, "lora_dropout"))
    del layer.lora_dropout
    with pytest.raises(LibraryMismatchError, match=r"replacing LoRA dropouts: peft 0.21.2's Linear has no "
                                                   r"lora_dropout.*pin peft==0.21.2"):
        compat.replace_lora_dropouts(model, lambda dropout: None)


def test_lora_folding_guards_what_merged_means(monkeypatch):
    """If PEFT stopped reading `merged` from `merged_adapters`, folding would apply LoRA twice: refused, and the
    base weights are put back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_lora_model()
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    weights = [(m.base_layer.weight, m.base_layer.weight.data.clone()) for m in layers]
    monkeypatch.setattr(BaseTunerLayer, "merged", property(lambda self: False))
    with pytest.raises(LibraryMismatchError, match="no longer reads `merged` from `merged_adapters`: pin peft"):
        enter(compat.lora_folded_for_sampling(model))
    for layer, (weight, values) in zip(layers, weights):
        assert layer.base_layer.weight is weight and torch.equal(weight.data, values) and layer.merged_adapters == []
    monkeypatch.undo()
    del layers[0].scaling
    with pytest.raises(LibraryMismatchError, match="has no scaling"):
        enter(compat.lora_folded_for_sampling(model))


def test_4bit_repacking_guard():
    model = tiny_4bit_model()
    compat.turn_off_4bit_cpu_repacking(model)
    assert model[0].support_avx512bf16_for_cpu is False
    del model[0].support_avx512bf16_for_cpu  # as after a rename in bitsandbytes
    with pytest.raises(LibraryMismatchError, match=r"bitsandbytes 0.50.2's Linear4bit has no "
                                                   r"support_avx512bf16_for_cpu.*pin bitsandbytes==0.50.2"):
        compat.turn_off_4bit_cpu_repacking(model)


def test_reward_touch_guards(monkeypatch):
    from trl.trainer import reward_trainer

    collator = compat.trl_preference_collator(0)
    batch = collator([{"chosen_ids": [1, 2], "rejected_ids": [3]}])
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    with monkeypatch.context() as patch:
        patch.delattr(reward_trainer, "DataCollatorForPreference")
        with pytest.raises(LibraryMismatchError, match="has no DataCollatorForPreference.*pin trl==1.12.0"):
            compat.trl_preference_collator(0)

    trainer = fake_trainer(_signature_columns=None, _set_signature_columns_if_needed=None)
    with pytest.raises(LibraryMismatchError, match="has no _remove_unused_columns.*pin transformers==5.23.0"):
        compat.keep_dataset_columns(trainer, ["chosen_ids"])
    trainer._remove_unused_columns = None
    compat.keep_dataset_columns(trainer, ["chosen_ids"])
    assert trainer._signature_columns == ["chosen_ids"]

    with pytest.raises(LibraryMismatchError, match="has no score"):
        compat.offset_score_head(types.SimpleNamespace(), 0.5)
    with pytest.raises(LibraryMismatchError, match="has no score"):
        compat.value_model_for_trl_ppo(tiny_lora_model())  # a causal LM: no score head


def test_lora_input_casts_are_back_after_training_even_after_a_failed_one():
    model = tiny_lora_model()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    callback = speed.LoraInputsInComputeDtype(model)
    callback.on_train_begin(None, None, None)
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    callback.on_train_begin(None, None, None)  # a train() that raised, then a retry
    callback.on_train_end(None, None, None)
    assert all(m.cast_input_dtype_enabled for m in layers)


def test_ppo_trainer_guards(monkeypatch):
    import sys

    from trl.experimental.ppo import PPOTrainer

    assert compat.trl_ppo_trainer() is PPOTrainer
    with monkeypatch.context() as patch:
        patch.delattr(PPOTrainer, "generate_completions")
        with pytest.raises(LibraryMismatchError, match=r"PPOTrainer has no generate_completions.*pin trl==1.12.0"):
            compat.trl_ppo_trainer()
    with monkeypatch.context() as patch:  # TRL's loop no longer does what the subclass assumes
        patch.setattr(compat, "_PPO_TRAIN_SOURCE", [*compat._PPO_TRAIN_SOURCE, "self.renamed_dataloader"])
        with pytest.raises(LibraryMismatchError, match=r"PPOTrainer.train no longer contains "
                                                       r"\['self.renamed_dataloader'\].*pin trl==1.12.0"):
            compat.trl_ppo_trainer()
    with monkeypatch.context() as patch:  # TRL >= 1.13: no PPOTrainer at all
        patch.setitem(sys.modules, "trl.experimental.ppo", None)
        with pytest.raises(LibraryMismatchError, match=r"removed it in 1.13.*pin trl==1.12.0"):
            compat.trl_ppo_trainer()


def test_replaced_generate_is_undone_even_after_an_error():
    model = tiny_lora_model()
    calls = []

    def counting(generate, *args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="inside"):
        with compat.replaced_generate(model, counting):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
            raise RuntimeError("inside")
    assert len(calls) == 1 and "generate" not in vars(model)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert len(calls) == 1


def test_policy_reachable_through_a_ddp_wrapper():
    """trl#2375: TRL reads model.policy on the DDP-wrapped PolicyAndValueWrapper; a real (1-process gloo) DDP."""
    import socket

    import torch.distributed as dist
    from trl.experimental.ppo.ppo_trainer import PolicyAndValueWrapper

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        policy, value = tiny_lora_model(), tiny_lora_model()
        value.base_model.model.score = torch.nn.Linear(16, 1)
        inner = PolicyAndValueWrapper(policy, value.base_model.model)
        inner.config = policy.config  # as TRL's PPOTrainer sets it
        wrapped = torch.nn.parallel.DistributedDataParallel(inner)
        assert not hasattr(wrapped, "policy") and not hasattr(wrapped, "config")
        before = dict(wrapped.named_parameters())
        compat.expose_policy_on_wrapper(wrapped)
        assert wrapped.policy is policy and wrapped.config is policy.config
        assert dict(wrapped.named_parameters()).keys() == before.keys()  # not registered: DDP's view unchanged
    finally:
        dist.destroy_process_group()


def test_trl_packing_warnings_are_dropped_only_where_per_example_attention_follows(caplog):
    """TRL's two packing warnings, logged through accelerate's adapter ("[RANK 0] ..."), do not apply when the
    recipe swaps sdpa for its per-example attention; another warning, or another attention, keeps them."""
    import logging

    from accelerate import PartialState
    from accelerate.logging import get_logger

    from chatgpt_recipes.runtime.compat import _TRL_PACKING_WARNINGS

    PartialState()
    trl_logger = get_logger("trl.trainer.sft_trainer")
    model = tiny_lora_model()
    assert compat.attn_implementation(model) == "sdpa"

    def logged_inside(args, model) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl.trainer.sft_trainer"):
            with compat.quiet_trl_packing_warnings(args, model):
                for text in (*_TRL_PACKING_WARNINGS, "Another warning"):
                    trl_logger.warning(text + " ...", main_process_only=False)
        return [record.getMessage() for record in caplog.records]

    kept = logged_inside(PACKING, model)
    assert len(kept) == 1 and "Another warning" in kept[0], kept
    no_packing = types.SimpleNamespace(padding_free=False, packing=False, packing_strategy="bfd")
    assert len(logged_inside(no_packing, model)) == 3
    model.set_attn_implementation("eager")
    assert len(logged_inside(PACKING, model)) == 3
    caplog.clear()
    trl_logger.warning(_TRL_PACKING_WARNINGS[0], main_process_only=False)  # after the block: kept
    assert len(caplog.records) == 1

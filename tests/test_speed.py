"""common.speed: the packed attention and the fused loss give what the code they replace gives."""

import pytest
import torch
import trl.trainer.sft_trainer as trl_sft
from transformers import LlamaConfig, LlamaForCausalLM

from common import speed


@pytest.fixture
def restore_trl_loss(monkeypatch):
    """enable_fast_training swaps TRL's loss function; put it back after the test."""
    monkeypatch.setattr(trl_sft, "_chunked_cross_entropy_loss", trl_sft._chunked_cross_entropy_loss)


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def test_packed_segment_bounds():
    assert speed.packed_segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [0, 3, 5, 6]
    assert speed.packed_segment_bounds(torch.tensor([[0, 1, 2, 3]])) is None  # one example: plain causal sdpa
    assert speed.packed_segment_bounds(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # not one packed row


def test_packed_attention_matches_masked_sdpa():
    """Three examples packed in one row: per-example causal SDPA equals transformers' block-diagonal-mask sdpa,
    and each example alone; padded batches (the fallback) equal plain sdpa."""
    lengths = [5, 9, 3]
    ids = torch.randint(0, 300, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    reference, packed = tiny_llama("sdpa"), tiny_llama(speed.PACKED_SDPA)
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
    for loss_function in (speed.fused_linear_cross_entropy, speed._trl_chunked_cross_entropy):
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


def test_enable_fast_training_in_sft_trainer(tmp_path, restore_trl_loss, smollm2_dir):
    """Through SFTTrainer with packing: the fast model uses packed attention and the fused loss, and its loss on a
    packed batch equals that of TRL's stock path."""
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
            speed.enable_fast_training(trainer)
            assert model.config._attn_implementation == speed.PACKED_SDPA
            assert trl_sft._chunked_cross_entropy_loss is speed.fused_linear_cross_entropy
        batch = next(iter(trainer.get_train_dataloader()))
        assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # padding-free packed row
        losses.append(trainer.compute_loss(trainer.model, batch))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)

"""On a CUDA GPU (the `gpu` marker: skipped without one; scripts/gpu_check.sh runs them): every recipe's short run
computes on the GPU, and packed varlen attention gives the per-example losses of unpacked sdpa.

"On the GPU" is checked by CpuCompute, a torch function mode that counts every matmul, linear layer, embedding
lookup and attention call during the run by the device of its tensors: a weight, a batch or a reference model left
on the CPU shows up as a CPU call."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.overrides import TorchFunctionMode

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.modeling.loading import ModelArguments

pytestmark = pytest.mark.gpu

ALPACA = str(REPO / "data" / "alpaca_en_demo.json")
COMMON = ["--report_to", "none", "--save_strategy", "no", "--max_steps", "2"]


class CpuCompute(TorchFunctionMode):
    """Counts the compute calls (matmul, linear, embedding, attention) by the device type of their tensors."""

    WATCHED = {F.linear, F.embedding, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.addmm,
               torch.baddbmm, torch.Tensor.__matmul__, torch.Tensor.matmul}

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.WATCHED:
            devices = {a.device.type for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
            self.calls[(getattr(func, "__name__", str(func)), "cpu" if "cpu" in devices else "gpu")] += 1
        return func(*args, **(kwargs or {}))

    def assert_on_gpu(self, what: str):
        on_cpu = {name: n for (name, device), n in self.calls.items() if device == "cpu"}
        on_gpu = sum(n for (_, device), n in self.calls.items() if device == "gpu")
        assert not on_cpu and on_gpu > 0, f"{what}: compute calls on the CPU {on_cpu}, on the GPU {on_gpu}"


def on_gpu(what: str, run, *args, **kwargs):
    with CpuCompute() as spy:
        result = run(*args, **kwargs)
    spy.assert_on_gpu(what)
    return result


def run_sft(out, *args):
    import sft_lora

    config, model_args = parse_config((sft_lora.SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml",
                                      [*COMMON, "--dataset_name", ALPACA, "--max_train_samples", "16",
                                       "--eval_split_size", "4", "--max_length", "256", "--eval_strategy", "no",
                                       "--sample_max_new_tokens", "2", "--output_dir", str(out), *args])
    sft_lora.main(config, model_args)


@pytest.mark.parametrize("mode", [[], ["--load_in_4bit", "true"], ["--use_peft", "false"]],
                         ids=["lora", "qlora", "full"])
def test_sft_on_gpu(tmp_path, tiny_llama_dir, mode, capsys):
    from chatgpt_recipes.modeling import kernels as speed

    speed.announce_attention.cache_clear()  # printed once per process: once per run here
    on_gpu(f"sft {mode}", run_sft, tmp_path / "sft", "--model_name_or_path", tiny_llama_dir, *mode)
    printed = capsys.readouterr().out
    assert "[attention]" in printed and "[batch] cuda:" in printed  # the choices are printed at start


def test_reward_model_dpo_pretrain_on_gpu(tmp_path, tiny_llama_dir):
    import dpo
    import pretrain
    import reward_model

    config = parse_config((reward_model.RewardRecipeConfig, ModelArguments), "reward/smollm2_dpo_demo_lora.yaml",
                          [*COMMON, "--model_name_or_path", tiny_llama_dir, "--eval_split_size", "8",
                           "--max_length", "128", "--centering_samples", "16", "--output_dir", str(tmp_path / "rm")])
    on_gpu("reward_model", reward_model.main, *config)
    config = parse_config((dpo.DPORecipeConfig, ModelArguments), "dpo/smollm2_dpo_demo_lora.yaml",
                          [*COMMON, "--model_name_or_path", tiny_llama_dir, "--max_train_samples", "8",
                           "--eval_split_size", "6", "--max_length", "128", "--output_dir", str(tmp_path / "dpo")])
    on_gpu("dpo", dpo.main, *config)
    config = parse_config((pretrain.PretrainConfig, pretrain.ModelArguments), "pretrain/tiny_gpt_wiki.yaml",
                          [*COMMON, "--output_dir", str(tmp_path / "pretrain")])
    on_gpu("pretrain", pretrain.main, *config)


@pytest.mark.parametrize("ptx", ["0.0", "0.5"])
def test_ppo_on_gpu(tmp_path, marker_policy_dir, marker_reward_model_dir, ptx):
    import ppo

    config = parse_config((ppo.PPORecipeConfig, ModelArguments), "ppo/smollm2_alpaca_lora.yaml",
                          ["--model_name_or_path", marker_policy_dir, "--reward_model_path", marker_reward_model_dir,
                           "--output_dir", str(tmp_path / "ppo"), "--max_train_prompts", "8", "--eval_prompts", "2",
                           "--total_episodes", "8", "--response_length", "6", "--num_ppo_epochs", "1",
                           "--ptx_coef", ptx, "--on_weak_reward_model", "warn", "--save_steps", "100",
                           "--report_to", "none"])
    on_gpu(f"ppo ptx {ptx}", ppo.main, *config)


@pytest.mark.parametrize("use_peft", ["true", "false"])
def test_rloo_on_gpu(tmp_path, marker_policy_dir, marker_reward_model_dir, use_peft):
    """Full fine-tuning loads a separate reference: it must be on the GPU too."""
    import rloo

    config = parse_config((rloo.RLOORecipeConfig, ModelArguments), "rloo/smollm2_alpaca_lora.yaml",
                          ["--model_name_or_path", marker_policy_dir, "--reward_model_path", marker_reward_model_dir,
                           "--max_steps", "1", "--max_train_prompts", "4", "--eval_prompts", "2",
                           "--max_completion_length", "6", "--use_peft", use_peft, "--report_to", "none",
                           "--save_strategy", "no", "--output_dir", str(tmp_path / "rloo")])
    on_gpu(f"rloo use_peft={use_peft}", rloo.main, *config)


def test_inference_recipes_on_gpu(tmp_path, tiny_llama_dir):
    from chat import ChatArguments
    from chat import main as chat
    from comparison_data import ComparisonDataConfig
    from comparison_data import main as comparison_data
    from evaluate_model import EvaluationConfig
    from evaluate_model import main as evaluate_model

    on_gpu("chat", chat, ChatArguments(model_name_or_path=tiny_llama_dir, prompt="Name a colour.", max_new_tokens=4))
    on_gpu("comparison_data", comparison_data, ComparisonDataConfig(
        model_name_or_path=tiny_llama_dir, output_dir=str(tmp_path / "pairs"), num_pairs=4, max_answer_tokens=4,
        batch_size=4))
    on_gpu("evaluate_model", evaluate_model, EvaluationConfig(
        models=[f"tiny={tiny_llama_dir}"], output_dir=str(tmp_path / "eval"), eval_split_size=8, num_prompts=4,
        max_new_tokens=4, batch_size=4, preference_dataset=None, max_length=256))


def test_packed_varlen_attention_gives_unpacked_per_example_losses():
    """Three examples packed in one padding-free row through the CUDA varlen kernel (bf16): each example's loss
    equals that of the example alone through plain sdpa; the example bounds are computed once for all layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatgpt_recipes.modeling import kernels as speed

    name, _ = speed.packed_attention_choice("cuda", True)
    assert name in (speed.PACKED_VARLEN, "flash_attention_2", "flash_attention_3")
    speed.register_varlen_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    lengths = [37, 101, 64]
    ids = torch.randint(0, 300, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    computed = []
    original = speed.packed_cu_seqlens

    def counted(position_ids):
        computed.append(speed._BatchBounds.position_ids is not position_ids)
        return original(position_ids)

    speed.packed_cu_seqlens = counted
    try:
        with torch.no_grad():
            model.set_attn_implementation(speed.PACKED_VARLEN)
            packed = model(input_ids=ids, position_ids=positions).logits.float()
            model.set_attn_implementation("sdpa")
            alone = [model(input_ids=part).logits.float() for part in ids.split(lengths, dim=1)]
    finally:
        speed.packed_cu_seqlens = original
    assert sum(computed) == 1 and len(computed) == config.num_hidden_layers  # once per batch, reused by each layer
    for part_ids, packed_logits, alone_logits in zip(ids.split(lengths, dim=1), packed.split(lengths, dim=1), alone):
        target = part_ids[0, 1:]
        packed_loss = F.cross_entropy(packed_logits[0, :-1], target)
        alone_loss = F.cross_entropy(alone_logits[0, :-1], target)
        torch.testing.assert_close(packed_loss, alone_loss, atol=2e-2, rtol=1e-2)  # bf16 kernels

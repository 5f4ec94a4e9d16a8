"""recipes/ppo.py: a few PPO updates (with PPO-ptx) through `accelerate launch`, resume by rerunning the same
command, and the inputs PPO must refuse before any training."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_recipe
from safetensors.torch import load_file

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.data.templates import save_stage_info
from chatgpt_recipes.modeling.loading import ModelArguments, load_model, load_tokenizer, lora_config
from chatgpt_recipes.runtime.errors import ConfigError, ModelLoadError

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out


@pytest.fixture(scope="module")
def reward_dir(marker_reward_model_dir):
    """The reward model trained for real on the marker preference (tests/conftest.py), on the marker policy's
    tokenizer."""
    return marker_reward_model_dir


def copy_reward_model(reward: str, out: Path) -> str:
    shutil.copytree(reward, out)
    return str(out)


def ppo_args(policy, reward, out, episodes):
    return ["--model_name_or_path", policy, "--reward_model_path", reward, "--output_dir", out,
            "--max_train_prompts", "12", "--eval_prompts", "2", "--total_episodes", str(episodes),
            "--response_length", "6", "--num_ppo_epochs", "1", "--learning_rate", "1e-3", "--ptx_coef", "0.5",
            "--on_weak_reward_model", "warn", "--save_steps", "1", "--sample_every", "2", "--bf16", "false",
            "--report_to", "none"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, marker_policy_dir, reward_dir):
    out = tmp_path_factory.mktemp("ppo") / "out"
    first = run_recipe("ppo.py", *ppo_args(marker_policy_dir, reward_dir, out, 8))
    first_history = json.loads((out / "log_history.json").read_text())
    resumed = run_recipe("ppo.py", *ppo_args(marker_policy_dir, reward_dir, out, 12))  # same command, more episodes
    return {"out": out, "first": first.stdout, "first_history": first_history, "resumed": resumed.stdout}


def test_ppo_updates_policy_not_reference_and_logs(ppo_run, marker_policy_dir):
    out = ppo_run["out"]
    assert "WARNING: " not in ppo_run["first"]  # the RM guard passes: it records a held-out accuracy above 0.55
    updates = [entry for entry in ppo_run["first_history"] if "objective/kl" in entry]
    assert len(updates) == 2
    for key in ("objective/scores", "objective/kl", "objective/entropy", "loss/value_avg", "policy/clipfrac_avg",
                "response_length", "time/generation_s", "time/training_s", "ptx/loss"):
        assert all(key in entry for entry in updates), key
    assert all(entry["objective/entropy"] > 0 and entry["ptx/loss"] > 0 for entry in updates)
    results = json.loads((out / "ppo_results.json").read_text())
    assert results["reference_max_logit_change"] == 0.0  # the adapter-disabled reference is the SFT policy
    initial = load_file(str(Path(marker_policy_dir) / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    changed = [name for name, value in initial.items() if not torch.equal(value, final[name])]
    assert any("proj" in name for name in changed)  # LoRA updates merged into the policy's projections
    assert "[sample @ update 2]" in ppo_run["first"]
    assert json.loads((out / "stage_info.json").read_text())["prompt_format"] == "alpaca"


def test_rerunning_the_same_command_resumes(ppo_run):
    out = ppo_run["out"]
    assert "Resuming from" in ppo_run["resumed"] and "checkpoint-2" in ppo_run["resumed"]
    history = [entry for entry in json.loads((out / "log_history.json").read_text()) if "objective/kl" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3]  # updates 1-2 kept, only update 3 run again
    assert history[:2] == [e for e in ppo_run["first_history"] if "objective/kl" in e]
    assert json.loads((out / "ppo_results.json").read_text())["updates"] == 3
    assert (out / "checkpoint-3" / "value_model.safetensors").is_file()


def run_ppo_main(*args):
    import ppo

    ppo.main(*parse_config((ppo.PPORecipeConfig, ModelArguments), "ppo/smollm2_alpaca_lora.yaml", list(args)))


def test_refuses_reward_model_with_another_tokenizer(tmp_path, tiny_llama_dir, reward_dir):
    with pytest.raises(ModelLoadError, match="does not use the policy's tokenizer.*vocabularies differ"):
        run_ppo_main("--model_name_or_path", tiny_llama_dir, "--reward_model_path", reward_dir,
                     "--on_weak_reward_model", "warn", "--output_dir", str(tmp_path / "out"))


def test_refuses_near_chance_reward_model_and_other_prompt_format(tmp_path, marker_policy_dir, reward_dir):
    reward = copy_reward_model(reward_dir, tmp_path / "rm")
    save_stage_info(reward, "reward_model", "alpaca", eval_accuracy=0.51)  # the trained RM, recorded as weak
    with pytest.raises(ConfigError, match="accuracy 0.510, below min_reward_model_accuracy=0.55"):
        run_ppo_main("--model_name_or_path", marker_policy_dir, "--reward_model_path", reward,
                     "--output_dir", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="trained on prompts in the 'alpaca' format.*prompt_format: alpaca"):
        run_ppo_main("--model_name_or_path", marker_policy_dir, "--reward_model_path", reward_dir,
                     "--prompt_format", "chat", "--output_dir", str(tmp_path / "out"))


def test_refuses_adapter_without_its_base(tmp_path, reward_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base-model",
                                                             "peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match="is a LoRA adapter whose base model '/nowhere/base-model' cannot be"):
        run_ppo_main("--model_name_or_path", str(adapter), "--reward_model_path", reward_dir,
                     "--on_weak_reward_model", "warn", "--output_dir", str(tmp_path / "out"))


def test_value_model_is_lora_with_an_fp32_head_and_merges_keep_small_updates(tiny_llama_dir, reward_dir):
    """With use_peft the value model trains only LoRA weights and the score head (fp32) over a bf16 backbone, and
    still runs without autocast; a policy trained over bf16 weights is merged into the checkpoint's fp32 weights,
    so an update smaller than bf16's rounding step survives the merge."""
    from peft import get_peft_model

    from chatgpt_recipes.training.reward import load_value_model
    from chatgpt_recipes.training.saving import merged_model

    model_args = ModelArguments(model_name_or_path=tiny_llama_dir, use_peft=True, lora_r=4, lora_alpha=8,
                                dtype="bfloat16")
    value_model = load_value_model(reward_dir, model_args)
    trained = {name: param for name, param in value_model.named_parameters() if param.requires_grad}
    assert trained and all("lora_" in name or "score" in name for name in trained)
    assert all(param.dtype == torch.float32 for param in trained.values())
    assert any("score" in name for name in trained)
    assert value_model.model.embed_tokens.weight.dtype == torch.bfloat16
    hidden = value_model.model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    assert value_model.score(hidden).dtype == torch.float32  # no autocast: bf16 hidden state into the fp32 head

    tokenizer = load_tokenizer(tiny_llama_dir)
    policy = get_peft_model(load_model(model_args, tokenizer), lora_config(model_args, load_model(model_args, tokenizer)))
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-5)  # an update of ~1e-5: below bf16's step (~1e-4) near 0.02
        update = layer.get_delta_weight("default").float()
    merged = merged_model(policy, model_args, tokenizer)
    base = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight - base, update, atol=1e-8, rtol=1e-3)


def test_training_autocast_sees_each_optimizer_step():
    """The autocast around PPO's whole loop must not reuse bf16 weight copies made before an optimizer step (the
    autocast cache does, until the region exits): the policy would be trained on forwards of its first weights."""
    from chatgpt_recipes.rl.ppo_trainer import training_autocast

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with training_autocast("cpu", SimpleNamespace(bf16=True, fp16=False)):
        before = layer(x)
        assert before.dtype == torch.bfloat16
        before.float().pow(2).sum().backward()
        optimizer.step()
        after = layer(x)
    assert not torch.equal(before, after)


def test_resuming_full_fine_tuning_loads_every_weight_or_names_the_missing_ones(tmp_path, tiny_llama_dir):
    """resume_from once loaded a fully trained policy with strict=False: keys of another model were dropped
    silently. Only a tied weight (lm_head, written once by save_pretrained) may be absent."""
    from transformers import AutoModelForCausalLM

    from chatgpt_recipes.rl.ppo_trainer import load_whole_state

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path / "checkpoint-1")
    state = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    assert "lm_head.weight" not in state  # tied: saved once, as the embedding
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.nn.init.zeros_(fresh.model.layers[0].mlp.up_proj.weight)
    load_whole_state(fresh, state, tmp_path / "checkpoint-1")
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    partial = {key: value for key, value in state.items() if "layers.1." not in key}
    with pytest.raises(ConfigError, match=r"checkpoint-1/model.safetensors does not hold this policy's weights; "
                                          r"missing: model.layers.1.\S+"):
        load_whole_state(fresh, partial, tmp_path / "checkpoint-1")
    with pytest.raises(ConfigError, match=r"not in the policy: score.weight"):
        load_whole_state(fresh, {**state, "score.weight": torch.zeros(1, 64)}, tmp_path / "checkpoint-1")
    with pytest.raises(ConfigError, match=r"does not fit this policy: .*size mismatch"):
        load_whole_state(fresh, {**state, "model.norm.weight": torch.ones(3)}, tmp_path / "checkpoint-1")


def test_fp16_ppo_scales_its_loss_and_the_guard_tells_an_overflow_skip_from_divergence(tmp_path, capsys):
    """TRL's PPOTrainer has no GradScaler: small fp16 gradients underflowed to zero, and the NaN guard would stop on
    the inf gradient that dynamic loss scaling skips. Fp16LossScaling on CPU fp16 autocast, with accelerate's
    prepared optimizer as in the PPO loop."""
    from accelerate import Accelerator

    from chatgpt_recipes.rl.ppo_trainer import Fp16LossScaling
    from chatgpt_recipes.runtime.errors import TrainingDivergedError
    from chatgpt_recipes.training.resume import MAX_CONSECUTIVE_OVERFLOW_SKIPS, NonFiniteLossGuard

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    optimizer = Fp16LossScaling(accelerator.prepare(torch.optim.SGD(layer.parameters(), lr=1.0)), accelerator)
    x = torch.randn(4, 8)

    def update(loss_factor, scaled=True):
        before = layer.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = layer(x).float().pow(2).sum() * loss_factor
        (optimizer.scaler.scale(loss) if scaled else loss).backward()
        optimizer.step() if scaled else optimizer.optimizer.step()
        optimizer.zero_grad()
        return (layer.weight.detach() - before).abs().max().item()

    assert update(1e-9, scaled=False) == 0.0  # the fp16 gradient underflows: no learning without loss scaling
    assert update(1e-9) > 0 and not optimizer.step_was_skipped
    scale = optimizer.scaler.get_scale()
    assert update(1e36) == 0.0  # overflow: the step is skipped, the weights stay finite and the scale is halved
    assert optimizer.step_was_skipped and optimizer.scaler.get_scale() == scale / 2 and optimizer.skipped_steps == 1

    args = SimpleNamespace(fp16=True, output_dir=str(tmp_path), save_only_model=False)
    state, guard = SimpleNamespace(global_step=3), NonFiniteLossGuard()
    guard.on_step_end(args, state, None, optimizer=optimizer)
    guard.on_log(args, state, None, logs={"loss": 0.5, "grad_norm": float("inf")})
    printed = capsys.readouterr().out
    assert "[fp16] step 3: the logged grad_norm is inf: a gradient overflow, 1 step(s) skipped" in printed
    with pytest.raises(TrainingDivergedError, match="diverged at step 3: the logged grad_norm is inf"):
        NonFiniteLossGuard().on_log(SimpleNamespace(**{**vars(args), "fp16": False}), state, None,
                                    logs={"grad_norm": float("inf")})
    assert update(1e-4) > 0 and not optimizer.step_was_skipped  # a normal step after the skip
    guard.on_step_end(args, state, None, optimizer=optimizer)
    with pytest.raises(TrainingDivergedError, match="the logged grad_norm is nan"):  # no skip since the last log
        guard.on_log(args, state, None, logs={"grad_norm": float("nan")})
    with pytest.raises(TrainingDivergedError, match=f"overflowed at {MAX_CONSECUTIVE_OVERFLOW_SKIPS} steps in a row"):
        for _ in range(MAX_CONSECUTIVE_OVERFLOW_SKIPS):
            update(1e36)
            guard.on_step_end(args, state, None, optimizer=optimizer)


def test_fp16_ppo_runs_with_loss_scaling(tmp_path, marker_policy_dir, reward_dir):
    """The recipe with fp16 (CPU fp16 autocast): its updates go through the loss scaler, logged per update, and
    the scaler's state is saved with each checkpoint for a resume."""
    out = tmp_path / "fp16"
    args = ppo_args(marker_policy_dir, reward_dir, out, 4)
    args[args.index("--bf16") + 1] = "false"
    run_recipe("ppo.py", *args, "--fp16", "true", "--dtype", "float32")
    (update,) = [e for e in json.loads((out / "log_history.json").read_text()) if "objective/kl" in e]
    assert update["fp16/loss_scale"] in (65536.0, 32768.0) and update["fp16/skipped_steps"] in (0, 1)
    assert update["ptx/loss"] > 0
    state = json.loads((out / "checkpoint-1" / "ppo_state.json").read_text())
    assert state["grad_scaler"]["scale"] == update["fp16/loss_scale"]


def test_ppo_ptx_leaves_out_the_rows_sft_held_out_of_the_same_file(tiny_llama_dir, data_cache):
    """PPO-ptx on SFT's own file trains on SFT's training rows only: the evaluation answers the held-out rows and
    compares with their reference answers. On another file every usable row is used."""
    from chatgpt_recipes.data.rows import column
    from chatgpt_recipes.data.sft import prepare_sft, sft_split
    from chatgpt_recipes.rl.inputs import ptx_training_rows

    alpaca = "data/alpaca_en_demo.json"
    prepared = prepare_sft(alpaca, "train", load_tokenizer(tiny_llama_dir), 256)
    config = SimpleNamespace(ptx_dataset_name=alpaca, dataset_name=alpaca, sft_eval_split_size=100, seed=42)
    file_rows = column(prepared.dataset, "row")
    trained = {file_rows[i] for i in ptx_training_rows(prepared, config, tiny_llama_dir)}  # no record: recomputed
    _, held_out = sft_split(alpaca, "train", 100, 42)
    assert len(held_out) == 100 and not trained & {row for row, _ in held_out}
    assert len(trained) == len(prepared.examples) - 100
    other = SimpleNamespace(**{**vars(config), "ptx_dataset_name": "data/chat_demo.jsonl"})
    assert ptx_training_rows(prepared, other, tiny_llama_dir) == prepared.examples

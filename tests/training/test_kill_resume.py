"""Interruptions: kill -9 at a random step and rerun the same command (the run resumes from the newest complete
checkpoint, loses at most one save interval, and ends with the same weights and per-step losses as an
uninterrupted run); a NaN loss stops the run naming the step; a full disk fails clearly and leaves the previous
checkpoint usable. Under DeepSpeed ZeRO-3 with 2 processes the kill and rerun match a 1-process run.

Tolerance: weights and logged losses within 1e-5 (relative and absolute) of the uninterrupted run. On this CPU the
resumed run is bitwise identical (data order, dropout RNG, optimizer and scheduler state all come back from the
checkpoint); the tolerance leaves room for non-deterministic GPU kernels.

The uninterrupted, killed and resumed runs are real processes started as a user starts them (`python
recipes/<recipe>.py ...`; the killed one in its own process group, so that the kill takes the whole process tree
down as a dying machine would). The NaN and disk-full tests run the recipe's `__main__` in this process, to see
the exception itself. The kill seed is printed; KILL_SEED=<seed> replays a failure.
"""

import contextlib
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from chatgpt_recipes.runtime.errors import CheckpointSaveError, RecipeError, TrainingDivergedError
from chatgpt_recipes.training.resume import checkpoint_problem, last_complete_checkpoint

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

MAX_STEPS, SAVE_STEPS = 6, 2
TOLERANCE = 1e-5
COMMON_ARGS = ["--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--save_strategy", "steps",
               "--logging_steps", "1", "--report_to", "none", "--seed", "7", "--save_total_limit", "2",
               "--bf16", "false"]


def _sft_args(models):
    return ["--model_name_or_path", models["gpt2"], "--dataset_name", str(REPO / "data" / "alpaca_en_demo.json"),
            "--max_train_samples", "24", "--eval_split_size", "0", "--max_length", "512",
            "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--sample_max_new_tokens", "2",
            "--lora_dropout", "0.1"]


def _reward_model_args(models):
    return ["--model_name_or_path", models["gpt2"], "--dataset_name", models["pairs"], "--eval_split_size", "4",
            "--max_length", "512", "--per_device_train_batch_size", "2", "--centering_samples", "4"]


def _ppo_args(models):
    """PPO of the tiny GPT-2 against a tiny reward model; 2 episodes per update, MAX_STEPS updates."""
    return ["--model_name_or_path", models["gpt2"], "--reward_model_path", models["reward_model"],
            "--max_train_prompts", str(4 * MAX_STEPS), "--eval_prompts", "2", "--max_prompt_length", "256",
            "--response_length", "6", "--total_episodes", str(2 * MAX_STEPS), "--per_device_train_batch_size", "2",
            "--local_rollout_forward_batch_size", "2", "--sample_every", "0"]


def _pretrain_args(models):
    """A fresh 2-layer GPT (dropout on) and its 512-token BPE, both trained from scratch on a small corpus."""
    return ["--dataset_name", models["corpus"], "--vocab_size", "512", "--block_size", "64",
            "--model_config_overrides", "n_layer=2,n_embd=64,n_positions=64", "--per_device_train_batch_size", "4",
            "--warmup_steps", "2", "--learning_rate", "1e-2", "--eval_strategy", "no", "--eval_on_start", "false",
            "--sample_max_new_tokens", "4"]


def _dpo_args(models):
    return ["--model_name_or_path", models["gpt2"], "--dataset_name", models["pairs"], "--eval_split_size", "4",
            "--max_length", "512", "--per_device_train_batch_size", "2"]


def _rloo_args(models):
    return ["--model_name_or_path", models["gpt2"], "--reward_model_path", models["reward_model"],
            "--max_train_prompts", str(4 * MAX_STEPS), "--eval_prompts", "2", "--max_prompt_length", "256",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "6"]


def _grpo_args(models):
    return ["--model_name_or_path", models["gpt2"], "--reward_model_path", models["reward_model"],
            "--max_train_prompts", str(4 * MAX_STEPS), "--eval_prompts", "2", "--max_prompt_length", "256",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "6"]


# recipe script -> its command-line arguments for a tiny run, the weights file it leaves in output_dir, the text
# its log prints once per optimizer step, and the logged value compared step by step with the uninterrupted run
RECIPES = {
    "sft_lora.py": dict(args=_sft_args, weights="adapter_model.safetensors", marker="'loss': ", metric="loss"),
    "reward_model.py": dict(args=_reward_model_args, weights="model.safetensors", marker="'loss': ", metric="loss"),
    "pretrain.py": dict(args=_pretrain_args, weights="model.safetensors", marker="'loss': ", metric="loss"),
    "dpo.py": dict(args=_dpo_args, weights=None, marker="'loss': ", metric="loss"),
    "rloo.py": dict(args=_rloo_args, weights=None, marker="'loss': ", metric="loss"),
    "grpo.py": dict(args=_grpo_args, weights=None, marker="'loss': ", metric="reward"),
    "ppo.py": dict(args=_ppo_args, weights="model.safetensors", marker="'objective/kl': ",
                   metric="objective/scores", extra_files=("value_model.safetensors", "ppo_state.json")),
}
RECIPES = {script: recipe for script, recipe in RECIPES.items() if (REPO / "recipes" / script).is_file()}
KILL_TESTS = sorted(RECIPES)


def recipe_args(script, models, output_dir, *extra):
    return [*RECIPES[script]["args"](models), *COMMON_ARGS, "--output_dir", str(output_dir), *extra]


def run_in_process(script, args):
    """The recipe's `__main__` in this process, as `python recipes/<script> <args>` would run it. A RecipeError,
    which `__main__` turns into an error line and exit status 2, is raised again here for the test to inspect."""
    argv = sys.argv
    sys.argv = [str(REPO / "recipes" / script), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code == 2 and isinstance(exit_.__context__, RecipeError):
            raise exit_.__context__
        raise
    finally:
        sys.argv = argv


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _kill_at_random_step(command, log: Path, rng: random.Random, marker: str) -> int:
    """Start the run, SIGKILL its process tree at a random point within the step after SAVE_STEPS to
    MAX_STEPS - 2 logged steps (so that most kills come after or during a save, sometimes in the middle of it,
    and always before the run ends, however fast the machine), and return how many steps it had logged."""
    target = rng.randint(SAVE_STEPS, MAX_STEPS - 2)
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                   start_new_session=True)
    deadline = time.time() + 240
    seen, step_started, step_time = 0, time.time(), 0.0
    try:
        while seen < target:
            assert process.poll() is None, f"the run ended before step {target}:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, "the run made no progress"
            logged = log.read_text().count(marker)
            if logged > seen:
                now = time.time()
                step_time = (now - step_started) / (logged - seen) if seen else step_time
                seen, step_started = logged, now
            time.sleep(0.01)
        # land anywhere in the next step, its save included; a slow first save makes step_time long, so the kill
        # comes at the latest when the next step is logged
        kill_at = time.time() + rng.uniform(0, step_time)
        while time.time() < kill_at and log.read_text().count(marker) <= target:
            time.sleep(0.005)
    finally:
        # torchrun (under accelerate launch) starts each rank in a session of its own: the group kill alone would
        # leave the ranks training on
        ranks = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        process.wait()
        psutil.wait_procs(ranks, timeout=30)
    return log.read_text().count(marker)


def _plant_half_written_checkpoint(output_dir: Path, extra_files=()) -> Path | None:
    """What a kill during the next save leaves: checkpoint-N+SAVE_STEPS with its weights, a truncated optimizer,
    no trainer_state.json (Trainer writes it last) and none of the files a recipe writes after Trainer's (PPO's
    value model). Planted when the random kill did not leave one already, so that every run checks that such a
    checkpoint is never picked."""
    newest = last_complete_checkpoint(output_dir, extra_files=extra_files)
    if newest is None:
        return None
    step = int(Path(newest).name.split("-")[1]) + SAVE_STEPS
    half = output_dir / f"checkpoint-{step}"
    if half.exists() or step >= MAX_STEPS:
        return None
    shutil.copytree(newest, half)
    for name in ("trainer_state.json", *extra_files):
        (half / name).unlink()
    _truncate(half / "optimizer.pt")
    return half


def _truncate(path: Path, keep: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _logged(directory: Path, key: str) -> dict:
    history = json.loads((directory / "log_history.json").read_text())
    return {entry["step"]: entry[key] for entry in history if key in entry}


@pytest.fixture(scope="module")
def tiny_models(tiny_gpt2_dir, tiny_llama_dir, tmp_path_factory):
    """The tiny models, short preference pairs made from the Alpaca sample (each answer against another's) and a
    small text corpus (the first 1,500 characters of 12 Wikipedia articles, one per line) for pretraining."""
    rows = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:40]
    pairs = [{"prompt": row["instruction"], "chosen": row["output"][:300], "rejected": rows[(i + 7) % 40]["output"][:120]}
             for i, row in enumerate(rows[:20])]
    data = tmp_path_factory.mktemp("data")
    pairs_file, corpus = data / "pairs.json", data / "corpus.txt"
    pairs_file.write_text(json.dumps(pairs))
    articles = (REPO / "data" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()[:12]
    corpus.write_text("\n".join(article[:1500] for article in articles) + "\n", encoding="utf-8")
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir, "pairs": str(pairs_file), "corpus": str(corpus),
            "reward_model": _tiny_reward_model(tiny_gpt2_dir, tmp_path_factory.mktemp("reward-model"))}


def _tiny_reward_model(base: str, directory: Path) -> str:
    """A reward model as recipes/reward_model.py leaves it (score head, the policy's tokenizer with its pad token,
    stage_info.json), with random weights: PPO's resume does not depend on what the rewards mean."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from chatgpt_recipes.data.templates import save_stage_info
    from chatgpt_recipes.modeling.loading import ensure_pad_token, load_tokenizer

    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(base, num_labels=1))
    ensure_pad_token(tokenizer, model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_stage_info(str(directory), "reward_model", "alpaca", eval_accuracy=0.75)
    return str(directory)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    """Output dir of each recipe's uninterrupted run (its own process, as the others), made on first use."""
    runs = {}

    def get(script):
        if script not in runs:
            output_dir = tmp_path_factory.mktemp("uninterrupted") / script
            command = [sys.executable, str(REPO / "recipes" / script), *recipe_args(script, tiny_models, output_dir)]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
            assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
            runs[script] = output_dir
        return runs[script]

    return get


@pytest.mark.parametrize("script", KILL_TESTS)
def test_kill_at_random_step_then_rerun_matches_uninterrupted_run(script, tiny_models, uninterrupted, tmp_path):
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))  # independent of seeding
    print(f"kill seed {seed} (replay with KILL_SEED={seed})")
    rng = random.Random(seed)
    recipe = RECIPES[script]
    reference_dir, output_dir = uninterrupted(script), tmp_path / "run"
    weights_file = recipe["weights"] or next(name for name in ("model.safetensors", "adapter_model.safetensors")
                                             if (reference_dir / name).is_file())
    command = [sys.executable, str(REPO / "recipes" / script),
               *recipe_args(script, tiny_models, output_dir)]

    steps_done = _kill_at_random_step(command, tmp_path / "killed.log", rng, recipe["marker"])
    assert not (output_dir / weights_file).exists(), "the run finished before it was killed"
    extra_files = recipe.get("extra_files", ())
    newest = last_complete_checkpoint(output_dir, extra_files=extra_files)
    planted = _plant_half_written_checkpoint(output_dir, extra_files)

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    if newest is None:
        assert "Resuming from" not in output and steps_done <= SAVE_STEPS
    else:
        assert f"Resuming from {newest}" in output, output[-3000:]
        assert steps_done - int(Path(newest).name.split("-")[1]) <= SAVE_STEPS  # at most one save interval lost
    if planted is not None:
        assert f"skipping incomplete checkpoint {planted}" in output

    reference_losses, resumed_losses = _logged(reference_dir, recipe["metric"]), _logged(output_dir, recipe["metric"])
    assert sorted(reference_losses) == list(range(1, MAX_STEPS + 1))
    assert resumed_losses.keys() == reference_losses.keys()  # every step logged once, the resumed ones included
    reference, resumed = load_file(reference_dir / weights_file), load_file(output_dir / weights_file)
    assert reference.keys() == resumed.keys()
    mismatches = [f"{recipe['metric']} at step {step}: {resumed_losses[step]} != {loss}"
                  for step, loss in reference_losses.items()
                  if resumed_losses[step] != pytest.approx(loss, rel=TOLERANCE, abs=TOLERANCE)]
    mismatches += [f"weights {name}" for name, tensor in reference.items()
                   if not torch.allclose(resumed[name], tensor, rtol=TOLERANCE, atol=TOLERANCE)]
    assert not mismatches, mismatches[:5]


def test_rerun_after_a_kill_during_the_final_save_trains_no_step_more(tiny_models, uninterrupted, tmp_path):
    """Killed after its last checkpoint (at max_steps) and before its final save, a run is rerun: it resumes from
    that checkpoint and trains nothing more (transformers' loop alone would take one step past max_steps), so its
    log and weights are the uninterrupted run's."""
    reference_dir, output_dir = uninterrupted("pretrain.py"), tmp_path / "run"
    final_outputs = shutil.ignore_patterns("model.safetensors", "*results.json", "log_history.json",
                                           "trainer_state.json", "report.md", "README.md", "*.png")
    shutil.copytree(reference_dir, output_dir,  # the checkpoints whole, the output dir without what a run saves last
                    ignore=lambda directory, names: final_outputs(directory, names) if directory == str(reference_dir)
                    else set())
    assert (output_dir / f"checkpoint-{MAX_STEPS}").is_dir()

    command = [sys.executable, str(REPO / "recipes" / "pretrain.py"),
               *recipe_args("pretrain.py", tiny_models, output_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert f"Resuming from {output_dir / f'checkpoint-{MAX_STEPS}'}" in result.stdout + result.stderr, \
        result.stdout[-3000:]

    reference_losses, resumed_losses = _logged(reference_dir, "loss"), _logged(output_dir, "loss")
    assert sorted(resumed_losses) == sorted(reference_losses) == list(range(1, MAX_STEPS + 1))
    assert resumed_losses == pytest.approx(reference_losses, rel=TOLERANCE, abs=TOLERANCE)
    reference, resumed = load_file(reference_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in reference.items())


def test_kill_under_deepspeed_zero3_then_rerun_matches_one_process(tiny_models, tmp_path):
    """ZeRO-3 with 2 processes (weights, gradients and Adam states sharded; DeepSpeed's CPU accelerator), full
    fine-tuning: kill -9 of the launcher's whole process tree at a random step, then the same command again. It
    resumes from the newest complete checkpoint (DeepSpeed's per-rank engine state) and ends with the per-step
    losses and the weights of an uninterrupted 1-process run, within the multi-process tolerance of
    tests/test_distributed.py (losses 1e-4 relative; weights 1e-4 absolute, gathered to 16-bit on save)."""
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"kill seed {seed} (replay with KILL_SEED={seed})")

    def args(output_dir: Path, per_device_batch: int) -> list[str]:
        return ["--model_name_or_path", tiny_models["llama"], "--use_peft", "false", "--dtype", "float32",
                "--dataset_name", str(REPO / "data" / "alpaca_en_demo.json"), "--max_train_samples", "192",
                "--eval_split_size", "0", "--eval_strategy", "no", "--max_length", "256", "--learning_rate", "1e-3",
                "--warmup_steps", "0", "--per_device_train_batch_size", str(per_device_batch),
                "--sample_max_new_tokens", "2", *COMMON_ARGS, "--output_dir", str(output_dir)]

    one_process, output_dir = tmp_path / "one", tmp_path / "zero3"
    reference = subprocess.run([sys.executable, str(REPO / "recipes" / "sft_lora.py"), *args(one_process, 4)],
                               cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-6000:]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "2", str(REPO / "recipes" / "sft_lora.py"),
               *args(output_dir, 2)]
    steps_done = _kill_at_random_step(command, tmp_path / "killed.log", random.Random(seed), "'loss': ")
    assert not (output_dir / "model.safetensors").exists(), "the run finished before it was killed"
    newest = last_complete_checkpoint(output_dir)
    print(f"killed after {steps_done} logged steps; newest complete checkpoint: {newest}")
    if newest is not None:  # checked now: the resumed run's save_total_limit rotates it away
        assert len(list(Path(newest).glob("global_step*/zero_pp_rank_*_optim_states.pt"))) == 2, "not ZeRO shards"

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    if newest is None:
        assert "Resuming from" not in output and steps_done <= SAVE_STEPS
    else:
        assert f"Resuming from {newest}" in output, output[-3000:]
        assert steps_done - int(Path(newest).name.split("-")[1]) <= SAVE_STEPS

    expected, resumed = _logged(one_process, "loss"), _logged(output_dir, "loss")
    assert sorted(expected) == list(range(1, MAX_STEPS + 1)) and resumed.keys() == expected.keys()
    mismatches = [f"loss at step {step}: {resumed[step]} != {loss}" for step, loss in expected.items()
                  if resumed[step] != pytest.approx(loss, rel=1e-4)]
    reference_weights, weights = load_file(one_process / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert reference_weights.keys() == weights.keys()
    mismatches += [f"weights {name}" for name, tensor in reference_weights.items()
                   if not torch.allclose(weights[name], tensor, atol=1e-4)]
    assert not mismatches, mismatches[:5]


def test_half_written_checkpoints_are_never_picked(uninterrupted, tmp_path):
    """Every way a save can be cut off (each file missing or truncated), on a real checkpoint: the older complete
    checkpoint is picked, where transformers' get_last_checkpoint picks the broken one."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted("sft_lora.py") / f"checkpoint-{MAX_STEPS}", output_dir / "checkpoint-6")
    source = output_dir / "checkpoint-6"
    assert checkpoint_problem(source) is None
    damages = {
        "no trainer_state.json": lambda d: (d / "trainer_state.json").unlink(),
        "truncated trainer_state.json": lambda d: _truncate(d / "trainer_state.json"),
        "no weights": lambda d: (d / "adapter_model.safetensors").unlink(),
        "truncated weights": lambda d: _truncate(d / "adapter_model.safetensors"),
        "weights header only": lambda d: _truncate(d / "adapter_model.safetensors", keep=200),
        "no optimizer": lambda d: (d / "optimizer.pt").unlink(),
        "truncated optimizer": lambda d: _truncate(d / "optimizer.pt"),
        "truncated scheduler": lambda d: _truncate(d / "scheduler.pt"),
        "no rng state": lambda d: (d / "rng_state.pth").unlink(),
        "empty directory": lambda d: [f.unlink() for f in d.iterdir()],
    }
    for what, damage in damages.items():
        broken = output_dir / "checkpoint-8"
        shutil.copytree(source, broken)
        damage(broken)
        assert checkpoint_problem(broken) is not None, what
        assert get_last_checkpoint(str(output_dir)) == str(broken)  # the library would resume from it
        assert last_complete_checkpoint(output_dir) == str(source), what
        shutil.rmtree(broken)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_models, tmp_path):
    """Step 1 runs at learning rate 0 (warmup) and is saved; from step 2 the learning rate is 5e29, which blows
    the weights up to inf/NaN."""
    output_dir = tmp_path / "run"
    args = recipe_args("sft_lora.py", tiny_models, output_dir, "--save_steps", "1", "--learning_rate", "1e30",
                       "--warmup_steps", "2", "--lr_scheduler_type", "constant_with_warmup", "--max_grad_norm", "0")
    with pytest.raises(TrainingDivergedError) as error:
        run_in_process("sft_lora.py", args)
    message = str(error.value)
    step = int(message.split("training diverged at step ")[1].split(":")[0])
    assert 2 <= step < MAX_STEPS
    good = last_complete_checkpoint(output_dir)
    assert good is not None
    assert f"last good checkpoint is {good}" in message
    saved = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))
    assert max(saved, default=0) < step  # nothing was saved at or after the step that went bad
    weights = load_file(Path(good) / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@contextlib.contextmanager
def _small_disk(path: Path, size_kb: int):
    """A tmpfs of `size_kb` mounted at `path` (needs root, as on the project's machines; skipped otherwise)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("checkpoints_that_fit,has_previous", [(1.5, True), (0.4, False)])
def test_disk_full_while_saving_fails_clearly_and_keeps_the_previous_checkpoint(
        checkpoints_that_fit, has_previous, tiny_models, uninterrupted, tmp_path):
    """A disk that holds 1.5 checkpoints: the guard refuses the second save before writing it. A disk that holds
    0.4 of one: the first save is cut off by ENOSPC and the error says no checkpoint exists yet."""
    checkpoint = uninterrupted("sft_lora.py") / f"checkpoint-{MAX_STEPS}"
    size_kb = int(checkpoints_that_fit * sum(f.stat().st_size for f in checkpoint.iterdir()) / 1024)
    with _small_disk(tmp_path / "disk", size_kb) as disk:
        output_dir = disk / "run"
        with pytest.raises(CheckpointSaveError) as error:
            run_in_process("sft_lora.py", recipe_args("sft_lora.py", tiny_models, output_dir, "--save_steps", "1",
                                                      "--save_total_limit", "5"))
        message = str(error.value)
        assert str(output_dir) in message and "disk" in message
        good = last_complete_checkpoint(output_dir)
        if has_previous:
            assert good == str(output_dir / "checkpoint-1")
            assert f"{good} is complete and a rerun resumes from it" in message
            assert not (output_dir / "checkpoint-2").exists()  # nothing half-written
            assert load_file(Path(good) / "adapter_model.safetensors")
        else:
            assert good is None and "no complete checkpoint exists yet" in message

"""Training that survives interruptions: resume from the newest *complete* checkpoint, stop on a NaN/inf loss
before it reaches a checkpoint, and fail clearly when the disk fills while saving.

Why not transformers' `get_last_checkpoint`: Trainer writes `checkpoint-N/` in place, file by file (weights,
optimizer, scheduler, RNG state, `trainer_state.json` last), and only then deletes old checkpoints. A kill or a full
disk in the middle leaves a `checkpoint-N/` with some of those files missing or truncated, and
`get_last_checkpoint` picks it because it only looks at the directory name. `last_complete_checkpoint` checks the
files instead (a truncated safetensors or torch zip file is detected from its own header or trailer).
"""

import errno
import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatgpt_recipes.modeling.loading import check_checkpoint_matches
from chatgpt_recipes.modeling.weight_files import safetensors_problem, torch_file_problem, weights_problem
from chatgpt_recipes.runtime.compat import no_step_past_max_steps
from chatgpt_recipes.runtime.errors import CheckpointSaveError, ConfigError, TrainingDivergedError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.training.time_budget import TimeBudget

logger = logging.getLogger(__name__)


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _non_finite_parameters(parameters) -> bool:
    tensors = [p.detach() for p in parameters if p.numel() > 0]
    if not tensors:
        return False
    norms = torch._foreach_norm(tensors)  # one reduction per tensor, a single host sync for all of them
    return not bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]).sum()))


# Dynamic loss scaling halves the scale at each overflow: 20 in a row take it from 65536 below 0.1, which no healthy
# fp16 run needs; it means every step overflows, i.e. training has diverged.
MAX_CONSECUTIVE_OVERFLOW_SKIPS = 20


class NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first step whose loss, gradients or updated weights are NaN or inf.

    Trainer's `logging_nan_inf_filter` (on by default) hides a NaN loss from the logs, and the optimizer step
    writes the NaN into the weights, which the next save would store. So after every optimizer step the
    trainable weights are checked (one fused norm, cheap next to the step), before Trainer logs or saves; the
    error leaves the newest checkpoint on disk as the last good one.

    With fp16 a non-finite gradient is normal: dynamic loss scaling skips that step (the weights stay as they were)
    and lowers the scale. Such an overflow skip (the optimizer's `step_was_skipped`: accelerate's for Trainer,
    ppo_trainer.Fp16LossScaling for PPO) is printed and counted, not stopped on; MAX_CONSECUTIVE_OVERFLOW_SKIPS
    in a row, or NaN/inf weights, are a divergence."""

    def __init__(self):
        self.consecutive_skips, self.skipped_since_log, self.skipped_steps = 0, 0, 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.fp16 and getattr(optimizer, "step_was_skipped", False):
            self.consecutive_skips += 1
            self.skipped_since_log += 1
            self.skipped_steps += 1
            if self.consecutive_skips >= MAX_CONSECUTIVE_OVERFLOW_SKIPS:
                self._stop(args, state, f"the fp16 gradients overflowed at {self.consecutive_skips} steps in a row "
                                        "(every step skipped by dynamic loss scaling)")
        else:
            self.consecutive_skips = 0
        if optimizer is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        elif model is not None:
            parameters = [p for p in model.parameters() if p.requires_grad]
        else:
            return
        if _non_finite_parameters(parameters):
            self._stop(args, state, "the weights hold NaN/inf after the optimizer step (a NaN or inf loss or "
                                    "gradient reached them)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                if self.skipped_since_log:
                    say(f"[fp16] step {state.global_step}: the logged {key} is {value}: a gradient overflow, "
                        f"{self.skipped_since_log} step(s) skipped and the loss scale lowered (dynamic loss "
                        f"scaling; {self.skipped_steps} skipped so far); training goes on", flush=True)
                    break
                self._stop(args, state, f"the logged {key} is {value}")
        self.skipped_since_log = 0

    @staticmethod
    def _stop(args, state, what: str):
        last_good = last_complete_checkpoint(args.output_dir, not args.save_only_model, quiet=True)
        raise TrainingDivergedError(
            f"training diverged at step {state.global_step}: {what}. Nothing was saved for this step; the last "
            f"good checkpoint is {last_good or 'none (no checkpoint was saved yet)'}. Lower learning_rate, set "
            f"max_grad_norm, use bf16 instead of fp16, or check the data around this step; rerunning the same "
            f"command resumes from the last good checkpoint.")


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class DiskSpaceGuard(TrainerCallback):
    """Before each checkpoint save, checks that the disk has room for one more checkpoint of the size of the
    last one (+10%), and stops with a clear error instead of writing a half checkpoint. The first save has no
    size to go by; a full disk there is explained by `explain_save_errors`."""

    def on_step_end(self, args, state, control, **kwargs):
        if not (control.should_save and args.should_save):
            return
        previous = last_complete_checkpoint(args.output_dir, not args.save_only_model, quiet=True)
        if previous is None:
            return
        needed = int(_tree_size(Path(previous)) * 1.1)
        free = shutil.disk_usage(args.output_dir).free
        if free < needed:
            raise CheckpointSaveError(
                errno.ENOSPC,
                f"not enough disk space to save checkpoint-{state.global_step} in {args.output_dir}: a checkpoint "
                f"takes about {needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free. Nothing was written; "
                f"{previous} is complete and a rerun resumes from it. Free space, lower save_total_limit, or "
                f"point output_dir at a larger disk.")


def guard_trainer(trainer) -> None:
    """Adds the NaN/inf and disk-space guards and the time budget (max_train_minutes) to a transformers/TRL trainer
    (once)."""
    present = {type(callback) for callback in trainer.callback_handler.callbacks}
    for guard in (NonFiniteLossGuard, DiskSpaceGuard):
        if guard not in present:
            trainer.add_callback(guard())
    if TimeBudget not in present:  # without a budget it still clears an earlier run's stop record
        trainer.add_callback(TimeBudget(getattr(trainer.args, "max_train_minutes", None)))


def checkpoint_problem(checkpoint: str | Path, require_training_state: bool = True,
                       extra_files: tuple[str, ...] = ()) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file missing or truncated), or None when it is complete.
    `require_training_state`: the optimizer, scheduler and RNG state must be there too (off for
    save_only_model checkpoints, which hold weights only). `extra_files`: files a trainer writes after
    Trainer's own (PPO's value model), which must be there and intact too."""
    checkpoint = Path(checkpoint)
    for name in extra_files:
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing (the save was interrupted)"
        problem = (safetensors_problem(path) if name.endswith(".safetensors") else
                   torch_file_problem(path) if name.endswith((".pt", ".pth", ".bin")) else None)
        if name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError):
                problem = f"{name} is truncated"
        if problem:
            return problem
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return "trainer_state.json is missing (the save was interrupted)"
    try:
        json.loads(state_file.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is truncated"
    problem = weights_problem(checkpoint)
    if problem:
        return problem
    if require_training_state and not any(checkpoint.glob("global_step*")):
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (checkpoint / name).is_file():
                return f"{name} is missing"
            if torch_file_problem(checkpoint / name):
                return torch_file_problem(checkpoint / name)
        rng_files = sorted(checkpoint.glob("rng_state*.pth"))
        if not rng_files:
            return "rng_state.pth is missing"
        for rng_file in rng_files:
            if torch_file_problem(rng_file):
                return torch_file_problem(rng_file)
    return None


def last_complete_checkpoint(output_dir: str | Path, require_training_state: bool = True,
                             extra_files: tuple[str, ...] = (), quiet: bool = False) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that is complete, or None. Incomplete ones (a save cut off by
    a kill or a full disk) are skipped with a logged reason and left in place: Trainer overwrites them when it
    reaches that step again."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = sorted(
        (int(match.group(1)), path) for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))
    )
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path, require_training_state, extra_files)
        if problem is None:
            return str(path)
        if quiet:
            continue
        message = f"[resume] skipping incomplete checkpoint {path}: {problem}"
        logger.warning(message)
        say(message, flush=True)
    return None


def resume_checkpoint(args) -> str | None:
    """The checkpoint a run resumes from: `args.resume_from_checkpoint` when set (it must be complete), else the
    newest complete checkpoint in `args.output_dir`, else None (a fresh start)."""
    needs_state = not getattr(args, "save_only_model", False)
    if args.resume_from_checkpoint:
        if not Path(args.resume_from_checkpoint).is_dir():
            raise ConfigError(f"resume_from_checkpoint: {args.resume_from_checkpoint} does not exist")
        problem = checkpoint_problem(args.resume_from_checkpoint, needs_state)
        if problem:
            raise ConfigError(f"resume_from_checkpoint: {args.resume_from_checkpoint} is incomplete: {problem}")
        return args.resume_from_checkpoint
    return last_complete_checkpoint(args.output_dir, needs_state)


@contextmanager
def explain_save_errors(output_dir: str):
    """Turns a disk-full error raised deep inside torch.save / safetensors / json while saving into one message
    that names the checkpoint a rerun will resume from."""
    try:
        yield
    except (CheckpointSaveError, TrainingDivergedError):
        raise
    except Exception as error:  # torch raises RuntimeError, safetensors its own SafetensorError, json OSError
        disk_full = (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                     or "No space left on device" in str(error) or "Disk quota exceeded" in str(error)
                     or (os.path.isdir(output_dir) and shutil.disk_usage(output_dir).free < 1 << 20))
        if not disk_full:
            raise
        last_good = last_complete_checkpoint(output_dir, quiet=True)
        raise CheckpointSaveError(
            errno.ENOSPC,
            f"the disk holding {output_dir} is full: a save was cut off ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}). The half-written checkpoint is ignored on "
            f"resume; {last_good or 'no complete checkpoint exists yet'} "
            f"{'is complete and a rerun resumes from it' if last_good else ''}. Free space, lower "
            f"save_total_limit, or point output_dir at a larger disk.") from error


def train_with_resume(trainer):
    """`trainer.train()` resumed from the newest complete checkpoint (or `resume_from_checkpoint`), with the
    NaN/inf and disk guards; rerunning an interrupted command loses at most one save interval."""
    guard_trainer(trainer)
    checkpoint = resume_checkpoint(trainer.args)
    if checkpoint:
        check_checkpoint_matches(checkpoint, trainer.model)
        say(f"Resuming from {checkpoint}", flush=True)
        no_step_past_max_steps(trainer)
    with explain_save_errors(trainer.args.output_dir):
        return trainer.train(resume_from_checkpoint=checkpoint)

"""A wall-clock budget for the training loop (`max_train_minutes`): training stops, with a checkpoint, before the
next step would pass it, so that a default run fits its time on slow hardware; rerunning continues."""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)


@dataclass
class TimeBudgetArguments:
    """A wall-clock budget for the training loop, so that a default run fits its time on slow hardware."""

    max_train_minutes: float | None = field(default=None, metadata={
        "help": "Stop training, with a checkpoint, before the next step would pass this many minutes (measured "
                "per-step time); the run prints the step it stopped at. Rerunning continues from there. Empty: "
                "no budget."})


# Written to output_dir when the budget stops a run (and removed when the next run there starts), so that whatever
# reads the run afterwards (the pipeline's checks) knows it trained fewer steps than it was set to.
STOP_RECORD = "time_budget_stop.json"


def budget_stop(output_dir: str | Path) -> dict | None:
    """What the time budget stopped in the run in `output_dir` (step, max_steps, minutes), or None."""
    path = Path(output_dir) / STOP_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


class TimeBudget(TrainerCallback):
    """Ends training once the mean step time says the next step would overrun `minutes`, and saves, so that a
    default meant for a fast CPU still ends in time (and with a checkpoint) on a slow one, having trained fewer
    steps; the stop is printed and recorded in output_dir (STOP_RECORD). Learning-rate schedules still run over
    max_steps. With `minutes` None it only clears an earlier run's record."""

    def __init__(self, minutes: float | None):
        self.budget_s = minutes * 60 if minutes else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.monotonic(), state.global_step
        if state.is_world_process_zero:
            (Path(args.output_dir) / STOP_RECORD).unlink(missing_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget_s is None:
            return
        elapsed, steps = time.monotonic() - self.start, state.global_step - self.first_step
        if steps and state.global_step < state.max_steps and elapsed * (steps + 1) / steps > self.budget_s:
            control.should_training_stop = control.should_save = True
            if state.is_world_process_zero:
                say(f"[time budget] stopping at step {state.global_step} of {state.max_steps}: "
                    f"{elapsed / steps:.1f} s/step here, and max_train_minutes={self.budget_s / 60:g} would be "
                    f"passed by the next step. Rerun the same command to continue, or raise max_train_minutes.",
                    flush=True)
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.output_dir) / STOP_RECORD).write_text(json.dumps(
                    {"stopped_at_step": state.global_step, "max_steps": state.max_steps,
                     "max_train_minutes": self.budget_s / 60}) + "\n")

"""A wall-clock budget for the training loop (`max_train_minutes`): training stops, with a checkpoint, before the
next step would pass it, so that a default run fits its time on slow hardware; rerunning continues."""

import logging
import time
from dataclasses import dataclass, field

from transformers import TrainerCallback

from chatgpt_recipes.output import say

logger = logging.getLogger(__name__)


@dataclass
class TimeBudgetArguments:
    """A wall-clock budget for the training loop, so that a default run fits its time on slow hardware."""

    max_train_minutes: float | None = field(default=None, metadata={
        "help": "Stop training, with a checkpoint, before the next step would pass this many minutes (measured "
                "per-step time); the run prints the step it stopped at. Rerunning continues from there. Empty: "
                "no budget."})


class TimeBudget(TrainerCallback):
    """Ends training once the mean step time says the next step would overrun `minutes`, and saves, so that a
    default meant for a fast CPU still ends in time (and with a checkpoint) on a slow one, having trained fewer
    steps; the report says so. Learning-rate schedules still run over max_steps."""

    def __init__(self, minutes: float):
        self.budget_s, self.stopped_at = minutes * 60, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.monotonic(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        elapsed, steps = time.monotonic() - self.start, state.global_step - self.first_step
        if steps and state.global_step < state.max_steps and elapsed * (steps + 1) / steps > self.budget_s:
            control.should_training_stop = control.should_save = True
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                say(f"[time budget] stopping at step {state.global_step} of {state.max_steps}: "
                    f"{elapsed / steps:.1f} s/step here, and max_train_minutes={self.budget_s / 60:g} would be "
                    f"passed by the next step. Rerun the same command to continue, or raise max_train_minutes.",
                    flush=True)



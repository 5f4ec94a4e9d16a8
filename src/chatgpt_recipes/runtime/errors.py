"""Every error a recipe ends on with one `error:` line (chatgpt_recipes.cli.run prints it, no traceback), and the
exit statuses. Imports nothing of ours and no ML library, so any module can raise these without loading TRL."""

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # 130: the shell's own status for a command ended by Ctrl-C (128 + SIGINT)


class RecipeError(Exception):
    """An error the user can fix (bad data, config, model path, a diverged run): `run` prints its message
    alone, without a traceback, and exits with status 2."""


class ConfigError(RecipeError, ValueError):
    """A bad recipe config: unknown key, bad value. The message names the file or flag."""


class DataError(RecipeError, ValueError):
    """Bad input data; the message names the file, row and field."""


class RowError(DataError):
    """A defect of one row (skipped and counted by the loaders; an error where rows are read one at a time)."""

    def __init__(self, where: str, field: str | None, reason: str):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where, self.field, self.reason = where, field, reason

    def __reduce__(self):  # picklable across dataset_num_proc workers
        return RowError, (self.where, self.field, self.reason)


class PromptFormatError(RecipeError, ValueError):
    """A prompt that the requested prompt format cannot render (a multi-turn chat in the Alpaca template)."""


class ModelLoadError(RecipeError, ValueError):
    """A model or tokenizer could not be loaded; the message says which and why."""


class LibraryMismatchError(RecipeError, RuntimeError):
    """An installed library is not the one a touch of its internals was written for."""


class TrainingDivergedError(RecipeError, RuntimeError):
    """The loss or the weights became NaN/inf; the message names the step and the last good checkpoint."""


class CheckpointSaveError(RecipeError, OSError):
    """A checkpoint could not be written (disk full); the message names the checkpoint that is still usable."""


class SelfInstructError(RecipeError):
    """Generation cannot go on: an endpoint that fails, a model whose completions never parse."""

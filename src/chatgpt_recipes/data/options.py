"""The data options every training recipe shares, as dataclass mixins: how fields are named in the file, how many
broken rows a file may have, where eval data comes from. `dataset_num_proc` is TRL's own field on
SFTConfig, RewardConfig, DPOConfig and PPOConfig; `NumProcArguments` adds the same field to the configs that lack
it (RLOO, pretraining)."""

from dataclasses import dataclass, field

from chatgpt_recipes.runtime.errors import ConfigError


def parse_columns(value) -> dict[str, str]:
    """{recipe field: file field} from a YAML mapping or `instruction=question,output=answer`."""
    if not value:
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            name, sep, column = item.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise ConfigError(f"columns: '{item}' is not FIELD=COLUMN (e.g. --columns instruction=question,"
                                  "output=answer)")
            pairs.append((name, column))
    mapping = {str(name).strip(): str(column).strip() for name, column in pairs}
    if len(set(mapping.values())) < len(mapping):
        raise ConfigError(f"columns: two fields read the same column: {mapping}")
    return mapping


@dataclass
class DataArguments:
    """Options of the shared data loaders (chatgpt_recipes.data.sft, chatgpt_recipes.data.preferences,
    chatgpt_recipes.rl.inputs)."""

    columns: dict | str | None = field(default=None, metadata={
        "help": "Read fields under other names: YAML {instruction: question, output: answer} or "
                "instruction=question,output=answer."})
    max_skipped_fraction: float = field(default=0.05, metadata={
        "help": "A file whose defective rows (skipped, listed in skipped_rows.jsonl) exceed this share is an error."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Separate eval data (a local file or hub id) instead of a carve-out of the training data."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split for eval data, e.g. test (of eval_dataset_name, else of dataset_name)."})

    def __post_init__(self):
        self.columns = parse_columns(self.columns)  # its range and the other values: chatgpt_recipes.cli
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()


@dataclass
class NumProcArguments:
    """TRL's `dataset_num_proc`, for the configs that do not have it."""

    dataset_num_proc: int | None = field(default=None, metadata={
        "help": "Worker processes for loading and tokenising the data."})

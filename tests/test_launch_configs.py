"""Every launcher config in accelerate_configs/ and every DeepSpeed config in ds_configs/ is read by the code that
consumes it (accelerate's launcher and plugins, transformers' DeepSpeed wrapper, DeepSpeed's own validator), so a
typo fails here, not in a user's cluster job. Nothing is launched: the launcher's own functions build the
environment a `accelerate launch` would hand the training processes, and the plugins are built from it."""

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
EXPECTED_LAUNCHERS = {"cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload",
                      "fsdp2", "multi_node_zero3"}
# accelerate copies each key of these sections onto the launch arguments under this prefix (launch.py)
SECTION_PREFIX = {"deepspeed_config": "", "fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_accelerate_config(path: Path, monkeypatch) -> dict:
    """Load `path` the way `accelerate launch --config_file path` does and build the DeepSpeed or FSDP plugin the
    training processes would build from the launcher's environment. Returns that environment."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    parser = launch_command_parser()
    known_options = {action.dest for action in parser._actions}
    for section, prefix in SECTION_PREFIX.items():
        for key in getattr(config, section) or {}:
            option = key if key.startswith(prefix) else prefix + key
            # the launcher would copy an unknown key onto its arguments and never read it
            assert option in known_options, f"{path.name}: {section}.{key} is not an `accelerate launch` option"

    monkeypatch.chdir(REPO)  # the DeepSpeed configs name ds_configs/*.json relative to the repository root
    args = parser.parse_args(["--config_file", str(path), "--main_process_port", str(_free_port()), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if defaults.distributed_type == DistributedType.DEEPSPEED:
        # as launch_command() does before handing over to the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if defaults.distributed_type == DistributedType.DEEPSPEED:
        plugin = DeepSpeedPlugin()  # reads the config file, refuses settings that clash with it
        assert plugin.zero_stage in (2, 3), f"{path.name}: ZeRO stage {plugin.zero_stage}"
    if defaults.distributed_type == DistributedType.FSDP:
        FullyShardedDataParallelPlugin()
    return env


def test_every_launcher_the_readme_names_exists():
    assert {path.stem for path in ACCELERATE_CONFIGS} >= EXPECTED_LAUNCHERS
    assert {path.stem for path in DS_CONFIGS} >= {"zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_config_is_accepted(path, monkeypatch):
    assert path.read_text().startswith("#"), f"{path.name}: starts with no comment saying what it is for"
    env = check_accelerate_config(path, monkeypatch)
    config = yaml.safe_load(path.read_text())
    if config["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / config["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file() and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ds_file.relative_to(REPO))
    if config["distributed_type"] == "FSDP":
        assert env["FSDP_VERSION"] == "2"


def test_zero3_launchers_are_zero3(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    for name, offload in [("deepspeed_zero3", "none"), ("deepspeed_zero3_offload", "cpu"), ("multi_node_zero3", "none")]:
        check_accelerate_config(REPO / "accelerate_configs" / f"{name}.yaml", monkeypatch)
        plugin = DeepSpeedPlugin()
        assert (plugin.zero_stage, plugin.offload_param_device, plugin.zero3_init_flag) == (3, offload, True), name


@pytest.mark.parametrize("edit, error", [
    ("num_procesess: 2\n", "unknown keys"),                                   # top-level typo
    ("deepspeed_config:\n  deepspeed_config_file: ds_configs/zero2.json\n  zero_stag: 2\n", "not an `accelerate"),
    ("deepspeed_config:\n  deepspeed_config_file: ds_configs/zero_2.json\n", "zero_2.json"),  # a missing file
    ("deepspeed_config:\n  deepspeed_config_file: ds_configs/zero2.json\n  zero_stage: 3\n",  # clashes with the file
     "will be ignored"),
])
def test_a_typo_in_a_launcher_config_fails(edit, error, tmp_path, monkeypatch):
    base = "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
    path = tmp_path / "bad.yaml"
    path.write_text(base + edit)
    with pytest.raises((ValueError, AssertionError, FileNotFoundError, OSError), match=error):
        check_accelerate_config(path, monkeypatch)


def _deepspeed_top_level_keys() -> set[str]:
    """The top-level keys DeepSpeed reads: the string constants of its config modules."""
    import deepspeed.runtime.activation_checkpointing.config as activation_config
    import deepspeed.runtime.constants as constants
    import deepspeed.runtime.zero.config as zero_config

    return {value for module in (constants, zero_config, activation_config)
            for name, value in vars(module).items() if name.isupper() and isinstance(value, str)}


def check_ds_config(config: str | dict, tmp_path) -> dict:
    """Fill a DeepSpeed config the way the HF Trainer does (TrainingArguments(deepspeed=...), then the
    model-dependent values) and validate the result with DeepSpeed's own config class. Returns the filled dict."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    raw = json.loads(Path(config).read_text()) if isinstance(config, (str, Path)) else config
    unknown = set(raw) - _deepspeed_top_level_keys()
    assert not unknown, f"{config}: {sorted(unknown)} are not DeepSpeed config keys"
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=config, bf16=True, use_cpu=True, report_to="none",
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-4,
                             max_grad_norm=1.0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4))
    args.hf_deepspeed_config.trainer_config_finalize(args, model, num_training_steps=10)
    filled = args.hf_deepspeed_config.config
    left = [key for key, value in _flatten(filled) if value == "auto"]
    assert not left, f"{config}: 'auto' values the HF Trainer does not fill: {left}"
    DeepSpeedConfig(filled)  # pydantic models with extra="forbid": a misspelt zero_optimization key raises
    return filled


def _flatten(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda path: path.name)
def test_deepspeed_config_is_accepted(path, tmp_path):
    filled = check_ds_config(str(path), tmp_path)
    # the "auto" values took the recipe's options
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["gradient_clipping"] == 1.0
    stage = filled["zero_optimization"]["stage"]
    assert stage == (2 if "zero2" in path.name else 3)
    if stage == 3:  # the next stage must find a loadable model, not only ZeRO shards
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in path.name:
        assert filled["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert filled["optimizer"]["params"]["lr"] == 1e-4


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["zero_optimization"].__setitem__("overlap_com", True), "overlap_com"),       # misspelt ZeRO key
    (lambda c: c.__setitem__("gradient_cliping", 1.0), "gradient_cliping"),                   # misspelt top key
    (lambda c: c.__setitem__("train_micro_batch_size_per_gpu", 8), "train_micro_batch_size"),  # clash with Trainer
    (lambda c: c["zero_optimization"].__setitem__("stage", "two"), "stage"),
])
def test_a_typo_in_a_deepspeed_config_fails(mutate, error, tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    mutate(config)
    with pytest.raises((ValueError, AssertionError), match=error):
        check_ds_config(config, tmp_path)


def test_deepspeed_configs_are_usable_from_the_recipe_command_line(tmp_path):
    """`--deepspeed ds_configs/zero2.json` on a recipe: the option parses into the recipe's own config class."""
    os.environ.setdefault("RECIPES_CACHE", str(tmp_path))
    from sft_lora import SFTRecipeConfig

    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    config, _ = parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml",
                             ["--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--output_dir", str(tmp_path)])
    assert config.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    assert config.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == config.per_device_train_batch_size


def test_slurm_script_builds_each_nodes_launch(monkeypatch):
    """scripts/slurm_multinode.sh on node 2 of 4: the command it would run parses as an `accelerate launch` for 32
    processes with node 2's rank and the main node's address (DRY_RUN prints instead of running)."""
    import shlex
    import subprocess

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "MAIN_PROCESS_IP": "10.0.0.7",
           "GPUS_PER_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm_multinode.sh"), "recipes/sft_lora.py",
                             "--max_steps", "5"], capture_output=True, text=True, env=env, check=True)
    command = shlex.split(result.stdout)
    assert command[:2] == ["accelerate", "launch"], result.stdout
    monkeypatch.chdir(REPO)
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(command[2:]))
    assert (args.num_machines, args.num_processes, int(args.machine_rank)) == (4, 32, 2)
    assert (args.main_process_ip, args.training_script, args.training_script_args) == \
        ("10.0.0.7", "recipes/sft_lora.py", ["--max_steps", "5"])
    assert defaults.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no ssh

"""The whole InstructGPT path in one command: [pretrain ->] SFT -> comparison data -> reward model -> PPO -> eval.

    # the embedded demo: SmolLM2-135M-Instruct on the bundled data, offline, 2-core CPU, about 27 minutes; its
    # summary.json checks that the reward model and PPO learnt (docs/rlhf.md)
    python recipes/pipeline.py
    # a real run: bigger model and data in the YAML, stages launched on 8 GPUs with DeepSpeed
    python recipes/pipeline.py --config my_pipeline.yaml --accelerate_config accelerate_configs/deepspeed_zero2.yaml
    # the race of PPO, PPO-ptx, RLOO, GRPO and DPO (docs/rlhf.md, "Which method"); --quick true: its short variant
    python recipes/pipeline.py --config recipes/configs/pipeline/compare_rl.yaml

Each stage is its recipe run as a subprocess through `accelerate launch` with the recipe's own command line:
the stage's options from the YAML (`sft: {max_steps: 20}` becomes `--max_steps 20`, `config: FILE` picks another
recipe YAML) plus the paths that chain the stages, which the pipeline sets: every stage writes
`<output_dir>/<stage>/`, SFT starts from `base_model` (or the pretrain output), the comparison data samples the
SFT output, the reward model starts from the SFT output (and trains on the comparison data when that stage runs),
PPO/PPO-ptx/RLOO/GRPO start from the SFT output with that reward model, DPO from the SFT output (on the comparison
data when that stage runs), the judge (a second reward model) from `base_model` on its own preference data, and
the evaluation compares base, SFT and each RL policy, judged by the reward model (and by the judge, or `judge_model`).
With `race: true` (recipes/configs/pipeline/compare_rl.yaml) the policies are then raced against SFT, with one reward
(`missing_eos_penalty` for every online stage) and one generation budget, by the reward model they optimised, the
judge none of them optimised, and the reference likelihood (chatgpt_recipes/evaluation/race.py: race.md, race.json,
race.png, and the reward-hacking flags in summary.json). The comparison data, the RL stages and the evaluation hold
out the rows SFT held out, so the evaluation's prompts were trained on by no stage and never seen by a reward model.
At the end, summary.json holds the demonstration's checks (see `pipeline_summary`).

Resuming: a stage that exits cleanly gets a completion marker (STAGE_DONE.json: its command, a fingerprint of its
options and of the stages before it, its duration). A rerun skips stages whose marker matches; an interrupted
stage reruns and resumes from its own checkpoints; a stage whose options (or an earlier stage) changed is rerun
from an empty directory, and so is everything after it. Output: report.md and plots in output_dir, one log per
stage in output_dir/logs.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from chatgpt_recipes.cli import exit_on_interrupt, parse_config, run
from chatgpt_recipes.evaluation.race import (ONLINE, RACE_METHODS, check_equal_budgets, check_same_reward,
                                             generation_budget, write_race)
from chatgpt_recipes.evaluation.reporting import evaluation_markdown, plot_model_comparison, plot_win_rates
from chatgpt_recipes.runtime.config import RECIPES_DIR
from chatgpt_recipes.runtime.errors import ConfigError, RecipeError
from chatgpt_recipes.training.time_budget import budget_stop

DONE, STARTED, SUMMARY = "STAGE_DONE.json", "STAGE_STARTED.json", "summary.json"
SCRIPTS = {"self_instruct": "self_instruct.py", "pretrain": "pretrain.py", "sft": "sft_lora.py",
           "comparisons": "comparison_data.py", "reward_model": "reward_model.py", "ppo": "ppo.py",
           "ppo_ptx": "ppo.py", "rloo": "rloo.py", "grpo": "grpo.py", "dpo": "dpo.py", "judge": "reward_model.py",
           "evaluate": "evaluate_model.py"}
# Each recipe's own YAML (its `run(...)` default), under which a stage's options apply: the race reads budgets and
# the judge's data from the two together
RECIPE_YAMLS = {"sft": "sft/smollm2_alpaca_lora.yaml", "ppo": "ppo/smollm2_alpaca_lora.yaml",
                "ppo_ptx": "ppo/smollm2_alpaca_lora.yaml",
                "rloo": "rloo/smollm2_alpaca_lora.yaml", "grpo": "grpo/smollm2_alpaca_lora.yaml",
                "dpo": "dpo/smollm2_dpo_demo_lora.yaml", "reward_model": "reward/smollm2_dpo_demo_lora.yaml",
                "judge": "reward/smollm2_dpo_demo_lora.yaml"}
POLICIES = RACE_METHODS  # stages whose output is an aligned policy: ppo, ppo_ptx, rloo, grpo, dpo
RL_STAGES = ("ppo", "ppo_ptx", "rloo", "grpo")  # sample prompts and optimise the reward model


@dataclass
class PipelineConfig:
    """Which stages run, on what, and each stage's own options (passed to its recipe's command line)."""

    output_dir: str = field(default="outputs/pipeline-smollm2")
    base_model: str = field(default="smollm2-135m-instruct", metadata={"help": "Model SFT starts from (and the "
                            "evaluation's base), unless a pretrain stage trains one."})
    stages: list[str] = field(default_factory=lambda: ["sft", "reward_model", "ppo", "evaluate"],
                              metadata={"help": f"In order, from {list(SCRIPTS)}."})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate launch --config_file."})
    self_instruct: dict = field(default_factory=dict, metadata={"help": "Options of recipes/self_instruct.py; its "
                                "output becomes the SFT data (opt-in: list it first in `stages`)."})
    pretrain: dict = field(default_factory=dict, metadata={"help": "Options of recipes/pretrain.py (YAML only)."})
    sft: dict = field(default_factory=dict, metadata={"help": "Options of recipes/sft_lora.py (YAML only)."})
    comparisons: dict = field(default_factory=dict, metadata={"help": "Options of recipes/comparison_data.py; its "
                              "pairs (the SFT model's samples against reference answers) become the RM's data."})
    reward_model: dict = field(default_factory=dict, metadata={"help": "Options of recipes/reward_model.py."})
    ppo: dict = field(default_factory=dict, metadata={"help": "Options of recipes/ppo.py (YAML only)."})
    ppo_ptx: dict = field(default_factory=dict, metadata={"help": "Options of recipes/ppo.py for a second PPO "
                          "stage (YAML only), e.g. with ptx_coef: PPO-ptx beside PPO in the race."})
    rloo: dict = field(default_factory=dict, metadata={"help": "Options of recipes/rloo.py (YAML only)."})
    grpo: dict = field(default_factory=dict, metadata={"help": "Options of recipes/grpo.py (YAML only)."})
    dpo: dict = field(default_factory=dict, metadata={"help": "Options of recipes/dpo.py (YAML only); it trains on "
                      "the comparison data when that stage runs."})
    judge: dict = field(default_factory=dict, metadata={"help": "Options of recipes/reward_model.py for the race's "
                        "judge: a second reward model, from base_model, on human preference data no other stage "
                        "trains on (its recipe YAML's data/dpo_en_demo.json unless set); never the comparison data."})
    evaluate: dict = field(default_factory=dict, metadata={"help": "Options of recipes/evaluate_model.py."})
    judge_model: str | None = field(default=None, metadata={"help": "A reward model (directory or hub id) that "
                                    "judges every model's answers in the evaluation instead of a judge stage's "
                                    "(leave judge out of stages), e.g. a public reward model on a GPU machine."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the reward of an "
                                              "answer that does not end within its length cap, in every online RL "
                                              "stage alike (PPO's own option; RLOO and GRPO apply it in their reward "
                                              "function); 0: no penalty; null: each stage's own. The race needs it."})
    use_cpu: bool = field(default=False, metadata={"help": "Run every stage on the CPU."})
    race: bool = field(default=False, metadata={"help": "After the evaluation, race the policy stages (ppo, "
                       "ppo_ptx, rloo, grpo, dpo) against SFT by the reward model, the judge and the reference likelihood: "
                       "race.md/.json/.png (chatgpt_recipes.evaluation.race); their rewards and generation budgets "
                       "must be equal."})
    quick: bool = field(default=False, metadata={"help": "Apply `quick_options` over the stages' options and write "
                        "to <output_dir>-quick: the YAML's shorter variant."})
    quick_options: dict = field(default_factory=dict, metadata={"help": "Per stage, the options --quick changes "
                                "(YAML only)."})

def stage_paths(config: PipelineConfig) -> dict[str, dict]:
    """The options the pipeline sets for each stage so that outputs feed the next stage by path."""
    out = {stage: os.path.join(config.output_dir, stage) for stage in config.stages}
    base = out.get("pretrain", config.base_model)
    sft = out.get("sft", base)
    generated = (os.path.join(out["self_instruct"], config.self_instruct.get("output_name", "instructions.jsonl"))
                 if "self_instruct" in out else None)
    comparisons = os.path.join(out["comparisons"], "comparisons.jsonl") if "comparisons" in out else None
    wiring = {"self_instruct": {}, "pretrain": {},
              "sft": {"model_name_or_path": base, "dataset_name": generated},
              "comparisons": {"model_name_or_path": sft},
              "reward_model": {"model_name_or_path": sft, "dataset_name": comparisons},
              "ppo": {"model_name_or_path": sft, "reward_model_path": out.get("reward_model")},
              "dpo": {"model_name_or_path": sft, "dataset_name": comparisons},
              "judge": {"model_name_or_path": base}}
    for stage in RL_STAGES:
        wiring[stage] = {"model_name_or_path": sft, "reward_model_path": out.get("reward_model")}
    models = [f"base={base}"] + ([f"sft={sft}"] if "sft" in out else []) + [f"{s}={out[s]}" for s in POLICIES
                                                                             if s in out]
    wiring["evaluate"] = {"models": models, "reward_model": out.get("reward_model"),
                          "judge_model": config.judge_model or out.get("judge")}
    return {stage: {**{k: v for k, v in wiring[stage].items() if v is not None}, "output_dir": out[stage]}
            for stage in config.stages}


def derived_defaults(config: PipelineConfig, stage: str) -> dict:
    """Options that follow SFT's and the reward model's unless the stage sets them: the comparison data, the RL
    stages and the evaluation read SFT's data file (the rows SFT held out they read from its sft_split.json, not from
    options), and the evaluation reports the RM's accuracy on the pairs it held out as the RM's stage_info.json
    recorded it (the split size is passed on for a reward model with no such record)."""
    sft, rm = config.sft, config.reward_model
    wiring = stage_paths(config)
    sft_data = wiring.get("sft", {}).get("dataset_name", sft.get("dataset_name"))
    if stage in ("comparisons", *RL_STAGES) and "sft" in config.stages and "dataset_name" not in getattr(config,
                                                                                                        stage):
        derived = {"dataset_name": sft_data, "seed": sft.get("seed")}
    elif stage == "evaluate":
        trained_rm = stage_settings(config, "reward_model") if "reward_model" in config.stages else rm
        derived = {"dataset_name": sft_data, "seed": sft.get("seed"), "max_length": sft.get("max_length"),
                   "preference_dataset": wiring.get("reward_model", {}).get("dataset_name",
                                                                            trained_rm.get("dataset_name")),
                   "preference_eval_split_size": trained_rm.get("eval_split_size"),
                   "kl_reference": "sft" if "sft" in config.stages else None}
        if "judge" in config.stages and not config.judge_model:  # the judge's accuracy on the rows it held out
            judge = stage_settings(config, "judge")
            derived.update(judge_preference_dataset=judge.get("dataset_name"),
                           judge_preference_eval_split_size=judge.get("eval_split_size"))
    elif stage == "judge":
        derived = {"seed": sft.get("seed")}  # the evaluation splits the judge's data with this seed too
    else:
        derived = {}
    if stage in ONLINE and config.missing_eos_penalty is not None:
        derived["missing_eos_penalty"] = config.missing_eos_penalty
    if stage in (*RL_STAGES, "evaluate") and "reward_model" in config.stages and rm.get("system_prompt") is not None:
        # prompts rendered as the reward model learnt them: its system prompt, in the chat format that has one
        derived.update(system_prompt=rm["system_prompt"], prompt_format=rm.get("prompt_format", "chat"))
    return {key: value for key, value in derived.items() if value is not None}


def stage_settings(config: PipelineConfig, stage: str) -> dict:
    """A stage's settings as its recipe will see them: its recipe YAML (`config:` in its options, else the recipe's
    own) under the pipeline's derived options and the stage's options."""
    options = getattr(config, stage)
    recipe_yaml = options.get("config") or (RECIPES_DIR / "configs" / RECIPE_YAMLS[stage] if stage in RECIPE_YAMLS
                                            else None)
    defaults = yaml.safe_load(Path(recipe_yaml).read_text()) or {} if recipe_yaml else {}
    derived = derived_defaults(config, stage) if stage != "evaluate" else {}
    return {**defaults, **derived, **options}


def training_data(config: PipelineConfig) -> dict[str, str]:
    """The data file each stage other than the judge trains on (PPO's and PPO-ptx's pretraining mix included)."""
    wiring, data = stage_paths(config), {}
    for stage in config.stages:
        settings = stage_settings(config, stage) if stage in RECIPE_YAMLS else getattr(config, stage)
        if stage in ("sft", "reward_model", "dpo"):
            data[stage] = wiring[stage].get("dataset_name") or settings.get("dataset_name")
        elif stage in ("ppo", "ppo_ptx") and settings.get("ptx_coef"):
            data[stage] = settings.get("ptx_dataset_name")
    return {stage: str(path) for stage, path in data.items() if path}


def launcher_processes(config: PipelineConfig) -> int:
    """How many processes `accelerate launch` gives each stage: the accelerate config's num_processes (1 when it
    names none), 1 with use_cpu, else one per GPU (accelerate's default without a config file)."""
    if config.accelerate_config:
        return int((yaml.safe_load(Path(config.accelerate_config).read_text()) or {}).get("num_processes", 1))
    if config.use_cpu:
        return 1
    return max(torch.cuda.device_count(), 1)


def command_line(options: dict) -> list[str]:
    """A stage's options as its recipe's command line; `key: null` sets the option to none (over the recipe
    YAML's value), e.g. `max_train_minutes: null` for no time budget."""
    args = []
    for key, value in options.items():
        args.append(f"--{key}")
        if value is None:
            args.append("none")
        elif isinstance(value, list):
            args += [str(v) for v in value]
        else:
            args.append(str(value).lower() if isinstance(value, bool) else str(value))
    return args


def launch_command(config: PipelineConfig, script: str, args: list[str]) -> list[str]:
    # --quiet: a failing stage shows its own error, without accelerate's traceback of the launch after it
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if config.accelerate_config:
        launcher += ["--config_file", config.accelerate_config]
    elif config.use_cpu:  # accelerate's quiet CPU defaults
        launcher += ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]
    return launcher + [str(RECIPES_DIR / script)] + args


def run_stage(name: str, command: list[str], log_path: Path) -> float:
    """Run one stage, its output shown and saved to its log; a failure names the stage and the log. Returns the
    peak resident memory (MB) of the largest of its processes (Linux's wait4 counts the launcher's children)."""
    print(f"\n[pipeline] === {name} ===\n[pipeline] {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"[pipeline] stage '{name}' failed (exit code {process.returncode}); its output is in "
                         f"{log_path}. Fix the cause and rerun: finished stages are skipped.")
    return usage.ru_maxrss / 1024


def read_marker(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(config: PipelineConfig):
    if config.quick:
        for stage, options in config.quick_options.items():
            if not isinstance(getattr(config, stage, None), dict):
                raise ConfigError(f"quick_options: '{stage}' is not a stage with options ({list(SCRIPTS)})")
            setattr(config, stage, {**getattr(config, stage), **options})
        config.output_dir = config.output_dir.rstrip("/") + "-quick"
    unknown = [stage for stage in config.stages if stage not in SCRIPTS]
    if unknown or len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"stages: {config.stages} must be distinct names from {list(SCRIPTS)}")
    missing = [s for s in config.stages if not (RECIPES_DIR / SCRIPTS[s]).is_file()]
    if missing:
        raise ConfigError(f"stages {missing} have no recipe in this checkout ({[SCRIPTS[s] for s in missing]}); "
                          "remove them from `stages`")
    wiring = stage_paths(config)
    budget = check_race(config) if config.race else None
    check_stage_options(config, wiring)
    os.makedirs(os.path.join(config.output_dir, "logs"), exist_ok=True)

    fingerprint, upstream_changed, summary = "", False, []
    for stage in config.stages:
        options = {**derived_defaults(config, stage), **getattr(config, stage)}
        clash = sorted(set(options) & set(wiring[stage]))
        if clash:
            raise ConfigError(f"{stage}: {clash} are set by the pipeline to chain the stages; set output_dir or "
                              "base_model of the pipeline instead")
        args = command_line({**options, **wiring[stage]})
        command = launch_command(config, SCRIPTS[stage], args)
        fingerprint = hashlib.sha256(json.dumps([fingerprint, stage, args]).encode()).hexdigest()[:16]
        stage_dir = Path(wiring[stage]["output_dir"])
        done = read_marker(stage_dir / DONE)
        if done.get("fingerprint") == fingerprint and not upstream_changed:
            print(f"[pipeline] {stage}: finished earlier ({done['seconds']:.0f} s), skipped", flush=True)
            summary.append({**done, "status": "skipped (finished earlier)"})
            continue
        started_as = read_marker(stage_dir / STARTED).get("fingerprint")
        if stage_dir.exists() and not done and not started_as and any(stage_dir.iterdir()):
            raise ConfigError(f"{stage_dir} exists but was not written by this pipeline; move it away or set "
                              "another output_dir")
        if stage_dir.exists() and (done or started_as != fingerprint):
            print(f"[pipeline] {stage}: options or an earlier stage changed since {stage_dir} was written: "
                  "starting it from scratch", flush=True)
            shutil.rmtree(stage_dir)
        upstream_changed = True  # every later stage consumes this one's new output
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / STARTED).write_text(json.dumps({"fingerprint": fingerprint}))
        started = time.time()
        try:
            peak_rss_mb = run_stage(stage, command, Path(config.output_dir) / "logs" / f"{stage}.log")
        except KeyboardInterrupt:  # the stage saves its checkpoints in its own folder: name the one to resume from
            exit_on_interrupt(str(stage_dir))
        except SystemExit:
            write_pipeline_report(config, summary + [{"stage": stage, "status": "failed, see logs/",
                                                      "seconds": time.time() - started}])
            raise
        marker = {"stage": stage, "fingerprint": fingerprint, "command": command, "seconds": time.time() - started,
                  "peak_rss_mb": peak_rss_mb, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        (stage_dir / DONE).write_text(json.dumps(marker, indent=1))
        summary.append({**marker, "status": "ran"})
        write_pipeline_report(config, summary)
    checks = pipeline_summary(config)
    if config.race:
        methods = [stage for stage in config.stages if stage in RACE_METHODS]
        records = {stage: read_marker(Path(wiring[stage]["output_dir"]) / DONE) for stage in methods}
        budgets = {stage: generation_budget(stage, stage_settings(config, stage), launcher_processes(config))
                   for stage in methods}
        start = "sft" if "sft" in config.stages else "base"
        checks["race"] = write_race(Path(config.output_dir), methods, start, budgets, budget, records,
                                    {name: path for name, path in (spec.split("=", 1) for spec in
                                                                   wiring["evaluate"]["models"])})
        (Path(config.output_dir) / SUMMARY).write_text(json.dumps(checks, indent=1) + "\n")
    path = write_pipeline_report(config, summary, checks)
    print(f"\n[pipeline] all {len(config.stages)} stages finished; report: {path}", flush=True)
    if checks:
        print(f"[pipeline] {Path(config.output_dir) / SUMMARY}:\n" + checks_markdown(checks), flush=True)


def pipeline_yaml() -> str:
    """The pipeline YAML this run reads (--config, else the default), to name it in errors."""
    args = sys.argv[1:]
    if "--config" in args and args.index("--config") + 1 < len(args):
        return args[args.index("--config") + 1]
    return str(RECIPES_DIR / "configs" / "pipeline" / "smollm2_demo.yaml")


def check_stage_options(config: PipelineConfig, wiring: dict[str, dict]) -> None:
    """Before the first stage runs, every stage's options as its recipe will read them, parsed and checked by the
    recipe's own parser and checks (chatgpt_recipes.cli): an unknown or misspelt key (never taken as an abbreviation
    of an option), a bad value, a library's refusal. The error names the pipeline YAML and the stage's key. The
    paths earlier stages will write are left out of the check: they do not exist yet, or hold an unfinished run."""
    source, rendering = pipeline_yaml(), {}
    for stage in config.stages:
        script = SCRIPTS[stage]
        recipe = importlib.import_module(script.removesuffix(".py"))
        names = {item.name for options in recipe.OPTIONS for item in dataclasses.fields(options)} | {"config"}
        for key, options in ((stage, getattr(config, stage)), (f"quick_options.{stage}",
                                                               config.quick_options.get(stage) or {})):
            unknown = sorted(set(options) - names)
            if unknown:
                raise ConfigError(f"{source}: {key}: {unknown} not option(s) of recipes/{script} (options are never "
                                  f"abbreviated; `python recipes/{script} --help` lists them)")
        outputs = [os.path.join(config.output_dir, other) for other in config.stages if other != stage]
        options = {**derived_defaults(config, stage), **getattr(config, stage), **wiring[stage]}
        args = command_line({key: value for key, value in options.items()
                             if key == "output_dir" or not any(str(value).startswith(out) for out in outputs)})
        try:
            parsed = parse_config(recipe.OPTIONS, recipe.DEFAULT_CONFIG, args, flags_from=f"{source}: {stage}",
                                  quiet=True)
        except RecipeError as error:
            message = str(error)
            raise ConfigError(message if source in message else f"{source}: {stage}: {message}") from None
        rendering[stage] = getattr(parsed[0], "system_prompt", None)
    # the RL stages and the evaluation score prompts with the reward model: rendered as it was trained on them
    for stage in [s for s in config.stages if s in (*RL_STAGES, "evaluate") and "reward_model" in rendering]:
        if rendering[stage] != rendering["reward_model"]:
            raise ConfigError(f"{source}: {stage}.system_prompt is {rendering[stage]!r} but reward_model.system_prompt "
                              f"is {rendering['reward_model']!r}: the reward model scores prompts rendered as it was "
                              "trained on them (leave it unset in the stage: it follows reward_model's)")


def check_race(config: PipelineConfig) -> dict:
    """Before any stage runs: the race needs the reward model, a judge (the judge stage or judge_model) whose data no
    stage trains on, two or more policy stages and the evaluation, whose KL is measured to the model they start
    from (sft, or base without an SFT stage); its online methods must optimise one reward (one treatment of an
    answer that does not end) and sample alike (answers counted over all processes and iterations). Returns that
    generation budget."""
    methods = [stage for stage in config.stages if stage in RACE_METHODS]
    needed = [stage for stage in ("reward_model", "evaluate") if stage not in config.stages]
    if needed or len(methods) < 2:
        raise ConfigError(f"race: stages must include reward_model, evaluate and two or more of "
                          f"{list(RACE_METHODS)} (missing {needed or 'policy stages'})")
    if "judge" not in config.stages and not config.judge_model:
        raise ConfigError("race: add the judge stage (a reward model on human preferences no stage trains on) to "
                          "stages, or name a reward model with judge_model")
    if "judge" in config.stages and config.judge_model:
        raise ConfigError(f"race: judge_model ({config.judge_model}) replaces the judge stage: remove judge from stages")
    if "judge" in config.stages:
        judge_data = stage_settings(config, "judge").get("dataset_name")
        trained_on = [stage for stage, data in training_data(config).items() if data == judge_data]
        if trained_on:
            raise ConfigError(f"race: the judge's data {judge_data} is trained on by {trained_on}: give the judge "
                              "preference data that no stage of the race trains on")
    start = "sft" if "sft" in config.stages else "base"
    if config.evaluate.get("kl_reference", derived_defaults(config, "evaluate").get("kl_reference")) != start:
        raise ConfigError(f"race: set evaluate.kl_reference to {start}, the model the policies start from (the race "
                          "measures their KL to it)")
    online = [stage for stage in methods if stage in ONLINE]
    if online and config.missing_eos_penalty is None:
        raise ConfigError("race: set missing_eos_penalty (0 for none) so that every online method optimises the same "
                          "reward for an answer that does not end")
    treatments = {}
    for stage in online:
        settings = stage_settings(config, stage)
        treatments[stage] = {"missing_eos_penalty": settings.get("missing_eos_penalty"),
                             "mask_truncated_completions": bool(settings.get("mask_truncated_completions", False))}
    check_same_reward(treatments)
    processes = launcher_processes(config)
    return check_equal_budgets({stage: generation_budget(stage, stage_settings(config, stage), processes)
                                for stage in methods})


# What the pipeline's demonstration must show (issue: "RLHF that visibly learns"): a reward model well above chance
# on pairs it never trained on, and RL policies that it prefers to the SFT policy on prompts nobody trained on.
MIN_RM_ACCURACY, MIN_RM_PAIRS, MIN_WIN_RATE, MIN_PROMPTS = 0.65, 100, 0.60, 64
# A check measures what these stages trained (and, for a policy's checks, the policy stage): one that a time budget
# stopped early did not do the work the check is sized for, so the check is "not reached" rather than failed.
UPSTREAM_TRAINING = ("pretrain", "sft", "reward_model")
# The KL bound holds where the method maximises E[r] - kl_coef * KL on the raw rewards: PPO and RLOO (TRL puts the
# KL into the reward of both; RLOO with normalize_advantages off, its default). Not for these:
KL_COEF_KEYS = {"ppo": ("ppo_results.json", "kl_coef"), "rloo": ("rloo_results.json", "kl_coef")}
KL_BOUND_DOES_NOT_HOLD = {
    "ppo_ptx": "PPO-ptx adds a language-model loss on other text, so it may move further than its reward gain pays",
    "grpo": "GRPO divides rewards by the group's spread and puts the KL in the loss, not in the reward"}


def pipeline_summary(config: PipelineConfig) -> dict:
    """summary.json from the evaluation stage: the RM's held-out accuracy, and for each RL policy its RM-judged
    win-rate against SFT, its KL to SFT and its answer length over SFT's, all on the same held-out prompts, each
    with its check. KL bound: PPO and RLOO maximise E[r] - kl_coef * KL(policy || SFT), which is E_sft[r] for the SFT
    policy itself, so a policy that improved that objective has KL <= (E[r] - E_sft[r]) / kl_coef, both rewards
    measured by the same RM on the same prompts. A KL above it means the policy moved further than its reward
    gain pays for: the penalty is not holding it. The bound is not applied where it does not hold
    (KL_BOUND_DOES_NOT_HOLD: PPO-ptx, GRPO, RLOO with normalize_advantages; `<policy>_kl_bound_not_applied` says
    why). With a missing_eos_penalty the optimised reward also pays for ending answers, which the RM's gain leaves
    out, so a KL above the bound is then a warning sign rather than a proof. A check whose stages a time budget
    stopped early is marked "not reached" (passed: null) with the stop, and all_passed is false."""
    out = Path(config.output_dir)
    results_file = out / "evaluate" / "eval_results.json"
    if not results_file.is_file():
        return {}
    results = json.loads(results_file.read_text())
    models, wins, summary, checks = results["models"], results.get("win_rates", {}), {}, []
    # (name, value, threshold, passed, the training stages whose result it measures)
    rm = results.get("reward_model_accuracy")
    if rm:
        summary.update(rm_eval_accuracy=rm["accuracy"], rm_eval_accuracy_ci=[rm["ci_low"], rm["ci_high"]],
                       rm_eval_pairs=rm["pairs"])
        checks += [("rm_eval_accuracy", rm["accuracy"], f">= {MIN_RM_ACCURACY}", rm["accuracy"] >= MIN_RM_ACCURACY,
                    UPSTREAM_TRAINING),
                   ("rm_eval_pairs", rm["pairs"], f">= {MIN_RM_PAIRS}", rm["pairs"] >= MIN_RM_PAIRS, ())]
    for policy in [p for p in POLICIES if p in models and "sft" in models]:
        win = wins.get(f"{policy} vs sft")
        if win is None:
            continue
        gain = models[policy]["rm_score_mean"] - models["sft"]["rm_score_mean"]
        summary.update({f"{policy}_win_rate_vs_sft": win["win_rate"],
                        f"{policy}_win_rate_vs_sft_ci": [win["ci_low"], win["ci_high"]],
                        f"{policy}_eval_prompts": win["n"], f"{policy}_reward_gain_vs_sft": gain,
                        f"{policy}_length_ratio": models[policy]["answer_tokens"] / max(models["sft"]["answer_tokens"],
                                                                                        1e-9)})
        checks += [(f"{policy}_win_rate_vs_sft", win["win_rate"], f">= {MIN_WIN_RATE}",
                    win["win_rate"] >= MIN_WIN_RATE, (*UPSTREAM_TRAINING, policy)),
                   (f"{policy}_eval_prompts", win["n"], f">= {MIN_PROMPTS}", win["n"] >= MIN_PROMPTS, ())]
        kl = models[policy].get("kl_to_reference")
        if kl is not None and results.get("kl_reference") == "sft":
            summary[f"{policy}_kl_to_sft"] = kl
            stage_results = out / policy / KL_COEF_KEYS.get(policy, ("", ""))[0]
            kl_coef = (json.loads(stage_results.read_text()).get("kl_coef")
                       if policy in KL_COEF_KEYS and stage_results.is_file() else None)
            if policy == "rloo" and policy in config.stages and stage_settings(config, policy).get(
                    "normalize_advantages"):
                kl_coef = None
                summary[f"{policy}_kl_bound_not_applied"] = ("RLOO with normalize_advantages divides the "
                                                             "advantages by their spread: not the raw rewards")
            if policy in KL_BOUND_DOES_NOT_HOLD:
                summary[f"{policy}_kl_bound_not_applied"] = KL_BOUND_DOES_NOT_HOLD[policy]
            if kl_coef:
                bound = max(gain, 0.0) / kl_coef
                summary.update({f"{policy}_kl_coef": kl_coef, f"{policy}_kl_bound": bound})
                checks.append((f"{policy}_kl_to_sft", kl, f"<= {bound:.3g} (reward gain / kl_coef)", kl <= bound,
                               (*UPSTREAM_TRAINING, policy)))
    stops = budget_stops(config)
    summary["checks"] = []
    for name, value, threshold, passed, measures in checks:
        cut = [stops[stage] for stage in measures if stage in stops]
        summary["checks"].append({"name": name, "value": value, "threshold": threshold,
                                  "passed": None if cut else bool(passed), "reached": not cut,
                                  **({"not_reached_because": "; ".join(cut)} if cut else {})})
    summary["time_budget_stops"] = stops
    summary["all_passed"] = all(check["passed"] is True for check in summary["checks"])
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def budget_stops(config: PipelineConfig) -> dict[str, str]:
    """The stages that their time budget (max_train_minutes) stopped before max_steps, each with what it trained."""
    stops = {}
    for stage in config.stages:
        stop = budget_stop(Path(config.output_dir) / stage)
        if stop:
            stops[stage] = (f"{stage} stopped by max_train_minutes={stop['max_train_minutes']:g} at step "
                            f"{stop['stopped_at_step']} of {stop['max_steps']}")
    return stops


def checks_markdown(summary: dict) -> str:
    def verdict(check):
        if not check.get("reached", True):
            return f"not reached: {check['not_reached_because']}"
        return "yes" if check["passed"] else "**no**"

    lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']:.3g} | {c['threshold']} | {verdict(c)} |" for c in summary["checks"]]
    intervals = [f"{key[:-3]}: {value[0]:.1%} – {value[1]:.1%}" for key, value in summary.items()
                 if key.endswith("_ci")]
    if intervals:
        lines += ["", "95% intervals: " + "; ".join(intervals) + "."]
    return "\n".join(lines)


def write_pipeline_report(config: PipelineConfig, summary: list[dict], checks: dict | None = None) -> str:
    """report.md: the checks of summary.json, each stage's status, time and report, the training curves (for PPO and
    RLOO: reward, KL, entropy and length per update), the across-stages evaluation with its plots."""
    out = Path(config.output_dir)
    lines = ["# Pipeline: " + " → ".join(config.stages), ""]
    if checks:
        lines += ["## Checks (summary.json)", "", checks_markdown(checks), ""]
    lines += ["| stage | status | minutes | output |", "|---|---|---|---|"]
    for row in summary:
        report = Path(row["stage"]) / "report.md"
        link = f"[{row['stage']}/]({report})" if (out / report).is_file() else f"{row['stage']}/"
        lines.append(f"| {row['stage']} | {row['status']} | {row['seconds'] / 60:.1f} | {link} |")
    for stage in [s for s in config.stages if s != "evaluate"]:
        curves = next((name for name in ("rl_curves.png", "training_curves.png") if (out / stage / name).is_file()),
                      None)
        if curves:
            lines += ["", f"## {stage}: training curves", "", f"![{stage}]({stage}/{curves})"]
    results_file = out / "evaluate" / "eval_results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        lines += ["", "## What each stage changed (held-out prompts)", "", evaluation_markdown(results)]
        if plot_model_comparison(results["models"], str(out / "stage_comparison.png"),
                                 "Per stage: held-out perplexity, reward-model score, diversity"):
            lines += ["", "![stage comparison](stage_comparison.png)"]
        if plot_win_rates(results.get("win_rates", {}), str(out / "win_rates.png"),
                          "Win-rate judged by the reward model"):
            lines += ["", "![win-rates](win_rates.png)"]
        lines += ["", "Samples side by side: [evaluate/samples.md](evaluate/samples.md)."]
    if (out / "race.md").is_file():
        lines += ["", "## The RL race", "", (out / "race.md").read_text().split("\n", 2)[2]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


if __name__ == "__main__":
    run(main, (PipelineConfig,), "pipeline/smollm2_demo.yaml")

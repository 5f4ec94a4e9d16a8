"""PPO episodes per second and peak memory: our recipe's settings vs TRL's PPO example settings, same models,
prompts, batch, response length, PPO epochs and number of updates, measured in the same run (each variant in its
own process, so peak memory is its own). Not a test.

    python benchmarks/ppo_throughput.py                       # SmolLM2-135M-Instruct as policy, RM and value
    python benchmarks/ppo_throughput.py --updates 4 --response_length 64 --model Qwen/Qwen2.5-0.5B

TRL example settings (trl/examples/scripts/ppo/ppo.py with its defaults): the policy fully trained, a second full
copy of it as the frozen reference, a fully trained fp32 value model, gradient checkpointing on (TRL's config
default), `bf16: true` in the config (which PPOTrainer ignores: it builds its own Accelerator, so everything runs in
fp32), AdamW (not fused).
`trl_example_lora` adds `--use_peft` to that example (LoRA policy, the adapter-disabled policy as reference); the
rest as above.
Our recipe's settings: recipes/ppo.py's default YAML (only batch, episodes, lengths and epochs set as below) and its
own loaders: a LoRA policy whose reference is the same weights with the adapter disabled (no copy), a LoRA value
model on the reward model's frozen backbone, frozen weights stored in bf16, bf16 autocast over the loop
(chatgpt_recipes/rl/ppo_trainer.py), fused AdamW, no gradient checkpointing.
Every variant starts from the same models: the policy, and a reward model that is the same checkpoint with one
untrained scalar head (saved once, so every variant scores with the same head; speed does not depend on its
quality), which also initialises the value model. The time counted is trainer.train() only; loading is excluded.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from chatgpt_recipes.runtime.errors import DataError  # noqa: E402
from bench_utils import (GpuBusy, check_model, machine, parse_checked, recipe_module, run_benchmark,  # noqa: E402
                         spread, versions)

VARIANTS = {"trl_example": "TRL PPO example settings (fp32: bf16 ignored)",
            "trl_best": "TRL PPO example + --use_peft, no gradient checkpointing",
            "recipe": "our recipe (recipes/ppo.py settings, precision auto)"}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)


def scalar_head_checkpoint(path: str, tokenizer, folder: str) -> str:
    """The policy checkpoint with one untrained scalar head, saved, so every variant loads the same reward head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_variant(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    ppo_recipe = recipe_module("ppo")
    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import (ModelArguments, load_model, load_tokenizer, lora_config,
                                                  resolve_model_path, torch_dtype)
    from chatgpt_recipes.rl.inputs import prompt_dataset
    from chatgpt_recipes.rl.ppo_trainer import RecipePPOTrainer
    from chatgpt_recipes.training.reward import load_reward_model, load_value_model

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    episodes = args.batch * args.updates
    prompts = prompt_dataset(str(PROMPTS), tokenizer, "alpaca", 96, episodes + args.batch)
    if len(prompts) < episodes + args.batch:  # rows the prompt checks skip (over 96 tokens) count against the rows
        raise DataError(f"{PROMPTS}: {len(prompts)} usable prompts, fewer than the {episodes + args.batch} that "
                        f"--batch {args.batch} x --updates {args.updates} (+ one held-out batch) need")
    train, held_out = prompts.select(range(episodes)), prompts.select(range(episodes, len(prompts)))
    reward_path = scalar_head_checkpoint(path, tokenizer, tempfile.mkdtemp())
    shared = dict(per_device_train_batch_size=args.batch, local_rollout_forward_batch_size=args.batch,
                  total_episodes=episodes, response_length=args.response_length, num_ppo_epochs=args.ppo_epochs,
                  gradient_accumulation_steps=1, num_mini_batches=1, stop_token="eos", missing_eos_penalty=1.0,
                  learning_rate=5e-5, report_to="none", save_strategy="no", logging_steps=1, seed=0)
    torch.manual_seed(0)
    if args.variant == "recipe":
        overrides = [f"--{key}={value}" for key, value in shared.items()]
        overrides += ["--model_name_or_path", path, "--reward_model_path", reward_path, "--output_dir",
                      tempfile.mkdtemp(), "--sample_every", "0", "--eval_prompts", "0"]
        config, model_args = parse_config((ppo_recipe.PPORecipeConfig, ModelArguments), "ppo/smollm2_alpaca_lora.yaml",
                                          overrides)
        policy = load_model(model_args, tokenizer)
        trainer = RecipePPOTrainer(
            args=config, processing_class=tokenizer, model=policy, ref_model=None,
            reward_model=load_reward_model(reward_path, dtype=torch_dtype(model_args)),
            value_model=load_value_model(reward_path, model_args),
            train_dataset=train, eval_dataset=held_out, peft_config=lora_config(model_args, policy))
    else:
        lora = args.variant == "trl_best"
        config = PPOConfig(output_dir=tempfile.mkdtemp(), num_sample_generations=0, bf16=True,
                           use_cpu=not torch.cuda.is_available(), **shared,
                           **({"gradient_checkpointing": False} if lora else {}))
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        reference = None if lora else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        reward_model, value_model = (AutoModelForSequenceClassification.from_pretrained(reward_path) for _ in "rv")
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward_model, value_model=value_model, train_dataset=train,
                             eval_dataset=held_out,
                             peft_config=LoraConfig(**LORA, target_modules="all-linear") if lora else None)
    # Time the rollouts' sampling apart from the rest (scoring and PPO epochs): TRL calls this module-level function
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    sampling, batch_generation = [0.0], trl_ppo.batch_generation

    def synchronize():  # a CUDA timer stops when the GPU's work is done
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_batch_generation(*gen_args, **gen_kwargs):
        synchronize()
        begin = time.time()
        output = batch_generation(*gen_args, **gen_kwargs)
        synchronize()
        sampling[0] += time.time() - begin
        return output

    trl_ppo.batch_generation = timed_batch_generation
    synchronize()
    start = time.time()
    with GpuBusy() as busy:
        trainer.train()
    synchronize()
    seconds = time.time() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    weights = {name: sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
               for name, model in (("policy", trainer.policy if hasattr(trainer, "policy") else policy),
                                   ("reference", trainer.ref_model), ("value", trainer.value_model),
                                   ("reward", trainer.reward_model)) if model is not None}
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    compute = "bfloat16" if args.variant == "recipe" and config.bf16 else "float32"
    return {"variant": args.variant, "compute_dtype": compute, "episodes": episodes, "train_seconds": seconds, "sampling_seconds": sampling[0],
            "episodes_per_s": episodes / seconds, "peak_memory_mb": peak, "weights_mb": weights,
            "trained_parameters": trained, "scores": [e["objective/scores"] for e in trainer.state.log_history
                                                      if "objective/scores" in e],
            "memory_kind": "GPU max_memory_allocated" if torch.cuda.is_available() else "peak RSS",
            **({"gpu_busy_share": busy.share} if busy.share is not None else {})}


PROMPTS = REPO / "data" / "alpaca_en_demo.json"


def check_prompt_count(args) -> None:
    """batch x updates training prompts and one batch held out, from the bundled Alpaca prompts: more than it holds
    is an error before any variant starts (each would fail alike)."""
    from chatgpt_recipes.data.rows import read_rows

    needed, rows = args.batch * args.updates + args.batch, len(read_rows(str(PROMPTS)))
    if needed > rows:
        raise DataError(f"--batch {args.batch} x --updates {args.updates} needs {needed} prompts (one more batch held "
                        f"out), but {PROMPTS.relative_to(REPO)} has {rows} rows: lower --batch or --updates")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4, help="episodes per update")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="repeats, variants interleaved in rotated order")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parse_checked(parser, positive=("batch", "updates", "response_length", "ppo_epochs", "rounds"))
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return

    check_model(args.model)
    check_prompt_count(args)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {machine()} | {versions()}\ncommand: python "
          + " ".join(sys.argv), flush=True)
    forwarded = ["--model", args.model, "--batch", str(args.batch), "--updates", str(args.updates),
                 "--response_length", str(args.response_length), "--ppo_epochs", str(args.ppo_epochs)]
    runs = []
    for round_index in range(args.rounds):
        order = args.variants[round_index % len(args.variants):] + args.variants[:round_index % len(args.variants)]
        for variant in order:
            command = [sys.executable, __file__, "--variant", variant, *forwarded]
            output = subprocess.run(command, capture_output=True, text=True,
                                    env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
            runs.append({"round": round_index + 1, **json.loads(lines[-1][len("RESULT "):])})
            print(f"  round {round_index + 1}: {variant} {runs[-1]['episodes_per_s']:.3f} episodes/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))

    by_variant = {v: [r for r in runs if r["variant"] == v] for v in args.variants}
    mean = {v: sum(r["episodes_per_s"] for r in rs) / len(rs) for v, rs in by_variant.items()}
    print(f"\nmodel {args.model}, {args.batch} episodes/update x {args.updates} updates, response_length "
          f"{args.response_length}, {args.ppo_epochs} PPO epochs, {args.rounds} round(s): mean [min-max]\n")
    print(f"| settings | computes in | episodes/s | s/update sampling | s/update rest | {runs[0]['memory_kind']} MB | weights MB "
          "(policy/ref/value/reward) | trained parameters |\n|---|---|---|---|---|---|---|---|")
    for variant, variant_runs in by_variant.items():
        weights = variant_runs[0]["weights_mb"]
        print(f"| {VARIANTS[variant]} | {variant_runs[0]['compute_dtype']} | {spread([r['episodes_per_s'] for r in variant_runs], '.3f')} | "
              f"{spread([r['sampling_seconds'] / args.updates for r in variant_runs], '.2f')} | "
              f"{spread([(r['train_seconds'] - r['sampling_seconds']) / args.updates for r in variant_runs], '.2f')} | "
              f"{spread([r['peak_memory_mb'] for r in variant_runs], '.0f')} | "
              + "/".join(f"{weights[k]:.0f}" if k in weights else "-" for k in ("policy", "reference", "value", "reward"))
              + f" | {variant_runs[0]['trained_parameters'] / 1e6:.2f}M |")
    for variant, variant_runs in by_variant.items():
        if "gpu_busy_share" in variant_runs[0]:
            print(f"{variant}: GPU busy {spread([100 * r['gpu_busy_share'] for r in variant_runs], '.0f')}% of "
                  "train() (nvidia-smi utilization.gpu, sampled every 100 ms)")
    if "recipe" in mean:
        for base in [v for v in args.variants if v != "recipe"]:
            print(f"recipe / {base}: {mean['recipe'] / mean[base]:.2f}x episodes/s, peak memory "
                  f"{sum(r['peak_memory_mb'] for r in by_variant['recipe']) / len(by_variant['recipe']) / (sum(r['peak_memory_mb'] for r in by_variant[base]) / len(by_variant[base])):.2f}x")
        if "trl_example" in mean:
            phase = lambda v, key: sum(key(r) for r in by_variant[v]) / len(by_variant[v])  # noqa: E731
            sampling = lambda r: r["sampling_seconds"]  # noqa: E731
            rest = lambda r: r["train_seconds"] - r["sampling_seconds"]  # noqa: E731
            print(f"recipe / trl_example per phase: sampling {phase('trl_example', sampling) / phase('recipe', sampling):.2f}x "
                  f"faster, scoring + PPO epochs {phase('trl_example', rest) / phase('recipe', rest):.2f}x faster")
            print(f"PPO speedup vs TRL example settings: {mean['recipe'] / mean['trl_example']:.2f}x")


if __name__ == "__main__":
    run_benchmark(main)

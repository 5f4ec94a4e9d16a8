"""PPO episodes per second and peak memory: our recipe's settings vs TRL's PPO example settings, same models,
prompts, batch, response length, PPO epochs and number of updates, measured in the same run (each variant in its
own process, so peak memory is its own). Not a test.

    python benchmarks/ppo_throughput.py                       # SmolLM2-135M-Instruct as policy, RM and value
    python benchmarks/ppo_throughput.py --updates 4 --response_length 64 --model Qwen/Qwen2.5-0.5B

TRL example settings (trl/examples/scripts/ppo/ppo.py with its defaults): the policy fully trained, a second full
copy of it as the frozen reference, gradient checkpointing on (TRL's config default), `bf16: true` in the config
(which PPOTrainer ignores: it builds its own Accelerator, so everything runs in fp32).
Our recipe's settings (recipes/ppo.py): a LoRA policy whose reference is the same weights with the adapter disabled
(no copy), no gradient checkpointing, and bf16 autocast over the whole loop (common/ppo_trainer.py).
Both use an untrained scalar head on the same model as reward and value model (speed does not depend on its
quality). The time counted is trainer.train() only; model loading is excluded for both.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
VARIANTS = {"trl_example": "TRL PPO example settings", "recipe": "our recipe (recipes/ppo.py settings)"}


def run_variant(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from common.models import ModelArguments, load_model, load_tokenizer, lora_config, resolve_model_path
    from common.ppo_trainer import RecipePPOTrainer
    from common.rl import prompt_dataset

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    episodes = args.batch * args.updates
    prompts = prompt_dataset(str(Path(__file__).resolve().parent.parent / "data" / "alpaca_en_demo.json"), tokenizer,
                             "alpaca", 96, episodes + args.batch)
    recipe = args.variant == "recipe"
    config = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                       local_rollout_forward_batch_size=args.batch, total_episodes=episodes,
                       response_length=args.response_length, num_ppo_epochs=args.ppo_epochs, stop_token="eos",
                       missing_eos_penalty=1.0, learning_rate=5e-5, report_to="none", save_strategy="no",
                       logging_steps=1, num_sample_generations=0, bf16=True, gradient_checkpointing=not recipe,
                       use_cpu=not torch.cuda.is_available(), seed=0)
    scalar_head = lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)  # noqa: E731
    reward_model, value_model = scalar_head(), scalar_head()
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    train, held_out = prompts.select(range(episodes)), prompts.select(range(episodes, len(prompts)))
    if recipe:
        model_args = ModelArguments(model_name_or_path=path, use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
        policy = load_model(model_args, tokenizer)
        trainer = RecipePPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                                   reward_model=reward_model, value_model=value_model, train_dataset=train,
                                   eval_dataset=held_out, peft_config=lora_config(model_args, policy))
    else:
        policy = AutoModelForCausalLM.from_pretrained(path)
        reference = AutoModelForCausalLM.from_pretrained(path)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward_model, value_model=value_model, train_dataset=train,
                             eval_dataset=held_out)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "episodes": episodes, "train_seconds": seconds,
            "episodes_per_s": episodes / seconds, "peak_memory_mb": peak,
            "memory_kind": "GPU max_memory_allocated" if torch.cuda.is_available() else "peak RSS"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4, help="episodes per update")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    results = {}
    for variant in VARIANTS:
        print(f"--- {VARIANTS[variant]} ...", flush=True)
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            sys.exit(f"{variant} failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
    print(f"\nmodel {args.model}, {args.batch} episodes/update x {args.updates} updates, response_length "
          f"{args.response_length}, {args.ppo_epochs} PPO epochs\n")
    print(f"| settings | episodes/s | train s | {results['recipe']['memory_kind']} MB |\n|---|---|---|---|")
    for variant, result in results.items():
        print(f"| {VARIANTS[variant]} | {result['episodes_per_s']:.3f} | {result['train_seconds']:.1f} | "
              f"{result['peak_memory_mb']:.0f} |")
    memory = results["recipe"]["peak_memory_mb"] / results["trl_example"]["peak_memory_mb"]
    print(f"\npeak memory vs TRL example settings: {memory:.2f}x")
    speedup = results["recipe"]["episodes_per_s"] / results["trl_example"]["episodes_per_s"]
    print(f"PPO speedup vs TRL example settings: {speedup:.2f}x")


if __name__ == "__main__":
    main()

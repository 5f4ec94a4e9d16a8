"""Merge a LoRA (or QLoRA) adapter into its base model and save a plain model: safetensors weights, the
tokenizer and the adapter's stage_info.json (its prompt format), loadable with
`AutoModelForCausalLM.from_pretrained(output_dir)` with no PEFT installed.

    python recipes/merge_lora.py --adapter_path outputs/sft-smollm2-alpaca-lora
    python recipes/merge_lora.py --adapter_path outputs/sft-qwen-qlora --output_dir outputs/qwen-merged --dtype bfloat16

The base named in the adapter's adapter_config.json is loaded at 16/32-bit, never 4-bit, also for a QLoRA adapter:
merging into quantized weights would round the merged weights to 4 bits and change the model's outputs.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.templates import read_stage_info, save_stage_info
from chatgpt_recipes.modeling.loading import adapter_base, load_for_inference
from chatgpt_recipes.runtime.errors import ModelLoadError


@dataclass
class MergeArguments:
    adapter_path: str = field(default="outputs/sft-smollm2-alpaca-lora",
                              metadata={"help": "Directory of the adapter (adapter_config.json names its base)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to save; default <adapter_path>-merged."})
    dtype: str = field(default="auto", metadata={"help": "Precision of the merged weights: auto (the base checkpoint's "
                                                         "own), float32 or bfloat16. Not the hardware's choice: the "
                                                         "saved model is the same on every machine."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the base."})


def main(args: MergeArguments) -> str:
    if args.adapter_path == MergeArguments.adapter_path and not Path(args.adapter_path).exists():
        raise ModelLoadError(f"--adapter_path {args.adapter_path} (the default) has not been trained yet: train it "
                             "with `accelerate launch recipes/sft_lora.py`, or name another adapter with "
                             "--adapter_path")
    if not Path(args.adapter_path).is_dir() or adapter_base(args.adapter_path) is None:
        raise ModelLoadError(f"{args.adapter_path} is not a LoRA adapter directory (no adapter_config.json)")
    output_dir = Path(args.output_dir or args.adapter_path.rstrip("/") + "-merged")
    if output_dir.resolve() == Path(args.adapter_path).resolve():
        raise ModelLoadError("--output_dir must differ from --adapter_path")

    print(f"Loading {args.adapter_path} on its base ({adapter_base(args.adapter_path)}) in {args.dtype}", flush=True)
    tokenizer, model = load_for_inference(args.adapter_path, args.trust_remote_code, args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    merged = model.merge_and_unload()

    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    stage_info = read_stage_info(args.adapter_path)
    if stage_info:  # so that chat.py and the next stage prompt the merged model the way it was tuned
        save_stage_info(str(output_dir), **stage_info)
    print(f"Merged model saved to {output_dir}", flush=True)
    return str(output_dir)


if __name__ == "__main__":
    run(main, (MergeArguments,))

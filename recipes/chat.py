"""Chat with a model in the terminal: multi-turn, tokens streamed as they are generated.

    python recipes/chat.py --model_name_or_path outputs/sft-smollm2-alpaca-lora      # an SFT adapter (+ its base)
    python recipes/chat.py --model_name_or_path outputs/sft-merged                   # a merged or fully tuned model
    python recipes/chat.py --model_name_or_path gpt2 --adapter_path outputs/my-adapter   # a base plus an adapter
    python recipes/chat.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct             # a hub id (or a .gguf file)
    python recipes/chat.py --model_name_or_path outputs/sft-smollm2-alpaca-lora --prompt "Name three colors."

Prompts are written the way the model was tuned: every stage records its prompt format in stage_info.json next
to its output ("alpaca" for Alpaca data, "chat" for chat data, "plain" for prompt/completion data) and
`--prompt_format auto` reads it; without one the tokenizer's chat template is used (the fallback template for
tokenizers without).
In the chat: /reset forgets the conversation, /exit (or Ctrl-D) quits.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

from dataclasses import dataclass, field
from pathlib import Path

from transformers import TextStreamer

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.templates import PROMPT_FORMATS, check_format, read_stage_info, render_conversation
from chatgpt_recipes.modeling.generation import generate
from chatgpt_recipes.modeling.loading import load_adapter, load_for_inference
from chatgpt_recipes.runtime.errors import ModelLoadError
from chatgpt_recipes.runtime.precision import inference_device, inference_dtype


@dataclass
class ChatArguments:
    model_name_or_path: str = field(
        default="outputs/sft-smollm2-alpaca-lora",
        metadata={"help": "Model directory, LoRA adapter directory, hub id, .gguf file or offline model name."})
    adapter_path: str | None = field(default=None, metadata={"help": "A LoRA adapter to put on the model."})
    prompt_format: str = field(default="auto",
                               metadata={"help": f"auto (read stage_info.json) or one of {PROMPT_FORMATS}"})
    prompt: str | None = field(default=None, metadata={"help": "Answer this one message, print it and exit."})
    system: str | None = field(default=None, metadata={"help": "A system message opening the conversation."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy decoding."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware computes it natively, else "
                                                         "fp16 on CUDA or fp32), float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})


def saved_prompt_format(*model_paths: str | None) -> str:
    """The prompt format a run recorded next to the model (or next to the checkpoint's run), else "chat"."""
    for path in filter(None, model_paths):
        for folder in (Path(path), Path(path).parent):
            recorded = read_stage_info(folder).get("prompt_format")
            if recorded:
                return recorded
    return "chat"


def check_trained(path: str, option: str, default: str) -> None:
    """The default model is recipes/sft_lora.py's output: before that recipe has run, say so and how to run it."""
    if path == default and not Path(path).exists():
        raise ModelLoadError(f"--{option} {path} (the default) has not been trained yet: train it with "
                             "`accelerate launch recipes/sft_lora.py`, or name another model with "
                             f"--{option}")


def main(args: ChatArguments):
    check_trained(args.model_name_or_path, "model_name_or_path", ChatArguments.model_name_or_path)
    if args.prompt_format != "auto":
        check_format(args.prompt_format)
    tokenizer, model = load_for_inference(args.model_name_or_path, args.trust_remote_code, inference_dtype(args.dtype))
    if args.adapter_path:
        model = load_adapter(model, args.adapter_path).eval()
    model.to(inference_device())  # the GPU (CUDA or Apple MPS) when there is one
    prompt_format = (saved_prompt_format(args.adapter_path, args.model_name_or_path)
                     if args.prompt_format == "auto" else args.prompt_format)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    system = [{"role": "system", "content": args.system}] if args.system else []

    def answer(turns: list[dict]) -> str:
        prompt = render_conversation(turns, tokenizer, prompt_format)
        return generate(model, tokenizer, prompt, args.max_new_tokens, do_sample=args.temperature > 0,
                        temperature=args.temperature, streamer=streamer)

    if args.prompt is not None:
        answer(system + [{"role": "user", "content": args.prompt}])
        return

    print(f"Chatting with {args.model_name_or_path} (prompt format: {prompt_format}). /reset, /exit.", flush=True)
    turns = list(system)
    while True:
        try:
            message = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if message == "/exit":
            break
        if message == "/reset":
            turns = list(system)
            continue
        if not message:
            continue
        turns.append({"role": "user", "content": message})
        print("assistant> ", end="", flush=True)
        turns.append({"role": "assistant", "content": answer(turns)})


if __name__ == "__main__":
    run(main, (ChatArguments,))

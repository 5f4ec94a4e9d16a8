"""Text generation shared by the demo answers, chat, evaluation and the pipeline (prompts: chatgpt_recipes.data.templates)."""

import contextlib

import torch

from chatgpt_recipes.data.templates import end_of_turn_token_id


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Tokens that end an answer in generate(): the tokenizer's EOS, the model's generation-config EOS ids, and the
    chat template's end-of-turn token (templates.end_of_turn_token_id; Qwen base models: eos <|endoftext|>, but
    turns end with <|im_end|>)."""
    ids = {tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def zero3_gathered(*models):
    """Under DeepSpeed ZeRO-3 a model holds only this rank's shard of each weight (empty tensors) outside the
    engine's own forward: gather the full weights of `models` for the duration. A collective: every rank must make
    the same call. Without ZeRO-3 it does nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    parameters = [p for model in models if model is not None for p in model.parameters() if hasattr(p, "ds_id")]
    if not is_deepspeed_zero3_enabled() or not parameters:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, streamer=None) -> str:
    """The model's answer to an already-templated prompt, stopping at EOS or the end-of-turn token."""
    # A chat template that writes the BOS itself (Llama 3) must not get a second one from the tokenizer.
    has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not has_bos).to(model.device)
    with zero3_gathered(model):
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(tokenizer, model),
            streamer=whole_character_streamer(streamer),
        )
    return decode_whole_characters(tokenizer, output[0, inputs["input_ids"].shape[1]:].tolist()).strip()


def decode_whole_characters(tokenizer, ids: list[int]) -> str:
    """The text of `ids` without a character cut in half: byte-level tokens can end mid-way through a UTF-8
    character when generation stops at max_new_tokens, which decodes to U+FFFD; those last tokens are dropped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, 4):  # a UTF-8 character is at most 4 bytes, so at most 3 tokens hold a partial one
        if not text.endswith("\ufffd") or cut > len(ids):
            break
        text = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
    return text


def whole_character_streamer(streamer):
    """A TextStreamer whose last flush (the text after the final space) drops a trailing half character; the
    flushes before it end at a space, a newline or a whole CJK character, as TextStreamer prints them."""
    if streamer is None or getattr(streamer, "_whole_characters", False):
        return streamer
    print_text = streamer.on_finalized_text

    def on_finalized_text(text: str, stream_end: bool = False):
        print_text(text.rstrip("\ufffd") if stream_end else text, stream_end=stream_end)

    streamer.on_finalized_text, streamer._whole_characters = on_finalized_text, True
    return streamer

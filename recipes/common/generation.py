"""Text generation shared by the demo answers, chat, evaluation and the pipeline."""

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, streamer=None) -> str:
    """The model's answer to an already-templated prompt, stopping at EOS."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

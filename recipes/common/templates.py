"""Prompt templates: Alpaca's (as stanford_alpaca defines it) and the fallback chat template."""

# stanford_alpaca train.py PROMPT_DICT, verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one instruction; the response (plus EOS) follows it directly."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# Used only when a tokenizer ships no chat template (GPT-2, most base models). It needs no new tokens, so
# LoRA works without training embeddings: each assistant turn ends with the tokenizer's EOS token, which the
# model is trained to emit and generation stops on. `{% generation %}` marks what an assistant says (TRL's
# assistant_only_loss reads it); the blank line after it is written as an expression because Jinja's trim_blocks
# would swallow a newline right after the tag. Rendered:
#   {system}\n\n### User:\n{user}\n\n### Assistant:\n{assistant}<eos>\n\n### User:\n ...
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

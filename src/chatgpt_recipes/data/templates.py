"""Prompts, rendered one way for every stage (SFT, the reward model, DPO, PPO/RLOO, evaluation, chat), and the
stage_info.json that records which format a model was trained with.

A prompt is Alpaca pieces {instruction, input}, chat turns ending with a user turn, or verbatim text, and
`prompt_format` says how it is written to the model:
  alpaca  the Alpaca template (stanford_alpaca's with-input / no-input variants);
  chat    the tokenizer's chat template with the generation prompt (FALLBACK_CHAT_TEMPLATE for tokenizers without);
  plain   the text as is (prompt/completion data).
"""

import copy
import json
import weakref
from pathlib import Path

from chatgpt_recipes.runtime.errors import ConfigError, PromptFormatError

PROMPT_FORMATS = ("alpaca", "chat", "plain")
STAGE_INFO_FILE = "stage_info.json"
OLD_PROMPT_FORMAT_FILE = "prompt_format.json"  # what sft_lora.py saved before stage_info.json; still read

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


# ---------------------------------------------------------------- rendering

def check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, not {prompt_format!r}")


def render_prompt(prompt, tokenizer, prompt_format: str) -> str:
    """The text a model is prompted with. Verbatim text is used as is in the alpaca format too, as SFT uses
    {prompt, completion} rows; a system turn is written before the user's text inside the Alpaca instruction."""
    check_format(prompt_format)
    if isinstance(prompt, dict):
        if prompt_format == "alpaca":
            return alpaca_prompt(prompt["instruction"], prompt.get("input", ""))
        prompt = prompt["instruction"] + (f"\n\n{prompt['input']}" if prompt.get("input", "").strip() else "")
    if isinstance(prompt, str):
        if prompt_format != "chat":
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    system = [t["content"] for t in prompt if t["role"] == "system"]
    others = [t for t in prompt if t["role"] != "system"]
    if len(others) != 1 or others[0]["role"] != "user":
        raise PromptFormatError(f"a multi-turn conversation cannot be rendered in the {prompt_format} format "
                                "(use prompt_format: chat)")
    text = "\n\n".join(system + [others[0]["content"]])
    return alpaca_prompt(text) if prompt_format == "alpaca" else text


def encode_prompt(text: str, tokenizer, prompt_format: str) -> list[int]:
    """Token ids of a rendered prompt, with special tokens exactly as chatgpt_recipes.data.sft.tokenize_example adds them (a
    chat template writes its own)."""
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]


def example_prompt(example: dict, tokenizer, system_prompt: str | None = None) -> str:
    """The prompt of an SFT example (chatgpt_recipes.data.sft.sft_rows: {prompt, completion} already rendered, or {messages}):
    everything up to its last assistant answer; a chat one with `system_prompt` as its system turn when it has none
    (None: the chat template's own default), as a stage with that system_prompt renders it."""
    if "prompt" in example:
        return example["prompt"]
    turns = example["messages"]
    last_answer = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    turns = turns[:last_answer]
    if system_prompt is not None and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}] + turns
    return render_prompt(turns, tokenizer, "chat")


def example_prompt_ids(example: dict, tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids of an SFT example's prompt, as tokenize_example starts the example."""
    return encode_prompt(example_prompt(example, tokenizer, system_prompt), tokenizer,
                         "chat" if "messages" in example else "plain")


def render_conversation(turns: list[dict], tokenizer, prompt_format: str) -> str:
    """The prompt for the next answer in a multi-turn chat (chat.py). In the alpaca format the system text comes
    first and the earlier exchanges follow as answered Alpaca prompts (Alpaca data itself has one turn); the plain
    format is the last user turn alone. Unlike `render_prompt`, which SFT uses for a single-turn chat row, neither
    puts a system turn inside the last prompt."""
    check_format(prompt_format)
    if prompt_format == "chat":
        return render_prompt(turns, tokenizer, "chat")
    if prompt_format == "plain":
        return turns[-1]["content"]
    system = "".join(t["content"] + "\n\n" for t in turns if t["role"] == "system")
    exchanges = [t for t in turns if t["role"] != "system"]
    history = "".join(alpaca_prompt(user["content"]) + answer["content"] + "\n\n"
                      for user, answer in zip(exchanges[0:-1:2], exchanges[1:-1:2]))
    return system + history + alpaca_prompt(exchanges[-1]["content"])


# ---------------------------------------------------------------- the token that ends an answer

_END_OF_TURN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn (<|im_end|> for ChatML,
    <|eot_id|> for Llama 3, EOS for FALLBACK_CHAT_TEMPLATE), or None without a chat template or when the template
    ends turns with plain text."""
    if not tokenizer.chat_template:
        return None
    cached = _END_OF_TURN.get(tokenizer)
    if cached and cached[0] == (tokenizer.chat_template, tokenizer.eos_token_id):
        return cached[1]
    try:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                             tokenize=False)
    except Exception:  # a template that refuses this minimal chat (one that requires a system turn, say)
        turn = ""
    end = turn.rsplit("y", 1)[-1].strip() if turn else ""
    special = set(tokenizer.all_special_tokens) | {added.content for added in tokenizer.added_tokens_decoder.values()
                                                   if added.special}
    end_id = tokenizer.convert_tokens_to_ids(end) if end in special else None
    _END_OF_TURN[tokenizer] = ((tokenizer.chat_template, tokenizer.eos_token_id), end_id)
    return end_id


def answer_end_token_id(tokenizer, prompt_format: str) -> int:
    """The token that ends an answer, as SFT trained the model to emit it: the chat template's end-of-turn token
    in the chat format (not EOS when a base model is given a ChatML template: EOS <|endoftext|>, turns end with
    <|im_end|>), EOS otherwise (chatgpt_recipes.data.sft appends EOS to a prompt/completion answer). The reward
    model scores at it, PPO/RLOO stop at it, DPO's answers end with it."""
    check_format(prompt_format)
    if prompt_format == "chat":
        end = end_of_turn_token_id(tokenizer)
        if end is not None:
            return end
    return tokenizer.eos_token_id


def tokenizer_ending_answers(tokenizer, prompt_format: str):
    """`tokenizer` itself when EOS ends an answer, else a copy whose EOS is the token that does: TRL's PPO, RLOO and
    DPO trainers read `eos_token(_id)` as the end of an answer (where generation stops, the completion mask ends,
    missing_eos_penalty looks, and what DPO appends to an answer that does not end with it)."""
    end = answer_end_token_id(tokenizer, prompt_format)
    if end == tokenizer.eos_token_id:
        return tokenizer
    answers = copy.deepcopy(tokenizer)
    answers.eos_token = answers.convert_ids_to_tokens(end)
    return answers


# ---------------------------------------------------------------- stage_info.json: how a model was trained

def save_stage_info(output_dir: str, stage: str, prompt_format: str, **extra) -> None:
    """Record how this stage rendered prompts (and what the next stage checks, e.g. eval_accuracy)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    info = {"stage": stage, "prompt_format": prompt_format, **extra}
    (Path(output_dir) / STAGE_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def read_stage_info(model_dir: str) -> dict:
    """The stage_info.json in `model_dir`, or {} if there is none. An older SFT output has only
    prompt_format.json, which is read as its stage info."""
    path = Path(model_dir) / STAGE_INFO_FILE
    if path.is_file():
        return json.loads(path.read_text())
    old = Path(model_dir) / OLD_PROMPT_FORMAT_FILE
    if old.is_file():
        return {"stage": "sft", **json.loads(old.read_text())}
    return {}


def check_prompt_format(model_path: str, prompt_format: str, what: str) -> None:
    """Refuse to train on prompts rendered differently from how the model at `model_path` was trained."""
    recorded = read_stage_info(model_path).get("prompt_format")
    if recorded and recorded != prompt_format:
        raise ConfigError(f"{what} {model_path} was trained on prompts in the '{recorded}' format, but this run "
                          f"renders them as '{prompt_format}': set prompt_format: {recorded}")


def check_system_prompt(model_path: str, system_prompt: str | None, what: str) -> None:
    """Refuse to score prompts rendered with another system prompt than the model at `model_path` was trained on
    (stage_info's system_prompt; none recorded: the chat template's own default, as this run's None)."""
    recorded = read_stage_info(model_path).get("system_prompt")
    if recorded != system_prompt:
        def said(value):
            return "the chat template's own system prompt (system_prompt unset)" if value is None else repr(value)
        raise ConfigError(f"{what} {model_path} was trained on prompts rendered with {said(recorded)}, but this run "
                          f"renders them with {said(system_prompt)} (stage_info.json in {model_path} records it)")
"""Preference data for the reward model and DPO: every known shape normalised into rankings (a prompt and K >= 2
responses ordered best to worst), rankings expanded into weighted pairs, and the one prompt rendering that SFT,
the reward model and PPO share.

Shapes read (one row each):
  pairwise, standard        {"prompt": str, "chosen": str, "rejected": str}
  pairwise, conversational  {"prompt": [turns], "chosen": [turns], "rejected": [turns]}  (or no prompt: the
                            shared leading turns of chosen and rejected are the prompt)
  ShareGPT pairs            {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {from, value}}
  Anthropic HH-RLHF         {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": "..."}
  K-wise ranking            {"prompt": str | [turns], "responses": [best, ..., worst]} (optional "ranks": [1, 2, ...])
  Alpaca (PPO prompts only) {"instruction", "input", "output"}

A prompt is kept as what it is (Alpaca pieces, chat turns or verbatim text) and rendered only once the target
format is known: `prompt_format: alpaca` renders it exactly as SFT renders Alpaca rows (the Alpaca template),
`prompt_format: chat` as SFT renders chat rows (the tokenizer's chat template with the generation prompt),
`prompt_format: plain` as SFT uses prompt/completion rows (the prompt text as is).
Reward-model and PPO sequences are then tokens(prompt) + tokens(response) + EOS, tokenised separately, which is
exactly what PPO generates (query tokens, then sampled tokens up to the EOS the SFT model learnt to emit)."""

import json
from itertools import combinations
from math import comb
from pathlib import Path

from common.data import DataError, SkipCounter, normalize_messages
from common.templates import alpaca_prompt

PROMPT_FORMATS = ("alpaca", "chat", "plain")  # as common.data.prompt_format names SFT's
STAGE_INFO_FILE = "stage_info.json"


class PromptFormatError(DataError):
    """A prompt that the requested prompt format cannot render (a multi-turn chat in the Alpaca template)."""


# ---------------------------------------------------------------- prompt rendering shared by SFT, RM and PPO

def render_prompt(prompt, tokenizer, prompt_format: str) -> str:
    """The text a model is prompted with. `prompt` is Alpaca pieces {instruction, input}, chat turns ending with a
    user turn, or verbatim text (used as is in the alpaca format, as SFT uses {prompt, completion} rows)."""
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"prompt_format must be one of {PROMPT_FORMATS}, not {prompt_format!r}")
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
    """Token ids of a rendered prompt, with special tokens exactly as common.data.tokenize_example adds them."""
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]


def encode_response(text: str, tokenizer) -> list[int]:
    """A response's token ids ending with EOS: the stop token PPO truncates at and the token the RM scores."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def save_stage_info(output_dir: str, stage: str, prompt_format: str, **extra) -> None:
    """Record how this stage rendered prompts (and what the next stage checks): stage_info.json, plus
    prompt_format.json as sft_lora.py writes it, which chat.py and evaluation read."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    info = {"stage": stage, "prompt_format": prompt_format, **extra}
    (Path(output_dir) / STAGE_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    (Path(output_dir) / "prompt_format.json").write_text(json.dumps({"prompt_format": prompt_format}) + "\n")


def read_stage_info(model_dir: str) -> dict:
    """stage_info.json of an RLHF stage, or the prompt_format.json that sft_lora.py saves."""
    for name in (STAGE_INFO_FILE, "prompt_format.json"):
        path = Path(model_dir) / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def check_prompt_format(model_path: str, prompt_format: str, what: str) -> None:
    """Refuse to train on prompts rendered differently from how the model at `model_path` was trained."""
    from common.config import ConfigError

    recorded = read_stage_info(model_path).get("prompt_format") if Path(model_path).is_dir() else None
    if recorded and recorded != prompt_format:
        raise ConfigError(f"{what} {model_path} was trained on prompts in the '{recorded}' format, but this run "
                          f"renders them as '{prompt_format}': set prompt_format: {recorded}")


# ---------------------------------------------------------------- rows to rankings

def _response_text(value, where: str, field: str) -> str:
    if isinstance(value, dict):  # ShareGPT {from, value} / {role, content}
        value = value.get("value", value.get("content"))
    elif isinstance(value, list):  # a conversational completion: one assistant turn
        turns = [t for t in value if isinstance(t, dict)]
        if len(turns) != 1 or turns[0].get("role", turns[0].get("from")) not in ("assistant", "gpt"):
            raise DataError(f"{where}: field '{field}' must hold one assistant turn")
        value = turns[0].get("content", turns[0].get("value"))
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be text, found {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}' is an empty response")
    return value


def split_hh_transcript(text: str, where: str, field: str) -> tuple[list[dict], str]:
    """An Anthropic HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as (prompt turns, final answer)."""
    turns = []
    for part in text.split("\n\nHuman:")[1:]:
        human, *assistant = part.split("\n\nAssistant:")
        turns.append({"role": "user", "content": human.strip()})
        turns += [{"role": "assistant", "content": answer.strip()} for answer in assistant]
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' is an HH transcript with no final Assistant turn")
    if not turns[-1]["content"]:
        raise DataError(f"{where}: field '{field}' has an empty final Assistant turn")
    return turns[:-1], turns[-1]["content"]


def _pair_of(row: dict, where: str) -> tuple[object, list[str]]:
    """(prompt, [chosen, rejected]) of a pairwise row in any known shape."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "conversations" in row:  # ShareGPT
        prompt = normalize_messages(row["conversations"], where, "conversations")
        return prompt, [_response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")]
    if isinstance(chosen, str) and "prompt" not in row and "\n\nHuman:" in chosen:  # HH-RLHF
        prompt, chosen_text = split_hh_transcript(chosen, where, "chosen")
        rejected_prompt, rejected_text = split_hh_transcript(_response_text(rejected, where, "rejected"), where,
                                                             "rejected")
        if rejected_prompt != prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' transcripts differ before the final Assistant turn")
        return prompt, [chosen_text, rejected_text]
    if isinstance(chosen, list) and "prompt" not in row:  # conversational, implicit prompt
        chosen_turns = normalize_messages(chosen, where, "chosen")
        rejected_turns = normalize_messages(rejected, where, "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1] or chosen_turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but a final assistant answer")
        return chosen_turns[:-1], [_response_text(chosen_turns[-1], where, "chosen"),
                                   _response_text(rejected_turns[-1], where, "rejected")]
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt' (fields present: {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = normalize_messages(prompt, where, "prompt")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be non-empty text or a list of turns")
    return prompt, [_response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")]


def ranking_of(row: dict, where: str) -> dict:
    """One row as {"prompt", "responses": [best, ..., worst]}; DataError names the row and field when it is bad."""
    if "chosen" in row and "rejected" in row:
        prompt, responses = _pair_of(row, where)
        if responses[0].strip() == responses[1].strip():
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so they teach no preference")
        return {"prompt": prompt, "responses": responses}
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: field 'responses' must rank at least 2 responses, found "
                            f"{len(responses) if isinstance(responses, list) else type(responses).__name__}")
        texts = [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        if "ranks" in row:
            ranks = row["ranks"]
            if not isinstance(ranks, list) or len(ranks) != len(texts):
                raise DataError(f"{where}: field 'ranks' must give one rank per response")
            if len(set(ranks)) != len(ranks):
                raise DataError(f"{where}: field 'ranks' has ties {ranks}; a ranking must order every response")
            texts = [text for _, text in sorted(zip(ranks, texts))]
        if len({t.strip() for t in texts}) != len(texts):
            raise DataError(f"{where}: field 'responses' ranks the same text twice (a tie)")
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            prompt = normalize_messages(prompt, where, "prompt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field 'prompt' must be non-empty text or a list of turns")
        return {"prompt": prompt, "responses": texts}
    raise DataError(f"{where}: unknown preference row with fields {sorted(row)}; expected chosen/rejected "
                    "(standard, conversational, ShareGPT or HH-RLHF) or prompt/responses (a K-wise ranking)")


def prompt_of_row(row: dict, where: str):
    """The prompt of a PPO/RLOO prompt row: Alpaca, chat/ShareGPT (the turns before the last assistant answer, if
    any), a ranking or pair (its prompt), or {"prompt"}."""
    if "instruction" in row:
        instruction = row["instruction"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: field 'instruction' is empty")
        return {"instruction": instruction, "input": row.get("input") or ""}
    for field in ("messages", "conversations"):
        if field in row:
            turns = normalize_messages(row[field], where, field)
            while turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not any(t["role"] == "user" for t in turns):
                raise DataError(f"{where}: field '{field}' holds no user turn to prompt with")
            return turns
    if "chosen" in row or "responses" in row:
        return ranking_of(row, where)["prompt"]
    if isinstance(row.get("prompt"), list):
        return normalize_messages(row["prompt"], where, "prompt")
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    raise DataError(f"{where}: no prompt found in fields {sorted(row)} (expected instruction, messages, "
                    "conversations or prompt)")


def read_rankings(rows: list[dict], source: str) -> list[dict]:
    """Every row as a ranking; the first bad row raises DataError naming the file, row and field."""
    return [ranking_of(row, f"{source}: row {number}") for number, row in enumerate(rows, start=1)]


# ---------------------------------------------------------------- rankings to weighted pairs

def ranking_pairs(num_responses: int) -> list[tuple[int, int, float]]:
    """InstructGPT's K-wise expansion: all C(K,2) (better, worse) index pairs of a ranking ordered best to worst,
    each weighted 1/C(K,2) so that every prompt counts once, however many answers it has."""
    weight = 1.0 / comb(num_responses, 2)
    return [(better, worse, weight) for better, worse in combinations(range(num_responses), 2)]


def tokenize_rankings(rankings: list[dict], tokenizer, prompt_format: str, max_length: int | None,
                      source: str, overlong: str = "drop") -> tuple[list[dict], SkipCounter]:
    """Reward-model rows {chosen_ids, rejected_ids, weight, group}: every pair of every ranking, `group` the index
    of its prompt. Prompts the format cannot render are skipped and counted; rankings with an answer longer than
    max_length are skipped (overlong: drop) or have their long answers cut to fit, still ending with EOS so the
    score is read where it always is (overlong: truncate); both are counted."""
    if overlong not in ("drop", "truncate"):
        raise DataError(f"overlong must be 'drop' or 'truncate', not {overlong!r}")
    rows, skipped, cut = [], SkipCounter(), 0
    for group, ranking in enumerate(rankings):
        try:
            prompt_ids = encode_prompt(render_prompt(ranking["prompt"], tokenizer, prompt_format), tokenizer,
                                       prompt_format)
        except PromptFormatError as error:
            skipped[str(error)] += 1
            continue
        sequences = [prompt_ids + encode_response(text, tokenizer) for text in ranking["responses"]]
        if max_length and max(len(s) for s in sequences) > max_length:
            room = max_length - len(prompt_ids) - 1
            if overlong == "drop" or room < 16:
                skipped[f"longer than max_length={max_length} tokens"] += 1
                continue
            sequences = [s if len(s) <= max_length else s[: max_length - 1] + [tokenizer.eos_token_id]
                         for s in sequences]
            if len({tuple(s) for s in sequences}) < len(sequences):
                skipped[f"answers identical within max_length={max_length} tokens"] += 1
                continue
            cut += 1
        rows += [{"chosen_ids": sequences[better], "rejected_ids": sequences[worse], "weight": weight,
                  "group": group} for better, worse, weight in ranking_pairs(len(sequences))]
    skipped.report(source, len(rankings))
    if cut:
        print(f"[data] {source}: {cut} of {len(rankings)} rankings had answers cut to max_length={max_length} "
              "tokens (kept, each still ending with EOS)", flush=True)
    if not rows:
        raise DataError(f"{source}: no usable preference rows (see the skip counts above)")
    return rows, skipped


def dpo_rows(rankings: list[dict], tokenizer, prompt_format: str, source: str) -> list[dict]:
    """DPO rows {prompt, chosen, rejected} as text, the prompt rendered like SFT and each answer ending with EOS;
    a K-wise ranking gives its C(K,2) pairs (TRL's DPOTrainer has no pair weights)."""
    rows, skipped = [], SkipCounter()
    for ranking in rankings:
        try:
            prompt = render_prompt(ranking["prompt"], tokenizer, prompt_format)
        except PromptFormatError as error:
            skipped[str(error)] += 1
            continue
        responses = [text + tokenizer.eos_token for text in ranking["responses"]]
        rows += [{"prompt": prompt, "chosen": responses[b], "rejected": responses[w]}
                 for b, w, _ in ranking_pairs(len(responses))]
    skipped.report(source, len(rankings))
    if not rows:
        raise DataError(f"{source}: no usable preference rows (see the skip counts above)")
    return rows

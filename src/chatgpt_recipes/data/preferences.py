"""Preference data for the reward model and DPO: every known shape normalised into rankings (a prompt and K >= 2
responses ordered best to worst), rankings expanded into weighted pairs, tokenised (reward model) or as text
pairs (DPO).

Shapes read (one row each):
  pairwise, standard        {"prompt": str, "chosen": str, "rejected": str}
  pairwise, conversational  {"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}, or
                            whole transcripts {"chosen": [user, assistant, ...], "rejected": [...]} with or without
                            a "prompt" (UltraFeedback-binarized): the shared leading turns of the transcripts are the
                            prompt, their last assistant turns the answers
  (content may be text or OpenAI-style parts [{"type": "text", "text": ...}], read as text)
  ShareGPT pairs            {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {from, value}}
  Anthropic HH-RLHF         {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": "..."}
  K-wise ranking            {"prompt": str | [turns], "responses": [best, ..., worst]} (optional "ranks": [1, 2, ...],
                            integers, 1 the best, one per response, no ties; "2" and 2.0 read as 2)
  Alpaca-style pairs        {"instruction": str, "input": str, "chosen": str, "rejected": str} (the prompt rendered
                            like SFT's Alpaca rows; recipes/comparison_data.py writes these)
  Alpaca (PPO prompts only) {"instruction", "input", "output"}

A prompt is kept as what it is (Alpaca pieces, chat turns or verbatim text) and rendered only once the target
format is known, by chatgpt_recipes.data.templates.render_prompt, which renders SFT's and PPO's prompts too.
Reward-model and PPO sequences are then tokens(prompt) + tokens(response) + the token that ends an answer (EOS, or
the chat template's end-of-turn token in the chat format: templates.answer_end_token_id), tokenised separately,
which is exactly what PPO generates (query tokens, then sampled tokens up to the end token the SFT model learnt to
emit)."""

import json
from itertools import combinations
from math import comb

from datasets import Dataset

from chatgpt_recipes.data.rows import (DEFECT, UNUSABLE, SkipLog, cache_key, cached_dataset, check_overlong, column,
                                       content_text, kept_indices, normalize_messages, num_proc_for, raw_dataset,
                                       rows_of_batch, skips_of, source_fingerprint, tokenizer_fingerprint,
                                       train_and_eval)
from chatgpt_recipes.data.templates import answer_end_token_id, check_format, encode_prompt, render_prompt
from chatgpt_recipes.runtime.errors import DataError, PromptFormatError, RowError
from chatgpt_recipes.runtime.output import say


def encode_response(text: str, tokenizer, prompt_format: str) -> list[int]:
    """A response's token ids ending with the token that ends an answer (EOS, or the chat template's end of turn:
    templates.answer_end_token_id): the stop token PPO truncates at and the token the RM scores."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [answer_end_token_id(tokenizer, prompt_format)]


# ---------------------------------------------------------------- rows to rankings

def _response_text(value, where: str, field: str) -> str:
    if isinstance(value, dict):  # ShareGPT {from, value} / {role, content}
        value = value.get("value", value.get("content"))
    elif isinstance(value, list):  # a conversational completion: one assistant turn
        turns = [t for t in value if isinstance(t, dict)]
        if len(turns) != 1 or turns[0].get("role", turns[0].get("from")) not in ("assistant", "gpt"):
            raise RowError(where, field, f"field '{field}' must hold one assistant turn")
        value = turns[0].get("content", turns[0].get("value"))
    if value is None:
        raise RowError(where, field, f"field '{field}' is null")
    if isinstance(value, list):  # OpenAI-style content parts
        value = content_text(value, where, field)
    if not isinstance(value, str):
        raise RowError(where, field, f"field '{field}' must be text, found {type(value).__name__}")
    if not value.strip():
        raise RowError(where, field, f"field '{field}' is an empty response")
    return value


def split_hh_transcript(text: str, where: str, field: str) -> tuple[list[dict], str]:
    """An Anthropic HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as (prompt turns, final answer).
    Consecutive turns of one speaker (HH has "Assistant: ...\\n\\nAssistant: ...") are one turn."""
    turns = []
    for part in text.split("\n\nHuman:")[1:]:
        human, *assistant = part.split("\n\nAssistant:")
        for role, content in [("user", human)] + [("assistant", answer) for answer in assistant]:
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] = (turns[-1]["content"] + "\n\n" + content.strip()).strip()
            else:
                turns.append({"role": role, "content": content.strip()})
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError(where, field, f"field '{field}' is an HH transcript with no final Assistant turn")
    if not turns[-1]["content"]:
        raise RowError(where, field, f"field '{field}' has an empty final Assistant turn")
    return turns[:-1], turns[-1]["content"]


def shared_prompt(prompts: list[list[dict]]) -> list[dict]:
    """The longest common prefix of several conversations that ends with a user turn (may be empty)."""
    common = 0
    while all(len(p) > common and p[common] == prompts[0][common] for p in prompts):
        common += 1
    while common and prompts[0][common - 1]["role"] != "user":
        common -= 1
    return prompts[0][:common]


def _pair_of(row: dict, where: str) -> tuple[object, list[str], list | None]:
    """(prompt, [chosen, rejected], per-response prompts or None) of a pairwise row in any known shape. The
    per-response prompts are set when the two transcripts differ before their final answer: each answer is then
    scored after its own conversation (whole transcripts, as TRL's RewardTrainer scores HH)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "conversations" in row:  # ShareGPT
        prompt = normalize_messages(row["conversations"], where, "conversations")
        return prompt, [_response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")], None
    if isinstance(chosen, str) and "prompt" not in row and "\n\nHuman:" in chosen:  # HH-RLHF
        prompt, chosen_text = split_hh_transcript(chosen, where, "chosen")
        rejected_prompt, rejected_text = split_hh_transcript(_response_text(rejected, where, "rejected"), where,
                                                             "rejected")
        if rejected_prompt != prompt:
            return (shared_prompt([prompt, rejected_prompt]), [chosen_text, rejected_text],
                    [prompt, rejected_prompt])
        return prompt, [chosen_text, rejected_text], None
    if isinstance(chosen, list) and ("prompt" not in row or _is_transcript(chosen)):  # conversational transcripts
        chosen_turns = normalize_messages(chosen, where, "chosen")
        rejected_turns = normalize_messages(rejected, where, "rejected")
        if chosen_turns[-1]["role"] != "assistant" or rejected_turns[-1]["role"] != "assistant":
            raise RowError(where, "chosen", "'chosen' and 'rejected' must each end with an assistant answer")
        answers = [_response_text(chosen_turns[-1], where, "chosen"), _response_text(rejected_turns[-1], where,
                                                                                       "rejected")]
        if chosen_turns[:-1] != rejected_turns[:-1]:
            return (shared_prompt([chosen_turns[:-1], rejected_turns[:-1]]), answers,
                    [chosen_turns[:-1], rejected_turns[:-1]])
        return chosen_turns[:-1], answers, None
    if "instruction" in row and "prompt" not in row:  # Alpaca pieces, rendered like SFT's Alpaca rows
        return (_alpaca_prompt(row, where), [_response_text(chosen, where, "chosen"),
                                             _response_text(rejected, where, "rejected")], None)
    if "prompt" not in row:
        raise RowError(where, "prompt", f"missing field 'prompt' (fields present: {sorted(row)})")
    return (_prompt_field(row, where), [_response_text(chosen, where, "chosen"),
                                        _response_text(rejected, where, "rejected")], None)


def _is_transcript(value: list) -> bool:
    """A list of turns that holds more than the answer: a whole conversation (UltraFeedback-binarized's chosen and
    rejected repeat the prompt's user turn although the row also has a prompt field)."""
    return any(isinstance(t, dict) and t.get("role", t.get("from")) not in ("assistant", "gpt") for t in value)


def same_text(first: str, second: str) -> bool:
    """Equal once whitespace is normalised: answers that differ only in spacing teach no preference."""
    return first.split() == second.split()


def _ranks(row: dict, where: str, count: int) -> list[int]:
    """The `ranks` of a K-wise row as integers (2, 2.0 and "2" read as 2), one per response, without ties."""
    ranks = row["ranks"]
    if not isinstance(ranks, list) or len(ranks) != count:
        raise RowError(where, "ranks", f"field 'ranks' must give one rank per response ({count}), found "
                       + (f"{len(ranks)}" if isinstance(ranks, list) else type(ranks).__name__))
    numbers = []
    for index, rank in enumerate(ranks):
        if isinstance(rank, str):
            try:
                rank = int(rank.strip())
            except ValueError:
                pass
        elif isinstance(rank, float) and rank.is_integer():
            rank = int(rank)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise RowError(where, "ranks", f"field 'ranks' must hold integers, found {rank!r} at position {index}")
        numbers.append(rank)
    if len(set(numbers)) != len(numbers):
        raise RowError(where, "ranks", f"field 'ranks' has ties {numbers}; a ranking must order every response")
    return numbers


def _alpaca_prompt(row: dict, where: str) -> dict:
    instruction = row["instruction"]
    if instruction is None or (isinstance(instruction, str) and not instruction.strip()):
        raise RowError(where, "instruction", "field 'instruction' is " + ("null" if instruction is None else "empty"))
    if not isinstance(instruction, str):
        raise RowError(where, "instruction", f"field 'instruction' must be text, found {type(instruction).__name__}")
    text_input = row.get("input") or ""
    if not isinstance(text_input, str):
        raise RowError(where, "input", f"field 'input' must be text, found {type(text_input).__name__}")
    return {"instruction": instruction, "input": text_input}


def _prompt_field(row: dict, where: str):
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return normalize_messages(prompt, where, "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(where, "prompt", "field 'prompt' must be non-empty text or a list of turns"
                       + (f", found {type(prompt).__name__}" if not isinstance(prompt, str) else ""))
    return prompt


def ranking_of(row: dict, where: str) -> dict:
    """One row as {"prompt", "responses": [best, ..., worst]} (plus "response_prompts" when each answer has its own
    conversation); RowError names the row and field when it is bad."""
    if "chosen" in row and "rejected" in row:
        prompt, responses, response_prompts = _pair_of(row, where)
        if same_text(responses[0], responses[1]) and response_prompts is None:
            raise RowError(where, "rejected", "'chosen' and 'rejected' are the same text, so they teach no preference")
        ranking = {"prompt": prompt, "responses": responses}
        if response_prompts is not None:
            ranking["response_prompts"] = response_prompts
        return ranking
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise RowError(where, "responses", f"field 'responses' must rank at least 2 responses, found "
                           f"{len(responses) if isinstance(responses, list) else type(responses).__name__}")
        texts = [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        if "ranks" in row:
            ranks = _ranks(row, where, len(texts))
            texts = [text for _, text in sorted(zip(ranks, texts))]
        if len({tuple(t.split()) for t in texts}) != len(texts):
            raise RowError(where, "responses", "field 'responses' ranks the same text twice (a tie)")
        return {"prompt": _prompt_field(row, where), "responses": texts}
    raise RowError(where, None, f"unknown preference row with fields {sorted(row)}; expected chosen/rejected "
                                "(standard, conversational, ShareGPT or HH-RLHF) or prompt/responses (a K-wise ranking)")


def prompt_of_row(row: dict, where: str):
    """The prompt of a PPO/RLOO prompt row: Alpaca, chat/ShareGPT (the turns before the last assistant answer, if
    any), a ranking or pair (its prompt), or {"prompt"}."""
    if "instruction" in row:
        return _alpaca_prompt(row, where)
    for field in ("messages", "conversations"):
        if field in row:
            turns = normalize_messages(row[field], where, field)
            while turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not any(t["role"] == "user" for t in turns):
                raise RowError(where, field, f"field '{field}' holds no user turn to prompt with")
            return turns
    if "chosen" in row or "responses" in row:
        ranking = ranking_of(row, where)
        if not ranking["prompt"]:
            raise RowError(where, "chosen", "the two transcripts share no prompt")
        return ranking["prompt"]
    if "prompt" in row:
        return _prompt_field(row, where)
    raise RowError(where, None, f"no prompt found in fields {sorted(row)} (expected instruction, messages, "
                                "conversations or prompt)")


def read_rankings(rows: list[dict], source: str, max_skipped_fraction: float = 0.05,
                  skips: SkipLog | None = None) -> list[dict]:
    """Every usable row as a ranking. Defective rows are skipped and counted (into `skips` when given); more
    than `max_skipped_fraction` of them is a DataError naming the first ones."""
    skips = SkipLog() if skips is None else skips
    rankings = []
    for number, row in enumerate(rows, start=1):
        try:
            rankings.append(ranking_of(row, f"{source}: row {number}"))
        except RowError as error:
            skips.add(source, number, error.field, error.reason)
    skips.report(source, len(rows))
    skips.check_fraction(source, len(rows), max_skipped_fraction)
    if not rankings:
        raise DataError(f"{source}: no usable preference rows")
    return rankings


# ---------------------------------------------------------------- rankings to weighted pairs

def ranking_pairs(num_responses: int) -> list[tuple[int, int, float]]:
    """InstructGPT's K-wise expansion: all C(K,2) (better, worse) index pairs of a ranking ordered best to worst,
    each weighted 1/C(K,2) so that every prompt counts once, however many answers it has."""
    weight = 1.0 / comb(num_responses, 2)
    return [(better, worse, weight) for better, worse in combinations(range(num_responses), 2)]


def _without_oldest_turns(prompt, count: int):
    """A chat prompt without its `count` oldest turns after any leading system turn; text prompts as they are."""
    if not count or not isinstance(prompt, list):
        return prompt
    system = 1 if prompt and prompt[0]["role"] == "system" else 0
    return prompt[:system] + prompt[system + count:]


def _droppable_turns(prompt) -> int:
    """How many oldest turns of a prompt can go in whole exchanges (user + assistant), the final user turn kept."""
    if not isinstance(prompt, list):
        return 0
    turns = len(prompt) - (1 if prompt and prompt[0]["role"] == "system" else 0)
    return max(turns - 1, 0) // 2 * 2


def with_system_prompt(prompt, system_prompt: str | None):
    """A chat prompt with `system_prompt` as its system turn when it has none (None: the chat template's own
    default, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM ..."; "": an empty system turn)."""
    if system_prompt is None or isinstance(prompt, dict):
        return prompt
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if turns and turns[0]["role"] == "system":
        return turns
    return [{"role": "system", "content": system_prompt}] + turns


def _drop_oldest_turns_to_fit(prompts: list, prompt_ids_without, too_long) -> tuple[int, list[list[int]]]:
    """(how many oldest turns go, the prompts' token ids without them): whole exchanges, the same count from every
    conversation, until `too_long` is false or only the final user turn is left."""
    count, prompt_ids = 0, prompt_ids_without(0)
    droppable = min(_droppable_turns(p) for p in prompts)
    while too_long(prompt_ids) and count < droppable:
        count += 2
        prompt_ids = prompt_ids_without(count)
    return count, prompt_ids


NO_CUT = {"turns_dropped": 0, "prompt_tokens_cut": 0, "answers_cut": 0}


def fit_ranking(prompts: list, answers: list[str], tokenizer, prompt_format: str,
                max_length: int | None) -> tuple[list[list[int]], dict]:
    """The sequences tokens(prompt) + tokens(answer) + end token of one ranking, cut from the left to max_length, and
    what was cut. The oldest exchanges go first, the same number from every response's conversation, so a prompt
    the answers share stays identical on all sides; the final user turn and the answers stay whole. Only when that
    final exchange alone does not fit is the prompt cut at the token level from the left, to no less than half
    of max_length (or its whole length), and an answer that still does not fit is cut at its end, still ending
    with the token that ends an answer (where the reward model reads its score)."""
    answer_ids = [encode_response(text, tokenizer, prompt_format) for text in answers]

    def prompt_ids_without(count):
        return [encode_prompt(render_prompt(_without_oldest_turns(p, count), tokenizer, prompt_format), tokenizer,
                              prompt_format) for p in prompts]

    def too_long(prompt_ids):
        return max_length and any(len(p) + len(a) > max_length for p, a in zip(prompt_ids, answer_ids))

    cut, prompt_ids = dict(NO_CUT), prompt_ids_without(0)
    cut["turns_dropped"], prompt_ids = _drop_oldest_turns_to_fit(prompts, prompt_ids_without, too_long)
    if too_long(prompt_ids):
        longest_prompt = max(len(p) for p in prompt_ids)
        keep = max(max_length - max(len(a) for a in answer_ids), min(longest_prompt, max_length // 2))
        cut["prompt_tokens_cut"] = max(longest_prompt - keep, 0)
        prompt_ids = [p[-keep:] for p in prompt_ids]
        end = answer_end_token_id(tokenizer, prompt_format)
        fitted = [a if len(p) + len(a) <= max_length else a[: max_length - len(p) - 1] + [end]
                  for p, a in zip(prompt_ids, answer_ids)]
        cut["answers_cut"] = sum(f is not a for f, a in zip(fitted, answer_ids))
        answer_ids = fitted
    return [p + a for p, a in zip(prompt_ids, answer_ids)], cut


def ranking_sequences(ranking: dict, tokenizer, prompt_format: str, max_length: int | None, overlong: str,
                      system_prompt: str | None = None) -> tuple[list[list[int]], dict]:
    """The token ids the reward model scores for each response of a ranking: tokens(prompt) + tokens(answer) +
    EOS, each answer after its own conversation when it has one, and what was cut to fit max_length (see
    `fit_ranking`; overlong: truncate). Raises PromptFormatError, or SkipRanking for a ranking longer than
    max_length under overlong: drop."""
    prompts = ranking.get("response_prompts") or [ranking["prompt"]] * len(ranking["responses"])
    if prompt_format == "chat":
        prompts = [with_system_prompt(p, system_prompt) for p in prompts]
    if overlong == "drop":
        sequences, _ = fit_ranking(prompts, ranking["responses"], tokenizer, prompt_format, None)
        if max_length and max(len(s) for s in sequences) > max_length:
            raise SkipRanking(f"longer than max_length={max_length} tokens")
        return sequences, dict(NO_CUT)
    sequences, cut = fit_ranking(prompts, ranking["responses"], tokenizer, prompt_format, max_length)
    # Any cut can make two sequences token-identical: answers cut at their end, or, when each answer follows its own
    # conversation and their final answers are the same text, the oldest turns (where they differ) dropped
    if len({tuple(s) for s in sequences}) < len(sequences):
        raise SkipRanking(f"chosen and rejected identical within max_length={max_length} tokens")
    return sequences, cut


class SkipRanking(Exception):
    """A ranking that is fine but does not fit this run (too long, overlong: drop)."""


def truncation_counts(cuts: list[dict]) -> dict:
    """How many rankings were cut, and how: oldest turns dropped, prompt tokens cut, answers cut."""
    return {"truncated": sum(any(c.values()) for c in cuts),
            "turns_dropped": sum(c["turns_dropped"] > 0 for c in cuts),
            "prompt_cut": sum(c["prompt_tokens_cut"] > 0 for c in cuts),
            "answer_cut": sum(c["answers_cut"] > 0 for c in cuts)}


def report_truncation(source: str, counts: dict, total: int, max_length: int | None) -> None:
    if counts["truncated"]:
        say(f"[data] {source}: {counts['truncated']} of {total} rankings cut from the left to max_length="
            f"{max_length} tokens and kept ({counts['turns_dropped']} lost their oldest turns, "
            f"{counts['prompt_cut']} the start of their last prompt, {counts['answer_cut']} the end of an answer)",
            flush=True)


def truncation_markdown(truncation: dict) -> str:
    """The report's table of `truncation_counts` per split."""
    lines = ["| split | prompts cut | oldest turns dropped | last prompt cut at its start | answer cut at its end |",
             "|---|---|---|---|---|"]
    lines += [f"| {split} | {c['truncated']} | {c['turns_dropped']} | {c['prompt_cut']} | {c['answer_cut']} |"
              for split, c in truncation.items()]
    return "\n".join(lines)


def tokenize_rankings(rankings: list[dict], tokenizer, prompt_format: str, max_length: int | None,
                      source: str, overlong: str = "drop", system_prompt: str | None = None
                      ) -> tuple[list[dict], SkipLog]:
    """Reward-model rows {chosen_ids, rejected_ids, weight, group}: every pair of every ranking, `group` the index
    of its prompt. Prompts the format cannot render are skipped and counted; rankings longer than max_length are
    cut from the left (overlong: truncate, see `fit_ranking`; counted) or skipped (overlong: drop; counted)."""
    check_overlong(overlong)
    rows, skipped, cuts = [], SkipLog(), []
    for group, ranking in enumerate(rankings):
        try:
            sequences, cut = ranking_sequences(ranking, tokenizer, prompt_format, max_length, overlong, system_prompt)
        except (PromptFormatError, SkipRanking) as error:
            skipped.add(source, group + 1, None, str(error), UNUSABLE)
            continue
        cuts.append(cut)
        rows += [{"chosen_ids": sequences[better], "rejected_ids": sequences[worse], "weight": weight,
                  "group": group} for better, worse, weight in ranking_pairs(len(sequences))]
    skipped.report(source, len(rankings))
    report_truncation(source, truncation_counts(cuts), len(rankings), max_length)
    if not rows:
        raise DataError(f"{source}: no usable preference rows (see the skip counts above)")
    return rows, skipped


def dpo_pairs(ranking: dict, tokenizer, prompt_format: str, max_length: int | None = None) -> list[dict]:
    """DPO rows {prompt, chosen, rejected} of one ranking as text (see `fit_dpo_pairs`, which also says what was cut
    to fit max_length)."""
    return fit_dpo_pairs(ranking, tokenizer, prompt_format, max_length)[0]


def fit_dpo_pairs(ranking: dict, tokenizer, prompt_format: str, max_length: int | None = None
                  ) -> tuple[list[dict], dict]:
    """(DPO rows {prompt, chosen, rejected} of one ranking as text, what was cut to fit max_length). The prompt is
    rendered like SFT and each answer ends with the token that ends an answer (its text; TRL's DPOTrainer then
    adds no EOS of its own, see recipes/dpo.py). When the answers follow different conversations, the prompt is
    their longest common prefix ending with a user turn and each answer is the rest of its own transcript.
    A conversation longer than max_length is cut here, from the left, as the reward model's are (`fit_ranking`):
    its oldest exchanges first, the same ones on every side; then, when the final prompt alone leaves too little
    room, its start at the token level (to no less than half of max_length). What still does not fit is an answer
    longer than the room left, whose end TRL's DPOTrainer cuts (truncation_mode keep_start): counted as
    `answers_cut`. A ranking whose answers are identical within max_length raises SkipRanking."""
    cut = dict(NO_CUT)
    if max_length:
        ranking, cut["turns_dropped"] = _dpo_ranking_to_fit(ranking, tokenizer, prompt_format, max_length)
    end = tokenizer.convert_ids_to_tokens(answer_end_token_id(tokenizer, prompt_format))
    responses = [text + end for text in ranking["responses"]]
    if ranking.get("response_prompts"):
        prompt = render_prompt(ranking["prompt"], tokenizer, prompt_format) if ranking["prompt"] else ""
        full = [render_prompt(p, tokenizer, prompt_format) + r for p, r in zip(ranking["response_prompts"], responses)]
        if not all(text.startswith(prompt) for text in full):
            raise PromptFormatError("the chat template does not render the shared prompt as a prefix of both "
                                    "transcripts")
        responses = [text[len(prompt):] for text in full]
    else:
        prompt = render_prompt(ranking["prompt"], tokenizer, prompt_format)
    if max_length:
        prompt, responses = _dpo_cut_to_fit(prompt, responses, tokenizer, prompt_format, max_length, cut)
    elif len(set(responses)) < len(responses):
        raise SkipRanking("chosen and rejected identical")
    return [{"prompt": prompt, "chosen": responses[b], "rejected": responses[w]}
            for b, w, _ in ranking_pairs(len(responses))], cut


def _dpo_cut_to_fit(prompt: str, responses: list[str], tokenizer, prompt_format: str, max_length: int,
                    cut: dict) -> tuple[str, list[str]]:
    """The prompt cut at its start when it leaves an answer too little room (recorded in `cut`, with the answers
    TRL will cut at their end); SkipRanking when the answers are the same within what TRL keeps."""
    prompt_ids = encode_prompt(prompt, tokenizer, prompt_format) if prompt else []
    answer_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in responses]
    if len(prompt_ids) + max(len(a) for a in answer_ids) > max_length:
        keep = max(max_length - max(len(a) for a in answer_ids), min(len(prompt_ids), max_length // 2))
        if keep < len(prompt_ids):
            prompt = tokenizer.decode(prompt_ids[-keep:], skip_special_tokens=False)
            cut["prompt_tokens_cut"] = len(prompt_ids) - keep
            prompt_ids = encode_prompt(prompt, tokenizer, prompt_format)  # as TRL will tokenise the cut text
    room = max_length - len(prompt_ids)
    cut["answers_cut"] = sum(len(a) > room for a in answer_ids)
    if len({tuple(a[:room]) for a in answer_ids}) < len(answer_ids):
        raise SkipRanking(f"chosen and rejected identical within max_length={max_length} tokens")
    return prompt, responses


def _dpo_ranking_to_fit(ranking: dict, tokenizer, prompt_format: str, max_length: int) -> tuple[dict, int]:
    """The ranking without its oldest exchanges, as many as fitting max_length takes (`fit_ranking`), and how many."""
    prompts = ranking.get("response_prompts") or [ranking["prompt"]] * len(ranking["responses"])
    answer_lengths = [len(encode_response(text, tokenizer, prompt_format)) for text in ranking["responses"]]

    def prompt_ids_without(count):
        return [encode_prompt(render_prompt(_without_oldest_turns(p, count), tokenizer, prompt_format), tokenizer,
                              prompt_format) for p in prompts]

    def too_long(prompt_ids):
        return any(len(p) + a > max_length for p, a in zip(prompt_ids, answer_lengths))

    count, _ = _drop_oldest_turns_to_fit(prompts, prompt_ids_without, too_long)
    if not count:
        return ranking, 0
    fitted = {**ranking, "prompt": _without_oldest_turns(ranking["prompt"], count)}
    if ranking.get("response_prompts"):
        fitted["response_prompts"] = [_without_oldest_turns(p, count) for p in ranking["response_prompts"]]
        if not any(t["role"] == "user" for t in fitted["prompt"]):
            fitted["prompt"] = []
    return fitted, count


def dpo_rows(rankings: list[dict], tokenizer, prompt_format: str, source: str,
             max_length: int | None = None) -> list[dict]:
    """DPO rows {prompt, chosen, rejected} of every ranking (see `dpo_pairs`); a K-wise ranking gives its C(K,2)
    pairs (TRL's DPOTrainer has no pair weights)."""
    rows, skipped = [], SkipLog()
    for number, ranking in enumerate(rankings, start=1):
        try:
            rows += dpo_pairs(ranking, tokenizer, prompt_format, max_length)
        except (PromptFormatError, SkipRanking) as error:
            skipped.add(source, number, None, str(error), UNUSABLE)
    skipped.report(source, len(rankings))
    if not rows:
        raise DataError(f"{source}: no usable preference rows (see the skip counts above)")
    return rows


# ---------------------------------------------------------------- prepared (cached) preference datasets

def _normalise_preference_batch(batch, columns, source):
    out = {"row": [], "ranking": [], "skip_field": [], "skip_reason": [], "skip_kind": []}
    for number, row in rows_of_batch(batch, columns, source):
        out["row"].append(number)
        try:
            out["ranking"].append(json.dumps(ranking_of(row, f"row {number}"), ensure_ascii=False))
            out["skip_field"].append(""), out["skip_reason"].append(""), out["skip_kind"].append("")
        except RowError as error:
            out["ranking"].append("")
            out["skip_field"].append(error.field or ""), out["skip_reason"].append(error.reason)
            out["skip_kind"].append(DEFECT)
    return out


def _reward_batch(batch, tokenizer, prompt_format, max_length, overlong, system_prompt):
    sequences, reasons, kinds = [], list(batch["skip_reason"]), list(batch["skip_kind"])
    cuts = {key: [] for key in NO_CUT}
    for i, ranking in enumerate(batch["ranking"]):
        ids, cut = [], NO_CUT
        if not reasons[i]:
            try:
                ids, cut = ranking_sequences(json.loads(ranking), tokenizer, prompt_format, max_length, overlong,
                                             system_prompt)
            except (PromptFormatError, SkipRanking) as error:
                reasons[i], kinds[i] = str(error), UNUSABLE
        sequences.append(ids)
        for key in cuts:
            cuts[key].append(cut[key])
    return {"sequences": sequences, "skip_reason": reasons, "skip_kind": kinds, **cuts}


def _dpo_batch(batch, tokenizer, prompt_format, max_length):
    pairs, reasons, kinds = [], list(batch["skip_reason"]), list(batch["skip_kind"])
    cuts = {key: [] for key in NO_CUT}
    for i, ranking in enumerate(batch["ranking"]):
        rows, cut = [], NO_CUT
        if not reasons[i]:
            try:
                rows, cut = fit_dpo_pairs(json.loads(ranking), tokenizer, prompt_format, max_length)
            except (PromptFormatError, SkipRanking) as error:
                reasons[i], kinds[i] = str(error), UNUSABLE
        pairs.append(json.dumps(rows, ensure_ascii=False))
        for key in cuts:
            cuts[key].append(cut[key])
    return {"pairs": pairs, "skip_reason": reasons, "skip_kind": kinds, **cuts}


class PreparedRankings:
    """A prepared preference source: every row (skips flagged) and the skips. `examples` are the rankings a
    held-out split is drawn from (every row without a defect, as `read_rankings` returns them, so evaluation
    reproduces the split); `fits` those this run can use (rendered in its format, within max_length)."""

    def __init__(self, source: str, dataset: Dataset, max_skipped_fraction: float):
        self.source, self.dataset, self.total = source, dataset, len(dataset)
        self.skips = skips_of(dataset, source)
        self.examples = [i for i, kind in enumerate(column(dataset, "skip_kind")) if kind != DEFECT]
        self.fits = set(kept_indices(dataset))
        self.skips.report(source, self.total)
        self.skips.check_fraction(source, self.total, max_skipped_fraction)
        if not self.fits:
            raise DataError(f"{source}: no usable preference rows (see the skip counts above)")

    def usable(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i in self.fits]

    def truncation(self, indices: list[int]) -> dict:
        """How many of the usable rankings at `indices` were cut to max_length, and how (`truncation_counts`)."""
        if "turns_dropped" not in self.dataset.column_names:
            return truncation_counts([])
        usable = self.usable(indices)
        columns = {key: column(self.dataset, key) for key in NO_CUT}
        return truncation_counts([{key: columns[key][i] for key in NO_CUT} for i in usable])

    def reward_pairs(self, indices: list[int]) -> Dataset:
        """{chosen_ids, rejected_ids, weight, group} of the rankings at `indices`: every pair of each, weighted
        1/C(K,2); `group` numbers the rankings."""
        return self.dataset.select(self.usable(indices)).map(
            _expand_rankings, batched=True, with_indices=True, remove_columns=self.dataset.column_names,
            desc="Pairs")

    def dpo_dataset(self, indices: list[int]) -> Dataset:
        return self.dataset.select(self.usable(indices)).map(_expand_dpo, batched=True, remove_columns=self.dataset.column_names,
                                                desc="Pairs")


def _expand_rankings(batch, indices):
    out = {"chosen_ids": [], "rejected_ids": [], "weight": [], "group": []}
    for group, sequences in zip(indices, batch["sequences"]):
        for better, worse, weight in ranking_pairs(len(sequences)):
            out["chosen_ids"].append(sequences[better])
            out["rejected_ids"].append(sequences[worse])
            out["weight"].append(weight)
            out["group"].append(group)
    return out


def _expand_dpo(batch):
    out = {"prompt": [], "chosen": [], "rejected": []}
    for pairs in batch["pairs"]:
        for pair in json.loads(pairs):
            for key in out:
                out[key].append(pair[key])
    return out


def prepare_rankings(source: str, split: str, tokenizer, prompt_format: str, purpose: str,
                     max_length: int | None = None, overlong: str = "drop", columns: dict | None = None,
                     num_proc: int | None = None, max_skipped_fraction: float = 0.05,
                     system_prompt: str | None = None) -> PreparedRankings:
    """Preference rows of `source` as rankings, rendered and (purpose "reward") tokenised or (purpose "dpo") as
    text pairs, once, cached under the file's content, the tokenizer and these options. Conversations longer than
    max_length are cut from the left (see `fit_ranking`, `dpo_pairs`)."""
    check_overlong(overlong)
    check_format(prompt_format)
    columns = columns or {}
    key = cache_key(purpose, source_fingerprint(source, split), tokenizer_fingerprint(tokenizer), prompt_format,
                    max_length, overlong, columns, system_prompt)

    def build() -> Dataset:
        raw = raw_dataset(source, split)
        workers = num_proc_for(num_proc, len(raw))
        rows = raw.map(_normalise_preference_batch, batched=True, batch_size=500, num_proc=workers,
                       remove_columns=raw.column_names, fn_kwargs={"columns": columns, "source": source},
                       new_fingerprint=key + "-rows", desc="Normalising rows")
        if purpose == "reward":
            return rows.map(_reward_batch, batched=True, batch_size=200, num_proc=workers, new_fingerprint=key,
                            fn_kwargs={"tokenizer": tokenizer, "prompt_format": prompt_format,
                                       "max_length": max_length, "overlong": overlong,
                                       "system_prompt": system_prompt}, desc="Tokenising")
        return rows.map(_dpo_batch, batched=True, batch_size=200, num_proc=workers, new_fingerprint=key,
                        fn_kwargs={"tokenizer": tokenizer, "prompt_format": prompt_format,
                                   "max_length": max_length}, desc="Rendering")

    return PreparedRankings(source, cached_dataset(key, build, source), max_skipped_fraction)


def prepare_train_eval_rankings(config, tokenizer, purpose: str, **options):
    """The training and held-out rankings of a reward-model or DPO run: the eval file's own split when the config
    names one (`eval_dataset_name`), else a seeded carve-out of the training file; `max_train_samples` applied.
    Returns (train data, eval data, train rankings, eval rankings, the skips of both files, the eval source or
    None)."""
    train_data = prepare_rankings(config.dataset_name, config.dataset_split, tokenizer, config.prompt_format,
                                  purpose, **options)
    eval_data, train_rankings, eval_rankings, skips, separate = train_and_eval(
        config, train_data, lambda source, split: prepare_rankings(source, split, tokenizer, config.prompt_format,
                                                                    purpose, **options))
    return train_data, eval_data, train_rankings, eval_rankings, skips, separate

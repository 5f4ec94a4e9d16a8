"""Self-instruct as Alpaca ran it (stanford_alpaca's generate_instruction.py, reimplemented): request prompts built
from seed tasks, completions parsed into tasks, the filters, sequential ROUGE-L dedup, the resumable output file and
the generation report. The generators (a local model, an OpenAI-compatible server) are in
chatgpt_recipes/self_instruct/generators.py."""

import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chatgpt_recipes.runtime.errors import DataError

NO_INPUT = "<noinput>"
MAX_TASKS_PER_COMPLETION = 20
# Instructions a language model cannot carry out (visual or audio output, files, actions): Alpaca's list
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(word) for word in BLACKLIST) + r")\b", re.IGNORECASE)
# "4. Instruction:", "4. Input:", "4. Output:" (any task number, any spacing)
_FIELD_RE = re.compile(r"(\d+)\s*\.\s*(Instruction|Input|Output)\s*:")
_INSTRUCTION_RE = re.compile(r"\d+\s*\.\s*Instruction\s*:")
_STARTS_WITH_INSTRUCTION_RE = re.compile(r"\s*" + _INSTRUCTION_RE.pattern)
# Why a candidate task was dropped, in the order the report lists them
REJECT_REASONS = {
    "parse": "a block without exactly one Instruction, Input and Output (or with an empty instruction or output)",
    "truncated": "the last block of a completion that stopped for length",
    "length": "instruction of 3 words or fewer, or more than 150",
    "blacklist": "instruction names something a language model cannot do (image, file, draw, music, ...)",
    "write a program": "instruction starts with 'Write a program'",
    "punctuation start": "instruction starts with punctuation",
    "non-ascii start": "instruction starts with a non-ASCII character",
    "similarity": "ROUGE-L above the threshold against a seed or an already kept instruction",
}


@dataclass
class Task:
    instruction: str
    input: str
    output: str

    def row(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


# Inputs -------------------------------------------------------------------------------------------------------

def read_seed_tasks(path: str) -> list[Task]:
    """Seed tasks from a self-instruct seed file (JSONL `{instruction, instances: [{input, output}], ...}`, each
    task's first instance used, as Alpaca did) or from Alpaca-format rows `{instruction, input, output}`."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"seed task file not found: {path}")
    tasks = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields, found {type(row).__name__}")
        if "instances" in row:
            if not isinstance(row["instances"], list) or not row["instances"]:
                raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
            example, example_where = row["instances"][0], f"{where}: instances[0]"
        else:
            example, example_where = row, where
        if not isinstance(example, dict):
            raise DataError(f"{example_where}: expected an object with fields input and output")
        fields = {"instruction": (row, where), "input": (example, example_where), "output": (example, example_where)}
        values = {}
        for name, (source, source_where) in fields.items():
            value = source.get(name)
            if value is None:
                raise DataError(f"{source_where}: missing field '{name}' (fields present: {sorted(source)})")
            if not isinstance(value, str):
                raise DataError(f"{source_where}: field '{name}' must be text, found {type(value).__name__}")
            values[name] = value
        if not values["instruction"].strip():
            raise DataError(f"{where}: field 'instruction' is empty")
        tasks.append(Task(**values))
    if not tasks:
        raise DataError(f"{path}: the file holds no seed tasks")
    return tasks


def read_instruction_prompt(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"instruction prompt file not found: {path}")
    text = file.read_text(encoding="utf-8").strip()
    if not text:
        raise DataError(f"{path}: the instruction prompt is empty")
    return text


# Requests and their completions -------------------------------------------------------------------------------

def render_task(number: int, task: Task) -> str:
    """One numbered example block; an empty input is written <noinput>."""
    instruction = " ".join(task.instruction.split()).rstrip(":")
    return (f"{number}. Instruction: {instruction}\n{number}. Input:\n{task.input or NO_INPUT}\n"
            f"{number}. Output:\n{task.output}\n")


def build_request_prompt(instruction_prompt: str, examples: list[Task]) -> str:
    """The instruction prompt, the examples as blocks between ### lines, and the next task's `N. Instruction:`
    for the model to continue."""
    blocks = "".join(f"###\n{render_task(number, task)}" for number, task in enumerate(examples, start=1))
    return f"{instruction_prompt}\n\n{blocks}###\n{len(examples) + 1}. Instruction:"


def sample_request_prompts(instruction_prompt: str, seeds: list[Task], examples_per_prompt: int, count: int,
                           rng: random.Random) -> list[str]:
    return [build_request_prompt(instruction_prompt, rng.sample(seeds, examples_per_prompt)) for _ in range(count)]


def parse_completion(text: str, first_number: int, stopped_for_length: bool) -> tuple[list[Task], Counter]:
    """Tasks from a completion of a request prompt ending in `{first_number}. Instruction:`, at most 20, and the
    count of blocks that did not parse. A chat model that restates `N. Instruction:` is read the same way, and
    a preamble it writes before that first `N. Instruction:` ("Here are more tasks:") is skipped."""
    rejects = Counter()
    if not _STARTS_WITH_INSTRUCTION_RE.match(text):
        restated = _INSTRUCTION_RE.search(text.split("###", 1)[0])
        text = text[restated.start():] if restated else f"{first_number}. Instruction:{text}"
    blocks = text.split("###")
    if stopped_for_length:
        if blocks[-1].strip():
            rejects["truncated"] += 1
        blocks = blocks[:-1]
    tasks = []
    for block in blocks:
        if not block.strip():
            continue
        if len(tasks) == MAX_TASKS_PER_COMPLETION:
            break
        parts = _FIELD_RE.split(block)  # [before, number, field, text, number, field, text, ...]
        numbers, names, values = parts[1::3], parts[2::3], [value.strip() for value in parts[3::3]]
        if names != ["Instruction", "Input", "Output"] or len(set(numbers)) != 1:
            rejects["parse"] += 1
            continue
        instruction, task_input, output = values
        if not instruction or not output:
            rejects["parse"] += 1
            continue
        tasks.append(Task(" ".join(instruction.split()), "" if task_input.lower() == NO_INPUT else task_input,
                          output))
    return tasks, rejects


def filter_reason(instruction: str, drop_non_ascii_start: bool = True) -> str | None:
    """Why Alpaca's filters drop this instruction (a REJECT_REASONS key), or None when it passes."""
    words = len(instruction.split())
    if words <= 3 or words > 150:
        return "length"
    if _BLACKLIST_RE.search(instruction):
        return "blacklist"
    # The model tends to prefix existing tasks with "Write a program", and whether the answer is the program or its
    # result is then unclear
    if instruction.startswith("Write a program"):
        return "write a program"
    if instruction[0] in string.punctuation:
        return "punctuation start"
    if drop_non_ascii_start and not instruction[0].isascii():
        return "non-ascii start"
    return None


# The output file: appended after every batch, read back on a rerun --------------------------------------------

def read_output_rows(path: Path) -> list[dict]:
    """The rows a previous run kept. A JSONL line cut off by a killed process (no newline, not valid JSON) is
    removed from the file; any other bad row is an error naming its line."""
    if not path.is_file():
        return []
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8") or "[]")
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); move it away to start "
                            "over") from error
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of {{instruction, input, output}} rows")
        numbered = list(enumerate(rows, start=1))
    else:
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # no newline at the end: the last write was interrupted
            complete = data[: len(data) - len(lines[-1])]
            print(f"[self_instruct] {path}: dropping a partial last line left by an interrupted write", flush=True)
            with open(path, "r+b") as file:
                file.truncate(len(complete))
            lines = complete.split(b"\n")
        numbered = []
        for number, line in enumerate(lines[:-1], start=1):
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from error
    for number, row in numbered:
        where = f"{path}: {'row' if path.suffix == '.json' else 'line'} {number}"
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise DataError(f"{where}: expected an object with a text field 'instruction'; is this file the output "
                            "of self_instruct.py?")
    return [row for _, row in numbered]


def append_output_rows(path: Path, rows: list[dict], all_rows: list[dict]) -> None:
    """Add `rows` to the output for good: JSONL gets the lines appended and synced; a JSON list (`all_rows`, rows
    included) is rewritten into a temporary file that replaces the old one, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(all_rows, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(temporary, path)
        return
    with open(path, "a", encoding="utf-8") as file:
        file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())


def read_generation_log(path: Path) -> list[dict]:
    """One record per finished batch (see the recipe); a line cut off by a kill is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_generation_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")


# The report ---------------------------------------------------------------------------------------------------

# Openings that come before an instruction's verb: an introductory phrase ending in a comma ("Given a list of
# numbers, find ...", "Using the facts given, write ...", "In this task, ...") and words in front of the verb
_INTRODUCTORY_WORDS = {"given", "using", "in", "based", "as", "to", "for", "with", "from", "after", "according",
                       "considering", "if", "when"}
_BEFORE_THE_VERB = [("please",), ("you", "need", "to"), ("you", "have", "to"), ("you", "should"), ("you", "must"),
                    ("you", "will"), ("you", "are", "asked", "to"), ("can", "you"), ("could", "you"),
                    ("would", "you")]
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def leading_word(instruction: str) -> str:
    """The instruction's leading verb, lower-cased, as far as words alone tell it (Self-Instruct's paper used a
    parser): the first word, after an introductory phrase ending in a comma ("Given a sentence, classify ..." ->
    "classify"; "You are given ..., and you need to create ..." -> "create") and after "please", "you need to",
    "can you" and the like. A question keeps its question word ("what", "how"); a statement its first word."""
    text = instruction.lower()
    for _ in range(4):  # "In this task, you are given ..., you need to suggest ..."
        words = _WORD_RE.findall(text)
        if not words:
            return ""
        introduced = words[0] in _INTRODUCTORY_WORDS or words[:2] in (["you", "are"], ["you", "will"])
        if introduced and "," in text and _WORD_RE.search(text.split(",", 1)[1]):
            text = text.split(",", 1)[1]
            continue
        while words[0] in ("and", "then") and len(words) > 1:
            words = words[1:]
        for phrase in _BEFORE_THE_VERB:
            if tuple(words[:len(phrase)]) == phrase and len(words) > len(phrase):
                words = words[len(phrase):]
                break
        return words[0]
    return _WORD_RE.findall(text)[0]


def _plot_similarity(scores: list[float], threshold: float, path: Path) -> None:
    from chatgpt_recipes.evaluation.reporting import plt  # matplotlib: loaded only when a plot is drawn

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(scores, bins=[i / 20 for i in range(21)], color="tab:blue", alpha=0.85, edgecolor="white")
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROUGE-L F of each kept instruction against its most similar pool instruction")
    ax.set_ylabel("kept instructions")
    ax.set_title(f"Similarity to the seeds and earlier instructions (n={len(scores)})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_leading_words(counts: list[tuple[str, int]], total: int, path: Path) -> None:
    from chatgpt_recipes.evaluation.reporting import plt  # matplotlib: loaded only when a plot is drawn

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.28 * len(counts)))
    words, values = [word for word, _ in counts], [value for _, value in counts]
    bars = ax.barh(words, values, color="tab:green", alpha=0.85)
    ax.bar_label(bars, labels=[f"{value} ({value / total:.0%})" for value in values], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.margins(x=0.2)
    ax.set_xlabel("kept instructions")
    ax.set_title(f"Most common leading verbs of {total} instructions", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_generation_report(report_path: Path, rows: list[dict], log: list[dict], target: int, threshold: float,
                            source: str) -> dict:
    """generation_report.md next to the output: counts, rejects by reason, mean maximum ROUGE-L, the two plots, a
    few examples. Returns the summary numbers."""
    folder = report_path.parent
    rejects = Counter()
    for record in log:
        rejects.update(record["rejects"])
    scores = [score for record in log for score in record["max_rouge_l"]]
    seconds = sum(record["seconds"] for record in log)
    logged_kept = sum(record["kept"] for record in log)
    summary = {"kept": len(rows), "target": target, "batches": len(log),
               "completions": sum(record["completions"] for record in log),
               "parsed_tasks": sum(record["parsed"] for record in log), "rejects": dict(rejects),
               "mean_max_rouge_l": sum(scores) / len(scores) if scores else None,
               "generation_seconds": seconds,
               "kept_per_minute": logged_kept / (seconds / 60) if seconds else None}
    lines = [f"# Self-instruct generation: {len(rows)} of {target} instructions", "",
             f"Generator: {source}.", "", "| | count |", "|---|---|",
             f"| kept | {len(rows)} |", f"| completions (requests x prompts) | {summary['completions']} |",
             f"| tasks parsed from them | {summary['parsed_tasks']} |"]
    lines += [f"| rejected: {reason} | {rejects.get(reason, 0)} |" for reason in REJECT_REASONS]
    if scores:
        lines += ["", f"Mean maximum ROUGE-L of a kept instruction against the pool (seeds and earlier kept "
                      f"instructions): **{summary['mean_max_rouge_l']:.3f}** (threshold {threshold}; "
                      f"{len(scores)} instructions)."]
    if summary["kept_per_minute"]:
        lines += ["", f"Throughput: {summary['kept_per_minute']:.1f} kept instructions per minute of generation "
                      f"({seconds / 60:.1f} minutes over {len(log)} batches, every run into this output)."]
    if len(scores) < len(rows):
        lines += ["", f"{len(rows) - len(scores)} rows have no statistics (written by another tool, or the process "
                      "was killed between writing a batch and logging it)."]
    lines += ["", "Reject reasons: " + "; ".join(f"**{reason}**: {text}" for reason, text in REJECT_REASONS.items())
              + "."]
    if scores:
        _plot_similarity(scores, threshold, folder / "rouge_similarity.png")
        lines += ["", "## Similarity to the pool", "", "![ROUGE-L distribution](rouge_similarity.png)"]
    words = Counter(word for word in map(leading_word, (row["instruction"] for row in rows)) if word)
    if words:
        _plot_leading_words(words.most_common(20), len(rows), folder / "leading_verbs.png")
        lines += ["", "## Leading verbs", "", "![leading verbs](leading_verbs.png)"]
    lines += ["", "## Examples", ""]
    for row in rows[:5]:
        lines += [f"- **{row['instruction']}**" + (f"<br>input: {row['input']}" if row.get("input") else "")
                  + f"<br>output: {row.get('output', '')}"]
    report_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary

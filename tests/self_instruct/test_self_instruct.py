"""recipes/self_instruct.py: the parser on fixed completions, each filter rule, sequential ROUGE-L dedup, the
output file after an interrupted write, the seed-file errors, the OpenAI-compatible client against a real HTTP
server on 127.0.0.1 that serves a tiny model's completions in the OpenAI wire format, and whole runs of the recipe
against a scripted server of the same kind: the report's reject counts, kill -9 and resume, SFT on the output."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import REPO

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.modeling.loading import ModelArguments
from chatgpt_recipes.runtime.errors import DataError, SelfInstructError
from chatgpt_recipes.self_instruct.generators import Decoding, OpenAICompatibleGenerator
from chatgpt_recipes.self_instruct.rouge_dedup import RougeDeduplicator, RougeTokenizer, new_scorer
from chatgpt_recipes.self_instruct.tasks import (Task, build_request_prompt, filter_reason, leading_word,
                                                 parse_completion, read_output_rows, read_seed_tasks)

SEEDS = REPO / "data" / "alpaca_seed_tasks.jsonl"


def test_request_prompt_numbers_the_examples_and_ends_with_the_next_instruction():
    prompt = build_request_prompt("PROMPT", [Task("Name a colour.", "", "Blue."), Task("Add:", "2 and 3", "5")])
    assert prompt.startswith("PROMPT\n\n###\n1. Instruction: Name a colour.\n1. Input:\n<noinput>\n1. Output:\nBlue.\n")
    assert "###\n2. Instruction: Add\n2. Input:\n2 and 3\n2. Output:\n5\n###\n3. Instruction:" in prompt
    assert prompt.endswith("3. Instruction:")


def test_parser_on_fixed_completions():
    well_formed = (" Give three tips for staying healthy.\n4. Input:\n<noinput>\n4. Output:\nEat well, sleep, move.\n"
                   "###\n5. Instruction: Translate the sentence into French.\n5. Input:\nI am happy.\n5. Output:\n"
                   "Je suis heureux.\n###\n")
    tasks, rejects = parse_completion(well_formed, 4, stopped_for_length=False)
    assert [t.row() for t in tasks] == [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
        {"instruction": "Translate the sentence into French.", "input": "I am happy.", "output": "Je suis heureux."}]
    assert not rejects

    truncated = well_formed + "6. Instruction: Summarize the text.\n6. Input:\nThe"
    tasks, rejects = parse_completion(truncated, 4, stopped_for_length=True)
    assert len(tasks) == 2 and rejects == {"truncated": 1}
    # the same text ending normally: its last block lacks an Output and fails to parse
    tasks, rejects = parse_completion(truncated, 4, stopped_for_length=False)
    assert len(tasks) == 2 and rejects == {"parse": 1}

    missing = (" Describe a sunset.\n4. Output:\nRed sky.\n###\n5. Instruction: List two fruits.\n5. Input:\n"
               "<noinput>\n5. Output:\n\n###\n6. Instruction: Name a planet.\n6. Input:\n<NoInput>\n7. Output:\nMars")
    tasks, rejects = parse_completion(missing, 4, stopped_for_length=False)
    assert tasks == [] and rejects == {"parse": 3}  # no Input; an empty Output; numbers that disagree

    chat_style = "4. Instruction: Name a planet.\n4. Input:\n<NoInput>\n4. Output:\nMars"
    assert parse_completion(chat_style, 4, False)[0] == [Task("Name a planet.", "", "Mars")]

    many = "".join(f"{n}. Instruction: Task number {n} here.\n{n}. Input:\n<noinput>\n{n}. Output:\nx\n###\n"
                   for n in range(4, 40))
    assert len(parse_completion(many, 4, False)[0]) == 20


def test_parser_reads_alpacas_numbered_blocks_and_a_chat_preamble():
    # as text-davinci-003 continued Alpaca's prompt: a numbered list inside an output, "6.Instruction:" unspaced
    alpaca = (" Give three tips for staying healthy.\n4. Input:\n<noinput>\n4. Output:\n1. Eat a balanced diet.\n"
              "2. Exercise regularly.\n3. Sleep well.\n\n###\n5. Instruction: Identify the odd one out.\n5. Input:\n"
              "Twitter, Instagram, Telegram\n5. Output:\nTelegram\n###\n6.Instruction: Convert 25 km to miles.\n"
              "6.Input:\n<noinput>\n6.Output:\n15.5 miles\n###\n")
    assert [t.row() for t in parse_completion(alpaca, 4, False)[0]] == [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
        {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram", "output": "Telegram"},
        {"instruction": "Convert 25 km to miles.", "input": "", "output": "15.5 miles"}]
    # a chat model's preamble before its restated first task costs nothing
    chat = "Here are more tasks:\n\n4. Instruction: Name a planet.\n4. Input:\n<noinput>\n4. Output:\nMars\n###\n"
    assert parse_completion(chat, 4, False) == ([Task("Name a planet.", "", "Mars")], {})


@pytest.mark.parametrize("instruction, verb", [
    ("Generate a list of five fruits.", "generate"),
    ("Please summarize the text.", "summarize"),
    ("Given a sentence, classify its sentiment.", "classify"),
    ("Using the facts given, write a question-answer pair.", "write"),
    ("In this task, you are given a sentence, you need to suggest a better word.", "suggest"),
    ("You are given a list of features of a product, and you need to create its description.", "create"),
    ("You need to write a creative opening scene for a horror movie.", "write"),
    ("Can you give me some suggestions for a gift?", "give"),
    ("What is the capital of France?", "what"),
    ("In your opinion, how would you explain gravity?", "how"),
])
def test_leading_verb_skips_what_comes_before_the_verb(instruction, verb):
    assert leading_word(instruction) == verb


@pytest.mark.parametrize("instruction, reason", [
    ("Name three primary colours.", None),
    ("Name three colours.", "length"),
    (" ".join(["word"] * 151), "length"),
    ("Describe the image of a cat.", "blacklist"),
    ("Describe the Pictures below carefully.", "blacklist"),
    ("Tell me how to go to the station.", "blacklist"),
    ("Write a program that adds two numbers.", "write a program"),
    ("- List the three largest cities.", "punctuation start"),
    ("Éxplain the rules of chess briefly.", "non-ascii start"),
])
def test_each_filter_rule(instruction, reason):
    assert filter_reason(instruction) == reason


def test_blacklist_matches_whole_words_and_the_ascii_rule_is_a_switch():
    assert filter_reason("Explain the mapping between keys and values.") is None  # "map" inside a word
    assert filter_reason("解释 这个 成语 的 意思 。", drop_non_ascii_start=False) is None
    assert filter_reason("解释 这个 成语 的 意思 。") == "non-ascii start"


def test_rouge_tokenizer_equals_rouge_scores_on_ascii_and_splits_chinese():
    from rouge_score import tokenize

    text = "What's the relation between 2 pairs: Night/Day, Right -- Left?"
    assert RougeTokenizer().tokenize(text) == tokenize.tokenize(text, None)
    assert RougeTokenizer().tokenize("解释成语 OK") == ["解", "释", "成", "语", "ok"]


def test_dedup_is_sequential_a_near_duplicate_of_a_just_kept_instruction_is_rejected():
    seeds = [seed.instruction for seed in read_seed_tasks(str(SEEDS))]
    deduplicator = RougeDeduplicator(seeds, threshold=0.7)
    first = "Suggest a name for a new coffee shop in a small mountain town."
    near = "Suggest a name for a new coffee shop in a small seaside town."
    other = "Explain why the sky looks blue during the day."
    decisions = deduplicator.admit([first, near, other])
    assert [kept for kept, _, _ in decisions] == [True, False, True]
    assert decisions[1][1] > 0.7 and decisions[1][2] == first  # rejected against the one kept just before it
    assert new_scorer().score(first, near)["rougeL"].fmeasure == pytest.approx(decisions[1][1])
    # and in a later batch, against the pool
    assert deduplicator.admit([near])[0][0] is False


def test_parallel_scoring_gives_the_serial_scores():
    pool = [seed.instruction for seed in read_seed_tasks(str(SEEDS))]
    candidates = ["Is there anything I can eat for breakfast that does not include eggs, yet includes protein?",
                  "What is the relation between pairs?", "Write a haiku about the sea."]
    serial = RougeDeduplicator(pool, 0.7).admit(candidates)
    parallel = RougeDeduplicator(pool, 0.7, num_workers=2, min_pairs_per_worker=10)
    try:
        assert parallel.admit(candidates) == serial
    finally:
        parallel.close()
    assert serial[0][0] is False and serial[0][2] == pool[0]  # the breakfast seed


def test_output_with_a_line_cut_by_a_kill_is_repaired(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"instruction": "A", "input": "", "output": "B"}) + "\n" + '{"instruction": "C", "in')
    assert read_output_rows(path) == [{"instruction": "A", "input": "", "output": "B"}]
    assert path.read_text().endswith("}\n")
    path.write_text('{"instruction": 3}\n')
    with pytest.raises(DataError, match=r"out.jsonl: line 1: expected an object with a text field 'instruction'"):
        read_output_rows(path)


def test_seed_file_with_a_missing_field(tmp_path):
    rows = [json.loads(line) for line in SEEDS.read_text().splitlines()[:3]]
    del rows[2]["instances"][0]["output"]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"seeds.jsonl: line 3: instances\[0\]: missing field 'output'"):
        read_seed_tasks(str(path))
    assert len(read_seed_tasks(str(SEEDS))) == 175


# The OpenAI-compatible client against a real server ----------------------------------------------------------

def send_json(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def serving(handler_class):
    """An OpenAI-style test server on a free local port, in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def openai_server(tiny_llama_dir):
    """A real HTTP server on 127.0.0.1 that answers /v1/completions and /v1/chat/completions with the tiny model's
    sampled completions in the OpenAI wire format; it records each request and what it answered."""
    from chatgpt_recipes.modeling.loading import load_for_inference

    tokenizer, model = load_for_inference(tiny_llama_dir)
    tokenizer.padding_side = "left"
    seen = {"requests": [], "answers": []}

    def sample(prompts, body):
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=body["temperature"], top_p=body["top_p"],
                                 top_k=0, max_new_tokens=body["max_tokens"], pad_token_id=tokenizer.pad_token_id)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, inputs["input_ids"].shape[1]:]]
        seen["answers"] += texts
        return texts

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["requests"].append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            if self.path == "/v1/completions":
                prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                choices = [{"index": i, "text": text, "finish_reason": "length"}
                           for i, text in enumerate(sample(prompts, body))]
                answer = {"object": "text_completion", "model": body["model"], "choices": choices}
            elif self.path == "/v1/chat/completions":
                prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
                answer = {"object": "chat.completion", "model": body["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": sample([prompt], body)[0]},
                     "finish_reason": "length"}]}
            else:
                self.send_error(404)
                return
            data = json.dumps(answer).encode()
            send_json(self, data)

    with serving(Handler) as base_url:
        yield base_url, seen


@pytest.mark.parametrize("style", ["completion", "chat"])
def test_client_sends_the_batch_with_alpacas_sampling_and_the_key_from_the_environment(openai_server, style,
                                                                                     monkeypatch):
    api_base, seen = openai_server
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    seen["requests"].clear(), seen["answers"].clear()
    generator = OpenAICompatibleGenerator(api_base, "tiny", style, Decoding(8, 1.0, 1.0))
    completions = generator.complete(["1. Instruction: Name a colour.", "1. Instruction: Add two numbers."])
    assert sorted(c.text for c in completions) == sorted(seen["answers"]) and len(completions) == 2
    assert all(c.finish_reason == "length" for c in completions)
    assert len(seen["requests"]) == (1 if style == "completion" else 2)
    request = seen["requests"][0]
    assert request["path"] == ("/v1/completions" if style == "completion" else "/v1/chat/completions")
    assert request["auth"] == "Bearer test-key"
    assert {k: request["body"][k] for k in ("model", "temperature", "top_p", "max_tokens", "stop")} == {
        "model": "tiny", "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "stop": ["\n20", "20."]}


def run_self_instruct(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "recipes" / "self_instruct.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_a_model_that_never_parses_stops_with_one_raw_completion(openai_server, tmp_path):
    api_base, seen = openai_server
    seen["answers"].clear()
    result = run_self_instruct("--api_base", api_base, "--api_model", "tiny", "--max_new_tokens", "6",
                               "--request_batch_size", "2", "--max_unparseable_batches", "2",
                               "--output_dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()
    message = "\n".join(line for line in error if not line.startswith(("INFO", "WARNING", "[")))
    assert "returned nothing parseable for 2 batches in a row" in message
    shown = message.split("One raw completion:\n", 1)[1]
    assert shown in [repr(text[:1500]) for text in seen["answers"]]


def test_unreachable_endpoint_names_the_host(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    generator = OpenAICompatibleGenerator(f"http://127.0.0.1:{port}/v1", "m", "completion", Decoding(4, 1.0, 1.0),
                                          max_retries=1)
    with pytest.raises(SelfInstructError, match=rf"endpoint 127.0.0.1:{port} failed: could not connect "
                                                r"\(.*refused.*\).*2 attempt"):
        generator.complete(["x"])


def test_num_instructions_already_reached_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "instructions.jsonl").write_text(json.dumps({"instruction": "A b c d", "input": "", "output": "x"}) + "\n")
    result = run_self_instruct("--num_instructions", "1", "--output_dir", out, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already holds 1 instructions (num_instructions 1): nothing to generate" in result.stdout


def test_pipeline_self_instruct_stage_is_opt_in_and_feeds_sft():
    from pipeline import PipelineConfig, stage_paths

    wiring = stage_paths(PipelineConfig(output_dir="out", stages=["self_instruct", "sft"],
                                        self_instruct={"output_name": "rows.json"}))
    assert wiring["sft"]["dataset_name"] == "out/self_instruct/rows.json"
    assert wiring["self_instruct"] == {"output_dir": "out/self_instruct"}
    assert "self_instruct" not in PipelineConfig().stages
    assert "dataset_name" not in stage_paths(PipelineConfig())["sft"]


# Whole runs of the recipe against a scripted OpenAI-compatible server -----------------------------------------

# Distinct tasks (ROUGE-L <= 0.7 against each other and the seeds) for a server that answers well
GOOD_TASKS = [
    ("Suggest three names for a bakery that sells only vegan pastries.", "", "Green Crumb, Leaf & Loaf, Oat Oven."),
    ("Explain why the moon looks larger near the horizon.", "", "It is an illusion of the brain's size judgement."),
    ("Classify the following animals as mammals or reptiles.", "Snake, dog, lizard, whale",
     "Mammals: dog, whale. Reptiles: snake, lizard."),
    ("Rewrite this sentence in the passive voice.", "The chef cooked a delicious meal.",
     "A delicious meal was cooked by the chef."),
    ("What are the main causes of inflation in an economy?", "",
     "Demand outpacing supply, rising costs, money supply."),
    ("Convert the temperature from Celsius to Fahrenheit.", "25 degrees Celsius", "77 degrees Fahrenheit."),
    ("Summarize the story of Romeo and Juliet in one sentence.", "", "Two young lovers from feuding families die."),
    ("Name the largest desert on Earth and its area.", "", "Antarctica, about 14 million square kilometres."),
    ("Offer some advice to a student nervous before an exam.", "", "Sleep well, review key points, breathe."),
    ("Find the grammatical error in this sentence and correct it.", "She don't like apples.",
     "She doesn't like apples."),
    ("How does a vaccine train the immune system?", "", "It shows the body a harmless piece of a pathogen."),
    ("Compose a haiku about autumn leaves falling.", "", "Red leaves drift slowly / the wind hums a tune / earth "
     "sleeps."),
    ("List four renewable sources of energy with one advantage each.", "", "Solar, wind, hydro, geothermal."),
    ("Estimate how many minutes a person sleeps in a year.", "", "About 175,000 minutes at eight hours a night."),
    ("Propose a weekend itinerary for visiting Rome on a budget.", "", "Day 1: Colosseum; day 2: Vatican."),
    ("Is a tomato a fruit or a vegetable? Justify your answer.", "", "Botanically a fruit: it holds seeds."),
]


def task_block(number: int, instruction: str, task_input: str, output: str) -> str:
    return (f"{number}. Instruction: {instruction}\n{number}. Input:\n{task_input or '<noinput>'}\n"
            f"{number}. Output:\n{output}\n###\n")


def completion_text(tasks, first_number: int = 4, end: str = "") -> str:
    """A completion of a prompt that ends in `4. Instruction:`: the first task continues that line."""
    text = "".join(task_block(first_number + i, *task) for i, task in enumerate(tasks)) + end
    return text[len(f"{first_number}. Instruction:"):]


@contextlib.contextmanager
def scripted_server():
    """A real HTTP server on 127.0.0.1 speaking the OpenAI completions API: `state["answer"](prompt)` gives each
    prompt's (text, finish_reason); the request numbered `state["hang_at"]` (0-based) is held open, unanswered,
    until `state["release"]` is set. Every request is recorded."""
    state = {"answer": None, "requests": [], "hang_at": None, "hanging": threading.Event(),
             "release": threading.Event()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            number = len(state["requests"])
            state["requests"].append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            if number == state["hang_at"]:
                state["hanging"].set()
                state["release"].wait(120)
                return  # no answer: the client is gone by now
            if self.path != "/v1/completions":
                self.send_error(404)
                return
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = []
            for index, prompt in enumerate(prompts):
                text, finish_reason = state["answer"](prompt)
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason})
            data = json.dumps({"id": f"cmpl-{number}", "object": "text_completion", "created": 0,
                               "model": body["model"], "choices": choices}).encode()
            send_json(self, data)

    with serving(Handler) as base_url:
        try:
            yield base_url, state
        finally:
            state["release"].set()  # a request held open must not block the server's shutdown


def self_instruct_command(*args):
    return [sys.executable, str(REPO / "recipes" / "self_instruct.py"), *map(str, args)]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One whole API run, shared with the SFT test: 2 prompts per request, one completion of well-formed tasks
    that each filter must reject but three, the other cut for length."""
    seeds = read_seed_tasks(str(SEEDS))
    first = [GOOD_TASKS[0],
             ("Name two rivers.", "", "Nile, Amazon."),  # length: 3 words
             ("Describe the image of the city skyline at night.", "", "Tall towers glow."),  # blacklist
             ("Write a program that reverses a string in Python.", "", "print(s[::-1])"),  # write a program
             ("* Explain the difference between weather and climate.", "", "Time scale."),  # punctuation start
             ("Éxplain how a rainbow forms after the rain.", "", "Light refracts in drops."),  # non-ascii start
             (seeds[0].instruction.replace("700-1000", "500-800"), "", "Tofu scramble."),  # similarity: a seed
             GOOD_TASKS[1]]
    first_text = completion_text(first, end="12. Instruction: List the planets in order.\n12. Input:\n<noinput>\n"
                                              "###\n")  # parse: no Output
    # stopped for length: its last task looks whole but may not be, and is dropped
    second_text = completion_text([GOOD_TASKS[2], ("Translate the sentence into Spanish.", "The cat sleeps.",
                                                   "El gato duerme.")])[:-len("\n###\n")]
    answers = iter([(first_text, "stop"), (second_text, "length")])
    out = tmp_path_factory.mktemp("self-instruct") / "api"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "sk-test-from-env")
        patch.setenv("OMP_NUM_THREADS", "1")
        with scripted_server() as (api_base, state):
            state["answer"] = lambda prompt: next(answers)
            result = subprocess.run(self_instruct_command(
                "--api_base", api_base, "--api_model", "served-model", "--num_instructions", "3",
                "--request_batch_size", "2", "--output_dir", out), cwd=REPO, capture_output=True, text=True,
                timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, state["requests"]


def test_api_run_keeps_the_good_tasks_in_alpaca_shape_and_reports_each_reject(generated):
    out, result, requests = generated
    assert len(requests) == 1  # three kept from the first request reach num_instructions
    request = requests[0]
    assert request["path"] == "/v1/completions" and request["auth"] == "Bearer sk-test-from-env"
    assert request["body"]["model"] == "served-model" and len(request["body"]["prompt"]) == 2
    assert all(prompt.endswith("###\n4. Instruction:") and "###\n3. Instruction: " in prompt
               for prompt in request["body"]["prompt"])

    rows = read_rows(out / "instructions.jsonl")
    assert rows == [{"instruction": i, "input": t, "output": o} for i, t, o in GOOD_TASKS[:3]]
    assert all(list(row) == ["instruction", "input", "output"] for row in rows)

    report = (out / "generation_report.md").read_text()
    assert "# Self-instruct generation: 3 of 3 instructions" in report
    assert "served-model at http://127.0.0.1:" in report
    for reason in ("parse", "truncated", "length", "blacklist", "write a program", "punctuation start",
                   "non-ascii start", "similarity"):
        assert f"| rejected: {reason} | 1 |" in report, reason
    assert "| tasks parsed from them | 9 |" in report  # 8 + 1: not the parse and truncated ones
    assert "Mean maximum ROUGE-L of a kept instruction" in report
    for plot in ("rouge_similarity.png", "leading_verbs.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    log = read_rows(out / "generation_log.jsonl")
    assert [record["kept"] for record in log] == [3] and all(0 <= s <= 0.7 for s in log[0]["max_rouge_l"])
    assert "Rejected in this run:" in result.stdout and "similarity 1" in result.stdout


def test_a_run_killed_mid_generation_resumes_to_the_target_without_duplicates(tmp_path):
    """kill -9 while the third request is in flight (8 rows written), rerun the same command. The server starts
    its tasks over, so the rerun is first offered the 8 rows it already has: only the dedup against the output
    keeps them out."""
    out = tmp_path / "out"
    given = {"next": 0}

    def answer(prompt):
        tasks = GOOD_TASKS[given["next"]:given["next"] + 2]
        given["next"] += 2
        return completion_text(tasks), "stop"

    with scripted_server() as (api_base, state):
        state.update(answer=answer, hang_at=2)
        command = self_instruct_command("--api_base", api_base, "--api_model", "m", "--num_instructions", "12",
                                        "--request_batch_size", "2", "--max_retries", "0", "--output_dir", out)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(tmp_path / "first.log", "w") as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                assert state["hanging"].wait(120), (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.2)
                process.send_signal(signal.SIGKILL)
            finally:
                process.kill()
                process.wait(30)
        assert process.returncode == -signal.SIGKILL
        killed_at = read_rows(out / "instructions.jsonl")
        assert [row["instruction"] for row in killed_at] == [task[0] for task in GOOD_TASKS[:8]]
        assert not (out / "generation_report.md").exists()

        given["next"], state["hang_at"] = 0, None
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming: " in result.stdout and "holds 8 of 12 instructions" in result.stdout
    instructions = [row["instruction"] for row in read_rows(out / "instructions.jsonl")]
    assert len(instructions) == 12 and len(set(instructions)) == 12
    assert instructions == [task[0] for task in GOOD_TASKS[:12]]
    assert len(state["requests"]) == 3 + 3  # 2 answered and the hung one; then 8 offered again, and 4 new
    assert "| rejected: similarity | 8 |" in (out / "generation_report.md").read_text()


def test_the_generated_file_trains_with_sft_lora_for_2_steps(generated, tiny_llama_dir):
    """sft_lora.py's main with the output as --dataset_name, unchanged: the rows read as Alpaca rows and train
    (in this process: `accelerate launch` of sft_lora is tested in test_sft_lora.py and would cost 20 s more)."""
    from sft_lora import SFTRecipeConfig, main

    out, _, _ = generated
    args = ["--model_name_or_path", tiny_llama_dir, "--dataset_name", str(out / "instructions.jsonl"),
            "--eval_split_size", "0", "--eval_strategy", "no", "--max_length", "256", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1", "--sample_max_new_tokens", "2", "--output_dir", str(out / "sft")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core CPU
    try:
        main(*parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args))
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "sft" / "stage_info.json").read_text()) == {"stage": "sft", "prompt_format": "alpaca"}
    history = json.loads((out / "sft" / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "sft" / "adapter_model.safetensors").is_file()

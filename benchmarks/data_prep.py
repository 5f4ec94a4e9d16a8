"""Time and peak memory of SFT data preparation (chatgpt_recipes.data.sft.prepare_sft: read, normalise, tokenise with
SmolLM2's tokenizer, save the cache), once from scratch and once as a cached rerun, on two generated files:

  alpaca-52k  52,002 Alpaca rows (a JSON list, like stanford_alpaca's alpaca_data.json), built from the bundled
              data/alpaca_en_demo.json by numbering each instruction (so no row is an exact duplicate)
  chat-200k   200,000 multi-turn chats (jsonl), built the same way from data/chat_demo.jsonl

Each preparation runs in a fresh process, so its peak RSS is its own (getrusage; the dataset_num_proc workers'
largest peak separately). Targets (2 cores): 52K rows in 60 s or less the first time, 5 s or less cached, peak RSS
under 2 GB.

    python benchmarks/data_prep.py                 # both files, num_proc 2; writes benchmarks/data_prep.json
    python benchmarks/data_prep.py --files alpaca-52k --num_proc 1
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FILES = {"alpaca-52k": 52_002, "chat-200k": 200_000}


def build_file(name: str, rows: int, directory: Path) -> Path:
    if name.startswith("alpaca"):
        base = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())
        out = [{**row, "instruction": f"{row['instruction']} (variant {i // len(base)})"}
               for i, row in zip(range(rows), (base[i % len(base)] for i in range(rows)))]
        path = directory / f"{name}.json"
        path.write_text(json.dumps(out, ensure_ascii=False))
        return path
    base = [json.loads(line) for line in (REPO / "data" / "chat_demo.jsonl").read_text().splitlines() if line.strip()]
    path = directory / f"{name}.jsonl"
    with open(path, "w") as file:
        for i in range(rows):
            turns = [dict(turn) for turn in base[i % len(base)]["messages"]]
            first_user = next(t for t in turns if t["role"] == "user")
            first_user["content"] += f" (variant {i // len(base)})"
            file.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    return path


def prepare_once(path: str, num_proc: int, max_length: int) -> dict:
    """Runs in the child process: one prepare_sft call, timed."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from datasets.utils.logging import disable_progress_bar

    from chatgpt_recipes.data.sft import prepare_sft
    from chatgpt_recipes.modeling.loading import fetch_offline_model, load_tokenizer

    disable_progress_bar()
    tokenizer = load_tokenizer(str(fetch_offline_model("smollm2-135m-instruct")))
    start = time.perf_counter()
    prepared = prepare_sft(path, "train", tokenizer, max_length, num_proc=num_proc)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "rows": prepared.total, "trainable": len(prepared.fits),
            "skipped": len(prepared.skips.records), "prompt_format": prepared.prompt_format,
            "tokens": sum(prepared.dataset["length"]),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "worker_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)}


def run_child(path: Path, cache: Path, num_proc: int, max_length: int) -> dict:
    env = {**os.environ, "RECIPES_DATA_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--child", str(path), "--num_proc", str(num_proc),
                             "--max_length", str(max_length)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-5000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "data_prep.json"))
    parser.add_argument("--child")
    from bench_utils import parse_checked

    args = parse_checked(parser, positive=("num_proc", "max_length"))
    if args.child:
        print(json.dumps(prepare_once(args.child, args.num_proc, args.max_length)))
        return

    from bench_utils import machine, versions

    results = {"machine": machine(), "versions": versions(), "num_proc": args.num_proc,
               "max_length": args.max_length, "files": {}}
    print(results["machine"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.files:
            path = build_file(name, FILES[name], Path(tmp))
            cache = Path(tmp) / f"cache-{name}"
            first = run_child(path, cache, args.num_proc, args.max_length)
            cached = run_child(path, cache, args.num_proc, args.max_length)
            results["files"][name] = {"file_mb": round(path.stat().st_size / 2**20, 1), "first": first,
                                      "cached": cached}
            print(f"{name}: {first['rows']} rows ({results['files'][name]['file_mb']} MB, {first['tokens']} tokens, "
                  f"{first['trainable']} within max_length): first {first['seconds']} s, peak RSS "
                  f"{first['peak_rss_gb']} GB (workers {first['worker_peak_rss_gb']} GB); cached {cached['seconds']} s, "
                  f"peak RSS {cached['peak_rss_gb']} GB", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

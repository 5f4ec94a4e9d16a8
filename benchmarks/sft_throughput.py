"""SFT throughput: stock TRL SFTTrainer (its defaults, and in fp32) vs TRL's best flags for this hardware vs our
recipe's `auto` precision, in one run, on the same model, data, LoRA rank, max length, batch and number of real
(non-padding) tokens. The hardware (native bf16 or not, chatgpt_recipes/runtime/precision.py) is detected and printed.

    export RECIPES_CACHE=/tmp/rcache
    python benchmarks/sft_throughput.py                      # the four configurations below, interleaved, 2 rounds
    python benchmarks/sft_throughput.py --tokens 16384 --rounds 3   # longer, more repeats
    python benchmarks/sft_throughput.py --configs recipe --rounds 1 --no_base_eval --profile_step 2   # op profile
    python benchmarks/sft_throughput.py --summarise benchmarks/sft_throughput.json   # table of a saved run
    python benchmarks/sft_throughput.py --configs recipe --rows 52002 --epoch --rounds 1   # GPU: one Alpaca-52K epoch

Configurations (LoRA r=16, alpha 32, dropout 0.05 on every attention and MLP projection, batch 4 on a CPU and 16 on a
CUDA GPU (8192 tokens per step; --batch), max length 512):
  trl_defaults      SFTTrainer(model=<path>, args=SFTConfig(...), train_dataset=<prompt/completion>,
                    peft_config=LoraConfig(...)) as TRL's docs show; only the shared settings above are set (and
                    use_cpu on a CPU, without which TRL's default bf16=True refuses to start). On a CPU without
                    native bf16 this is pathologically slow (~80x in matmuls): it is timed on one step, and says so.
  trl_fp32          the same with bf16=False
  trl_best          TRL's best flags for this hardware: packing=True (bfd, padding-free), gradient_checkpointing=False
                    (TRL defaults it to True), bf16=True only where bf16 is native; on CUDA also Liger
                    (use_liger_kernel) when liger-kernel is installed and flash_attention_2 when flash-attn is
  recipe            recipes/sft_lora.py's own main() with its default YAML (bf16/dtype auto); only max_steps (from the
                    token budget), output_dir, and no mid-run eval/save/report/time budget are overridden

Each configuration runs in its own process (so peak RSS is its own), the configurations interleaved and repeated in
rotated order, because the machine may be shared. Every process trains until it has seen about --tokens real tokens;
its throughput is real tokens over the wall time of all steps but the first. The eval loss is the same for all: the
mean NLL of the response tokens of the recipe's 40 held-out Alpaca examples after training (heldout_loss()).
MFU is model FLOPs per second over the best matmul throughput measured in this run in the precision that configuration
computes in (bf16 or fp32; see model_flops()); on a GPU the datasheet's dense bf16 peak is printed beside it.

On a CUDA GPU the step timer synchronises the device, one step (--profile_step, default the third) is profiled with
CUDA activity and left out of the throughput: the GPU-busy share of that step (kernel time over wall time) and its top
kernels are reported, with each configuration's peak GPU memory.
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
from bench_utils import (GpuBusy, check_model, machine, parse_checked, read_saved_run, recipe_module,  # noqa: E402
                         run_benchmark, spread, versions)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
DATA = "data/alpaca_en_demo.json"
EVAL_ROWS, SEED, MAX_LENGTH = 40, 42, 512
BATCH = 4  # --batch; 16 on a CUDA GPU
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
CONFIGS = ["trl_defaults", "trl_fp32", "trl_best", "recipe"]
PROFILE_STEP = None  # --profile_step: the step whose ops are profiled (recorded in the results)
TIMING_WARMUP_STEPS = 1  # the first step builds oneDNN kernels, caches and the dataloader
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), printed beside the measured peak
DATASHEET_BF16_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835,
                         "A100": 312}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        import torch

        torch.cuda.synchronize()


def datasheet_bf16() -> tuple[str, float | None]:
    """(GPU name, its datasheet dense bf16 peak in FLOP/s or None when not in DATASHEET_BF16_TFLOPS)."""
    import torch

    name = torch.cuda.get_device_name()
    match = next((key for key in DATASHEET_BF16_TFLOPS if key in name), None)
    return name, DATASHEET_BF16_TFLOPS[match] * 1e12 if match else None


# ---------------------------------------------------------------------------------------------------- FLOPs

def model_shape(model) -> dict:
    """Parameter counts the FLOPs formula needs, read from the (PEFT) model itself."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    frozen_matmul = sum(p.numel() for p in model.parameters()
                        if not p.requires_grad and p.dim() == 2 and p is not head and p is not embed)
    config = model.config
    return dict(frozen_matmul=frozen_matmul, lora=sum(p.numel() for p in model.parameters() if p.requires_grad),
                head=head.numel(), layers=config.num_hidden_layers,
                attention_width=config.num_attention_heads * getattr(config, "head_dim", None)
                or config.hidden_size)


def model_flops(shape: dict, real_tokens: int, predicted_tokens: int, causal_pairs: int) -> int:
    """Model FLOPs of one LoRA training step, counted honestly (what the math needs, not what a kernel does):
      per real token:       2*N_frozen (forward) + 2*N_frozen (backward, activation gradients only: frozen)
                            + 6*N_lora (forward, activation gradients, weight gradients)
      per predicted token:  4*V*d for the LM head (forward + activation gradient; tied and frozen, and only tokens
                            with a label need it)
      attention:            12 * layers * heads*head_dim per causal (query, key) pair within each example
                            (QK^T and AV: 4*h*dh forward, 8*h*dh backward); padding and cross-example pairs excluded
    N_frozen: the frozen weight matrices of the decoder layers; embeddings are a lookup (0 FLOPs)."""
    return (real_tokens * (4 * shape["frozen_matmul"] + 6 * shape["lora"]) + predicted_tokens * 4 * shape["head"]
            + causal_pairs * 12 * shape["layers"] * shape["attention_width"])


def batch_stats(batch: dict) -> tuple[int, int, int]:
    """(real tokens, tokens with a label to predict, causal attention pairs within examples) of a collated batch."""
    import torch

    labels = batch["labels"]
    predicted = int((labels[:, 1:] != -100).sum())
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
    elif "position_ids" in batch:  # padding-free: one row, positions restart at each example
        positions = batch["position_ids"].flatten()
        starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
        bounds = [0, *starts.tolist(), positions.numel()]
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    else:
        lengths = [labels.shape[1]] * labels.shape[0]
    return int(sum(lengths)), predicted, int(sum(n * (n + 1) // 2 for n in lengths))


# ---------------------------------------------------------------------------------------------------- one worker

def make_bench_trainer(token_budget: int, epochs: bool, single_step: bool = False):
    """An SFTTrainer subclass that sets max_steps from the token budget (one step for `single_step`), counts what
    each batch holds (by wrapping the collator it was given) and times every optimizer step."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.profiler, self.profile = [], None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if PROFILE_STEP is not None and state.global_step == PROFILE_STEP:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.profile_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()  # on a GPU the step ends when its kernels do
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.profile = op_time_shares(self.profiler, time.perf_counter() - self.profile_start)
                self.profiler = None
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.marks.append((time.perf_counter(), time.process_time()))

    class BenchTrainer(SFTTrainer):
        last = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            BenchTrainer.last = self
            self.batches, self.collate_seconds = [], 0.0
            collate = self.data_collator

            def counting_collator(examples):
                start = time.perf_counter()
                batch = collate(examples)
                self.collate_seconds += time.perf_counter() - start
                self.batches.append(batch_stats(batch))
                return batch

            self.data_collator = counting_collator
            lengths = [len(ids) for ids in self.train_dataset["input_ids"]]
            per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            if epochs:
                self.args.max_steps = -1
                self.args.num_train_epochs = 1
            elif single_step:
                self.args.max_steps = 1
            else:
                self.args.max_steps = max(TIMING_WARMUP_STEPS + 2 + (PROFILE_STEP is not None),
                                          round(token_budget / (per_step * sum(lengths) / len(lengths))))
            self.timer = StepTimer()
            self.add_callback(self.timer)
            torch.manual_seed(self.args.seed)

    return BenchTrainer


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention")


def op_time_shares(profiler, wall_seconds: float) -> dict:
    """Self CPU time of one profiled step: total, the share in matmul kernels (GEMMs and SDPA), the top ops. On a
    GPU also its kernels: their time (sum of self device time), the share of the step's wall time the GPU was busy
    (kernels overlap rarely in a training step; capped at 1), the number of kernels and the top kernels."""
    averages = profiler.key_averages()
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS))
    shares = dict(self_cpu_seconds=total / 1e6, matmul_share=matmul / total, wall_seconds=wall_seconds,
                  top_ops=[(e.key, round(e.self_cpu_time_total / total, 4), e.count) for e in events[:15]])
    if cuda():
        kernels = [e for e in averages if getattr(e, "self_device_time_total", 0) > 0
                   and str(getattr(e, "device_type", "")).endswith("CUDA")]
        device = sum(e.self_device_time_total for e in kernels)
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        shares.update(gpu_seconds=device / 1e6, gpu_busy_share=min(1.0, device / 1e6 / wall_seconds),
                      kernel_launches=sum(e.count for e in kernels),
                      top_kernels=[(e.key[:80], round(e.self_device_time_total / max(device, 1), 4), e.count)
                                   for e in kernels[:10]])
    return shares


def eval_examples_and_train():
    from chatgpt_recipes.data.rows import read_rows, split_train_eval
    from chatgpt_recipes.data.sft import sft_rows

    examples, _ = sft_rows(read_rows(str(REPO / DATA), "train"), DATA)
    return split_train_eval(examples, EVAL_ROWS, SEED)


def native_bf16() -> bool:
    from chatgpt_recipes.runtime.precision import detect_capability

    return detect_capability().native_bf16


def heldout_loss(model, tokenizer, examples, batch_size: int = 4) -> float:
    """Mean NLL of the response tokens (and EOS) of `examples`, no packing, fp32 weights (fp32 logits for the loss),
    under bf16 autocast where bf16 is native: the same yardstick for every run of this machine."""
    import torch
    import torch.nn.functional as F

    from chatgpt_recipes.data.sft import tokenize_example

    model = model.float().eval()
    device = model.device  # a GPU model takes its batches there
    items = [tokenize_example(example, tokenizer) for example in examples]
    items = [{k: v[:MAX_LENGTH] for k, v in item.items()} for item in items]
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=native_bf16()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(item["input_ids"]) for item in chunk)
            ids = torch.tensor([i["input_ids"] + [tokenizer.pad_token_id] * (width - len(i["input_ids"])) for i in chunk],
                               device=device)
            mask = torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"])) for i in chunk],
                                device=device)
            labels = torch.tensor([i["labels"] + [-100] * (width - len(i["labels"])) for i in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def run_trl(name: str, out_dir: str, token_budget: int, epochs: bool, rows: int | None):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from chatgpt_recipes.modeling.loading import resolve_model_path

    train, _ = eval_examples_and_train()
    if rows:
        train = [train[i % len(train)] for i in range(rows)]
    flags = dict(output_dir=out_dir, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, seed=SEED,
                 report_to="none", save_strategy="no", logging_steps=10**6, use_cpu=not torch.cuda.is_available())
    if name == "trl_fp32":
        flags.update(bf16=False)
    if name == "trl_best":
        flags.update(packing=True, gradient_checkpointing=False, bf16=native_bf16())
        if torch.cuda.is_available():
            from transformers.utils import is_flash_attn_2_available

            from chatgpt_recipes.modeling.kernels import liger_available

            if liger_available():
                flags.update(use_liger_kernel=True)
            if is_flash_attn_2_available():
                flags.update(model_init_kwargs={"attn_implementation": "flash_attention_2"})
    args = SFTConfig(**flags)
    pathological = args.bf16 and not native_bf16()
    trainer = make_bench_trainer(token_budget, epochs, single_step=pathological)(
        model=resolve_model_path(MODEL), args=args, train_dataset=Dataset.from_list(train),
        peft_config=LoraConfig(**LORA))
    with GpuBusy() as trainer.gpu_busy:
        trainer.train()
    return trainer, trainer.processing_class, "bfloat16" if args.bf16 else "float32"


def run_recipe(out_dir: str, token_budget: int, epochs: bool, rows: int | None):
    sft_lora = recipe_module("sft_lora")
    from chatgpt_recipes.cli import parse_config
    from chatgpt_recipes.modeling.loading import ModelArguments, load_tokenizer

    args = ["--model_name_or_path", MODEL, "--output_dir", out_dir, "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", str(10**6), "--sample_max_new_tokens", "1", "--per_device_train_batch_size", str(BATCH),
            "--gpu_tokens_per_step", "0"]  # the same batch as the TRL configurations
    if rows:
        rows_file = Path(out_dir) / "rows.json"
        from chatgpt_recipes.data.rows import read_rows

        source = read_rows(str(REPO / DATA), "train")
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text(json.dumps([source[i % len(source)] for i in range(rows + EVAL_ROWS)]))
        args += ["--dataset_name", str(rows_file)]
    bench_trainer = make_bench_trainer(token_budget, epochs)
    sft_lora.SFTTrainer = bench_trainer  # the recipe's own code path, with a timed and counted trainer
    config, model_args = parse_config((sft_lora.SFTRecipeConfig, ModelArguments), "sft/smollm2_alpaca_lora.yaml", args)
    config.max_train_minutes = None  # the token budget decides the steps
    with GpuBusy() as busy:  # over the whole recipe (loading, demo answers, training): a lower bound for training
        sft_lora.main(config, model_args)
    bench_trainer.last.gpu_busy = busy
    return bench_trainer.last, load_tokenizer(model_args.model_name_or_path), "bfloat16" if config.bf16 else "float32"


def worker(name: str, token_budget: int, epochs: bool, rows: int | None) -> dict:
    import torch

    os.chdir(REPO)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as out_dir:
        if name == "recipe":
            trainer, tokenizer, compute_dtype = run_recipe(out_dir, token_budget, epochs, rows)
        else:
            trainer, tokenizer, compute_dtype = run_trl(name, out_dir, token_budget, epochs, rows)
    marks, batches = trainer.timer.marks, trainer.batches
    steps = len(marks) - 1
    warmup = TIMING_WARMUP_STEPS if steps > TIMING_WARMUP_STEPS else 0  # a single-step run times its one step
    # step i runs between marks[i] and marks[i + 1]; a profiled step (slowed by the profiler) is not timed
    timed = [i for i in range(warmup, steps) if i != PROFILE_STEP or steps - warmup == 1]
    wall = sum(marks[i + 1][0] - marks[i][0] for i in timed)
    cpu = sum(marks[i + 1][1] - marks[i][1] for i in timed)
    shape = model_shape(trainer.model)
    real = sum(batches[i][0] for i in timed)
    flops = sum(model_flops(shape, *batches[i]) for i in timed)
    _, eval_examples = eval_examples_and_train()
    result = dict(
        config=name, compute_dtype=compute_dtype, timed_steps=len(timed), steps=steps, real_tokens_total=sum(b[0] for b in batches[:steps]),
        timed_real_tokens=real, timed_seconds=wall, tokens_per_s=real / wall, cpu_cores_used=cpu / wall,
        model_flops_per_s=flops / wall, flops_per_real_token=flops / real,
        step_seconds=[round(marks[i + 1][0] - marks[i][0], 3) for i in range(steps)],
        collate_share=trainer.collate_seconds / (marks[-1][0] - marks[0][0]),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        eval_loss=heldout_loss(trainer.model, tokenizer, eval_examples), model_shape=shape,
    )
    if torch.cuda.is_available():
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        if trainer.gpu_busy.share is not None:
            result["gpu_utilisation"] = trainer.gpu_busy.share
    if trainer.timer.profile:
        result["profile"] = trainer.timer.profile
    return result


def matmul_peak(seconds: float = 6.0) -> dict:
    """Best measured GEMM throughput (FLOP/s) per dtype, over a square GEMM and this model's own GEMM shapes."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(2048, 2048, 2048), (2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (4096, 4096, 4096)]
    if device == "cuda":  # a large GEMM reaches the tensor cores' peak
        shapes += [(8192, 8192, 8192), (8192, 2048, 8192)]
    best = {}
    for dtype in (torch.bfloat16, torch.float32):
        # emulated bf16 (~1 GFLOP/s) would take minutes per large GEMM: its peak is measured on a small one
        dtype_shapes = shapes if dtype != torch.bfloat16 or native_bf16() else [(256, 256, 256)]
        deadline, top = time.perf_counter() + seconds / 2, 0.0  # after the capability probe, which takes seconds
        while time.perf_counter() < deadline:
            for m, k, n in dtype_shapes:
                a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
                a @ b
                if device == "cuda":
                    torch.cuda.synchronize()
                start, repeats = time.perf_counter(), 10 if device == "cuda" else 3
                for _ in range(repeats):
                    a @ b
                if device == "cuda":
                    torch.cuda.synchronize()
                top = max(top, 2 * m * k * n * repeats / (time.perf_counter() - start))
        best[str(dtype).replace("torch.", "")] = top
    if device == "cuda":
        best["device"], best["datasheet_bfloat16"] = datasheet_bf16()
    return best


def base_eval() -> dict:
    from chatgpt_recipes.modeling.loading import load_for_inference

    _, eval_examples = eval_examples_and_train()
    tokenizer, model = load_for_inference(MODEL)
    if cuda():
        model.to("cuda")
    return dict(config="base_model", eval_loss=heldout_loss(model, tokenizer, eval_examples))


# ---------------------------------------------------------------------------------------------------- driver

def spawn(task: str, args, result_file: Path) -> dict:
    command = [sys.executable, __file__, "--worker", task, "--tokens", str(args.tokens), "--result", str(result_file),
               "--model", args.model, "--batch", str(args.batch)]
    if args.epoch:
        command.append("--epoch")
    if args.rows:
        command += ["--rows", str(args.rows)]
    if args.profile_step is not None:
        command += ["--profile_step", str(args.profile_step)]
    log = result_file.with_suffix(".log")
    started = time.time()
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"{task} failed ({code}); its log: {log}\n" + log.read_text()[-3000:])
    result = json.loads(result_file.read_text())
    print(f"  {task}: done in {time.time() - started:.0f} s", flush=True)
    return result


def summarise(results: list[dict], peaks: list[dict], base: dict | None) -> str:
    peak = {dtype: max(p[dtype] for p in peaks) for dtype in ("bfloat16", "float32")}
    lines = [f"matmul peak measured in this run: bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 "
             f"{peak['float32'] / 1e9:.0f} GFLOP/s (best of {len(peaks)} measurements)", ""]
    if peaks and "device" in peaks[0]:
        datasheet = peaks[0].get("datasheet_bfloat16")
        lines[-1:-1] = [f"{peaks[0]['device']}: datasheet dense bf16 peak "
                        + (f"{datasheet / 1e12:.0f} TFLOP/s (MFU below is against the measured peak, "
                           f"{100 * peak['bfloat16'] / datasheet:.0f}% of it)" if datasheet else "not on file")]
    if base:
        lines += [f"held-out loss of the untrained model: {base['eval_loss']:.4f}", ""]
    lines += ["mean [min-max] over rounds",
              "| config | computes in | real tok/s | MFU (of that dtype's peak) | eval loss | real tokens | steps (timed) "
              "| peak RSS GB | cores used |",
              "|---|---|---|---|---|---|---|---|---|"]
    by_config = {}
    for result in results:
        by_config.setdefault(result["config"], []).append(result)
    means = {}
    for name, runs in by_config.items():
        tps = [r["tokens_per_s"] for r in runs]
        means[name] = sum(tps) / len(tps)
        dtype = runs[0].get("compute_dtype", "bfloat16")
        lines.append(
            f"| {name} | {dtype} | {spread(tps, '.1f')} "
            f"| {spread([100 * r['model_flops_per_s'] / peak[dtype] for r in runs], '.2f')}% "
            f"| {spread([r['eval_loss'] for r in runs], '.4f')} | {spread([r['real_tokens_total'] for r in runs])} "
            f"| {spread([r['steps'] for r in runs])} ({spread([r.get('timed_steps', r['steps'] - 1) for r in runs])}) "
            f"| {spread([r['peak_rss_gb'] for r in runs], '.2f')} | {spread([r['cpu_cores_used'] for r in runs], '.2f')} |")
    lines.append("")
    for name, runs in by_config.items():
        if runs[0].get("timed_steps") == 1 and runs[0]["steps"] == 1:
            lines.append(f"{name}: bf16 is emulated on this CPU (pathologically slow): timed on a single step")
    for name, runs in by_config.items():
        if "peak_gpu_memory_gb" in runs[0]:
            busy = [r["profile"]["gpu_busy_share"] for r in runs if "gpu_busy_share" in r.get("profile", {})]
            lines.append(f"{name}: peak GPU memory {spread([r['peak_gpu_memory_gb'] for r in runs], '.1f')} GB "
                         f"allocated, {spread([r['peak_gpu_reserved_gb'] for r in runs], '.1f')} GB reserved"
                         + (f"; GPU busy {spread([100 * b for b in busy], '.0f')}% of the profiled step" if busy else "")
                         + (f"; nvidia-smi utilisation {spread([100 * r['gpu_utilisation'] for r in runs], '.0f')}%"
                            if "gpu_utilisation" in runs[0] else "")
                         + f"; s/step {spread([r['timed_seconds'] / r['timed_steps'] for r in runs], '.3f')}")
    for result in results:
        if "profile" in result:
            profile = result["profile"]
            lines.append(f"{result['config']}: one profiled step, {profile['self_cpu_seconds']:.1f} CPU-s, "
                         f"{100 * profile['matmul_share']:.0f}% in matmul kernels (GEMM, SDPA); top ops: "
                         + ", ".join(f"{name} {100 * share:.0f}%" for name, share, _ in profile["top_ops"][:8]))
            # The eager ceiling: step time normalised to 1, of which `matmul_share` in matmul kernels; at the peak
            # those would take `mfu` (the model FLOPs' time at the peak), the rest staying as measured.
            mfu, other = result["model_flops_per_s"] / peak[result.get("compute_dtype", "bfloat16")], 1 - profile["matmul_share"]
            lines.append(f"{result['config']}: MFU {100 * mfu:.1f}%; with its matmul kernels at the measured peak and "
                         f"the other {100 * other:.0f}% of the step unchanged, MFU would be at most "
                         f"{100 * mfu / (mfu + other):.0f}%")
            if "top_kernels" in profile:
                lines.append(f"{result['config']}: profiled step {profile['wall_seconds']:.3f} s, GPU busy "
                             f"{100 * profile['gpu_busy_share']:.0f}%, {profile['kernel_launches']} kernels; top: "
                             + ", ".join(f"{name} {100 * share:.0f}%" for name, share, _ in profile["top_kernels"][:5]))
    if "recipe" in means:
        for name in means:
            if name != "recipe":
                lines.append(f"recipe / {name}: {means['recipe'] / means[name]:.2f}x real tokens/s")
        if "trl_defaults" in means:
            lines.append(f"speedup vs stock TRL defaults: {means['recipe'] / means['trl_defaults']:.2f}x")
    return "\n".join(lines)


def main():
    global MODEL, PROFILE_STEP, BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--model", default=MODEL, help="model name, directory or offline alias (all configs)")
    parser.add_argument("--tokens", type=int, default=6144, help="real tokens each configuration trains on")
    parser.add_argument("--rounds", type=int, default=2, help="repeats; each round runs every config, order rotated")
    parser.add_argument("--rows", type=int, help="repeat the training rows to this many (52002: an Alpaca-52K set)")
    parser.add_argument("--epoch", action="store_true", help="train one epoch instead of --tokens")
    parser.add_argument("--no_base_eval", action="store_true", help="skip the untrained model's held-out loss")
    parser.add_argument("--json", default="benchmarks/sft_throughput.json", help="where all raw results go")
    parser.add_argument("--profile_step", type=int, help="profile this step's ops (0-based) and print the shares; "
                        "on a CUDA GPU step 2 by default (left out of the timing)")
    parser.add_argument("--batch", type=int, help="sequences per step for every configuration (default: 4 on a "
                        "CPU, 16 on a CUDA GPU)")
    parser.add_argument("--summarise", metavar="JSON", help="print the table of a saved (or interrupted) run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parse_checked(parser, positive=("tokens", "rounds", "rows", "batch"))

    if args.batch is None:
        args.batch = 16 if cuda() else 4
    if args.profile_step is None and cuda() and not args.summarise:
        args.profile_step = 2
    if args.worker:
        MODEL, PROFILE_STEP, BATCH = args.model, args.profile_step, args.batch
        result = {"matmul_peak": matmul_peak, "base_model": base_eval}.get(args.worker)
        result = result() if result else worker(args.worker, args.tokens, args.epoch, args.rows)
        Path(args.result).write_text(json.dumps(result))
        return

    if args.summarise:
        saved = read_saved_run(args.summarise, ("date", "machine", "versions", "command", "runs", "matmul_peaks",
                                                "base"), "benchmarks/sft_throughput.py")
        print(f"{saved['date']} | {saved['machine']} | {saved['versions']}\ncommand: python {' '.join(saved['command'])}")
        print(summarise(saved["runs"], saved["matmul_peaks"], saved["base"]))
        return
    check_model(args.model)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {machine()} | {versions()}")
    print("command: python " + " ".join(sys.argv), flush=True)
    results, peaks, base = [], [], None

    def save():  # after every run, so that an interrupted benchmark keeps what it measured
        Path(args.json).write_text(json.dumps(dict(machine=machine(), versions=versions(), command=sys.argv,
                                                   date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), matmul_peaks=peaks,
                                                   base=base, runs=results), indent=1))

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        if not args.no_base_eval:
            base = spawn("base_model", args, Path(tmp) / "base.json")
        for round_index in range(args.rounds):
            order = args.configs[round_index % len(args.configs):] + args.configs[:round_index % len(args.configs)]
            print(f"round {round_index + 1}/{args.rounds}: {' -> '.join(order)}", flush=True)
            peaks.append(spawn("matmul_peak", args, Path(tmp) / f"peak{round_index}.json"))
            for name in order:
                results.append(spawn(name, args, Path(tmp) / f"{name}{round_index}.json"))
                print(f"    {results[-1]['tokens_per_s']:.1f} real tok/s, eval loss {results[-1]['eval_loss']:.4f}, "
                      f"{results[-1]['real_tokens_total']} real tokens, peak RSS {results[-1]['peak_rss_gb']:.2f} GB",
                      flush=True)
                save()
        peaks.append(spawn("matmul_peak", args, Path(tmp) / "peak_end.json"))
    save()
    print("\n" + summarise(results, peaks, base))


if __name__ == "__main__":
    run_benchmark(main)

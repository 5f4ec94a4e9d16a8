"""TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12) with what the PPO recipe needs and TRL lacks: PPO-ptx, the
per-update logs and guards, sample generations, and checkpoints that resume and replay (TRL's PPOTrainer.train()
always starts from update 0 with a fresh shuffle of the prompts, and its checkpoints hold the policy but not the
value model). What it assumes about TRL's loop is checked in chatgpt_recipes.runtime.compat.trl_ppo_trainer."""

import gc
import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from chatgpt_recipes.modeling.generation import generate, zero3_gathered
from chatgpt_recipes.modeling.kernels import LoraInputsInComputeDtype
from chatgpt_recipes.runtime.compat import (complete_ppo_trainer_state, expose_policy_on_wrapper,
                                            lora_folded_for_sampling, match_scheduler_to_prepared_optimizer,
                                            ppo_backward, replaced_generate, trl_ppo_trainer)
from chatgpt_recipes.runtime.errors import ConfigError
from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)
PPOTrainer = trl_ppo_trainer()

VALUE_WEIGHTS = "value_model.safetensors"  # written last: a checkpoint without it is never resumed


def pad_batch(examples: list[dict], pad_token_id: int) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    fill = lambda values, value: [v + [value] * (width - len(v)) for v in values]  # noqa: E731
    return {"input_ids": torch.tensor(fill([e["input_ids"] for e in examples], pad_token_id)),
            "labels": torch.tensor(fill([e["labels"] for e in examples], -100)),
            "attention_mask": torch.tensor(fill([[1] * len(e["input_ids"]) for e in examples], 0))}


class PtxLoss:
    """PPO-ptx (InstructGPT eq. 2): the policy minimises L_PPO + ptx_coef * L_LM(ptx data). Calling it gives
    ptx_coef * L_LM on the next batch of the ptx dataset, which RecipePPOTrainer adds to the PPO loss of every
    micro-batch inside TRL's own backward (compat.ppo_backward): one backward of the summed loss, so one optimizer
    step per batch under every backend. (Under DeepSpeed accelerate's backward also steps the engine, so a second
    backward for the ptx loss would be a second optimizer step on the ptx gradient alone.)"""

    def __init__(self, trainer, ptx_examples: list[dict], ptx_coef: float, batch_size: int, seed: int):
        self.trainer, self.ptx_coef, self.batch_size = trainer, ptx_coef, batch_size
        self.examples, self.rng, self.order, self.losses = ptx_examples, random.Random(seed), [], []
        self.draws = 0  # batches taken so far: saved with a checkpoint, skipped again on resume

    def _next_indices(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order += self.rng.sample(range(len(self.examples)), len(self.examples))
        picked, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        self.draws += 1
        return picked

    def skip(self, draws: int) -> None:
        while self.draws < draws:
            self._next_indices()

    def _next_batch(self) -> dict:
        picked = self._next_indices()
        batch = pad_batch([self.examples[i] for i in picked], self.trainer.processing_class.pad_token_id)
        return {key: value.to(self.trainer.accelerator.device) for key, value in batch.items()}

    def __call__(self) -> torch.Tensor:
        loss = self.trainer.policy(**self._next_batch()).loss
        self.losses.append(loss.detach())  # averaged at the next log: no host sync in the step
        return self.ptx_coef * loss

    def mean_since_last_call(self) -> float | None:
        if not self.losses:
            return None
        mean, self.losses = torch.stack(self.losses).float().mean().item(), []
        return mean


class Fp16LossScaling:
    """fp16 PPO's dynamic loss scaling, which TRL's PPOTrainer lacks (it builds its Accelerator without mixed
    precision, so there is no GradScaler): the loss is scaled in backward (RecipePPOTrainer), and at each optimizer
    step the gradients are unscaled and the step taken, or skipped with the scale halved when they overflowed, as
    transformers' Trainer does with fp16. Wraps the optimizer; `step_was_skipped` tells the NaN guard
    (resume.NonFiniteLossGuard) an overflow skip from a divergence. Not under DeepSpeed, whose engine scales fp16
    losses itself."""

    def __init__(self, optimizer, accelerator):
        self.optimizer, self.accelerator = optimizer, accelerator
        self.scaler = torch.amp.GradScaler(accelerator.device.type)
        self.step_was_skipped, self.skipped_steps = False, 0

    def step(self, *args, **kwargs):
        if not self.accelerator.sync_gradients:  # inside a gradient accumulation: nothing to step yet
            return None
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer, *args, **kwargs)
        self.scaler.update()
        self.step_was_skipped = self.scaler.get_scale() < scale
        self.skipped_steps += self.step_was_skipped
        return None

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


class SeededPromptOrder:
    """The training prompts in place of TRL's shuffled DataLoader: epoch e visits them in the order of
    randperm(seed + e), one global batch of batch_size prompts per update, each process taking its slice (last
    partial batch dropped, as TRL's drop_last). The order depends on the seed and the update count only, not on
    the global RNG, so a resumed run (`start` = updates done) sees the prompts the uninterrupted run saw.
    Iterating never ends: TRL's train() pulls one batch per update."""

    def __init__(self, dataset, collate, local_batch_size: int, num_processes: int, process_index: int, seed: int):
        self.dataset, self.collate, self.local_batch_size, self.seed = dataset, collate, local_batch_size, seed
        self.num_processes, self.process_index, self.start = num_processes, process_index, 0
        self.batches_per_epoch = len(dataset) // (local_batch_size * num_processes)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(dataset)} training prompts make no batch of {local_batch_size * num_processes} "
                              "(per_device_train_batch_size x gradient_accumulation_steps x processes)")

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def indices(self, update: int) -> list[int]:
        """Dataset rows of this process's slice of the batch of `update` (counted from 0)."""
        epoch, batch = divmod(update, self.batches_per_epoch)
        first = (batch * self.num_processes + self.process_index) * self.local_batch_size
        return self.order(epoch)[first: first + self.local_batch_size]

    def __iter__(self):
        update = self.start
        while True:
            yield self.collate([self.dataset[i] for i in self.indices(update)])
            update += 1

    def __len__(self):
        return self.batches_per_epoch


class _ResumeState(TrainerCallback):
    """TRL's train() zeroes the step counters before calling on_train_begin; this puts the resumed ones back."""

    def __init__(self, state: dict):
        self.resumed = state

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step, state.episode = self.resumed["global_step"], self.resumed["episode"]
        state.max_steps, state.log_history = self.resumed["max_steps"], self.resumed["log_history"]


def training_autocast(device_type: str, args):
    """bf16 (or fp16) autocast for a whole training loop, optimizer steps included, as `args.bf16`/`args.fp16`
    chose (chatgpt_recipes/runtime/precision.py); none for fp32. Its weight-cast cache is off: autocast caches the half-precision
    copy of every fp32 weight that requires grad until the outermost autocast region exits, so with the cache on,
    every forward after an optimizer step would still use the weights of the first forward."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    return torch.autocast(device_type, dtype=dtype, enabled=bool(args.bf16 or args.fp16), cache_enabled=False)


class RecipePPOTrainer(PPOTrainer):
    def __init__(self, *args, ptx_examples=None, ptx_coef=0.0, ptx_batch_size=4, sample_prompts=(),
                 sample_every=0, on_log=None, **kwargs):
        super().__init__(*args, **kwargs)
        match_scheduler_to_prepared_optimizer(self)
        self.policy = self.accelerator.unwrap_model(self.model).policy
        self.dataloader = SeededPromptOrder(self.train_dataset, self.data_collator, self.args.local_batch_size,
                                            self.accelerator.num_processes, self.accelerator.process_index,
                                            self.args.seed)
        self.ptx = PtxLoss(self, ptx_examples, ptx_coef, ptx_batch_size, self.args.seed) if ptx_coef > 0 else None
        if self.args.fp16 and not self.is_deepspeed_enabled:
            self.optimizer = Fp16LossScaling(self.optimizer, self.accelerator)
            self.callback_handler.optimizer = self.optimizer  # what the guards see
        self.sample_prompts, self.sample_every, self.on_log = list(sample_prompts), sample_every, on_log
        self.samples, self._generation_s, self._lengths, self._sampling = [], 0.0, [], False
        self._update_start = time.time()
        expose_policy_on_wrapper(self.model)
        complete_ppo_trainer_state(self)
        if self.args.bf16 or self.args.fp16:  # under train()'s autocast, LoRA inputs need no cast to fp32 and back (modeling/kernels.py)
            self.add_callback(LoraInputsInComputeDtype(self.accelerator.unwrap_model(self.model)))

    def _timed_generate(self, generate, *gen_args, **gen_kwargs):
        """The policy's generate during train(): timed, response lengths counted. Sampling runs outside the bf16
        autocast of train() (autocast re-casts every fp32 weight on every forward, which costs more than it saves when
        each forward is one token), in the weights' own dtype, with the LoRA updates folded into temporary base
        weights."""
        start = time.time()
        with torch.autocast(self.accelerator.device.type, enabled=False), lora_folded_for_sampling(self.policy):
            output = generate(*gen_args, **gen_kwargs)
        if not self._sampling:
            self._generation_s += time.time() - start
            sequences = getattr(output, "sequences", output)
            response = sequences[:, gen_kwargs["input_ids"].shape[1]:]
            stop = self.processing_class.eos_token_id if self.stop_token_id is None else self.stop_token_id
            ended = response == stop
            first_eos = torch.where(ended.any(1), ended.float().argmax(1) + 1, response.shape[1])
            self._lengths += first_eos.tolist()
        return output

    def train(self):
        self._generation_s, self._lengths, self._update_start = 0.0, [], time.time()
        # TRL's PPOTrainer builds its own Accelerator without the config's mixed precision, so `bf16: true` is
        # silently ignored; an autocast around the loop gives scoring and updates ~3x faster matmuls on CPUs with
        # bf16 units (generation is excluded, see _timed_generate). fp16 gets dynamic loss scaling (Fp16LossScaling).
        # TRL's loop runs a full gc.collect() twice per update, which walks every object of the process (torch,
        # transformers, datasets...): ~0.3 s each on a small CPU, more than a tiny model's whole update. Objects that
        # exist before training are frozen out of those collections (gc.freeze); garbage made during training is
        # still collected.
        gc.freeze()
        try:
            with training_autocast(self.accelerator.device.type, self.args), \
                    replaced_generate(self.policy, self._timed_generate), \
                    ppo_backward(self.accelerator, self._loss_to_backpropagate):
                return super().train()
        finally:
            gc.unfreeze()

    def _loss_to_backpropagate(self, loss):
        """What TRL's backward of one micro-batch backpropagates: its PPO loss, plus PPO-ptx's term, scaled for fp16."""
        if self.ptx is not None:
            loss = loss + self.ptx()
        if isinstance(self.optimizer, Fp16LossScaling):
            loss = self.optimizer.scaler.scale(loss)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "objective/kl" in logs:  # one PPO update finished
            update_s = time.time() - self._update_start
            logs["time/generation_s"] = self._generation_s
            logs["time/training_s"] = update_s - self._generation_s  # scoring (ref, RM, value) + PPO epochs
            logs["response_length"] = sum(self._lengths) / max(len(self._lengths), 1)
            logs["episodes_per_s"] = self.args.batch_size / update_s
            ptx_loss = self.ptx.mean_since_last_call() if self.ptx is not None else None
            if ptx_loss is not None:
                logs["ptx/loss"] = ptx_loss
            if isinstance(self.optimizer, Fp16LossScaling):
                logs["fp16/loss_scale"] = self.optimizer.scaler.get_scale()
                logs["fp16/skipped_steps"] = self.optimizer.skipped_steps
            if self.on_log:
                self.on_log(self, logs)
            step = self.state.global_step
            if self.sample_every and self.sample_prompts and step % self.sample_every == 0:
                self.sample(step)
            self._generation_s, self._lengths = 0.0, []
        super().log(logs, start_time)
        self._update_start = time.time()

    @torch.no_grad()
    def sample(self, step: int) -> None:
        """Greedy answers of the current policy to a few held-out prompts, printed and kept for the report."""
        self._sampling = True
        for prompt in self.sample_prompts:
            answer = generate(self.policy, self.processing_class, prompt, self.args.response_length)
            self.samples.append({"update": step, "prompt": prompt, "answer": answer})
            if self.accelerator.is_main_process:
                say(f"[sample @ update {step}] {prompt[-80:]!r}\n  -> {answer[:300]!r}", flush=True)
        self._sampling = False

    def generate_completions(self, sampling: bool = False):
        """TRL's sample table (every num_total_batches // num_sample_generations updates), on a forked RNG: TRL
        calls it after the checkpoint's RNG state is saved, so sampling from the global RNG would make the
        updates after a resume draw other rollouts than the uninterrupted run did."""
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.accelerator.device.type):
            super().generate_completions(sampling)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The policy only, as TRL saves it, but also under DeepSpeed: there TRL 1.12 hands transformers the bare
        policy as its engine, which fails (`'LlamaConfig' object has no attribute 'get'`) and under ZeRO-3 would save
        empty shards. Every rank calls it (ZeRO-3 gathers); the main process writes."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        with zero3_gathered(self.policy):
            if self.accelerator.is_main_process:
                self.policy.save_pretrained(output_dir, safe_serialization=True)
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # under DeepSpeed also the engine's checkpoint (global_stepN/)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        value_model = self.accelerator.unwrap_model(self.model).value_model
        with zero3_gathered(value_model):  # every rank
            if self.accelerator.is_main_process:
                save_file({k: v.contiguous() for k, v in value_model.state_dict().items()}, str(folder / VALUE_WEIGHTS))
                state = {"episode": self.state.episode, "ptx_draws": self.ptx.draws if self.ptx is not None else 0}
                if isinstance(self.optimizer, Fp16LossScaling):
                    state["grad_scaler"] = self.optimizer.scaler.state_dict()
                (folder / "ppo_state.json").write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()

    def resume_from(self, checkpoint: str) -> None:
        """Load the policy (adapter or full), value model, optimizer, scheduler and RNG states of a checkpoint and
        make train() run only the updates that remain, on the prompts (and PPO-ptx batches) that the uninterrupted
        run would have used."""
        from peft import PeftModel, set_peft_model_state_dict

        folder = Path(checkpoint)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.is_deepspeed_enabled:  # the engine's own checkpoint: policy and value model, sharded optimizer state
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(self.model, str(folder), load_module_strict=False)
        else:
            if isinstance(unwrapped.policy, PeftModel):
                set_peft_model_state_dict(unwrapped.policy, load_file(str(folder / "adapter_model.safetensors")))
            else:
                load_whole_state(unwrapped.policy, load_file(str(folder / "model.safetensors")), folder)
            unwrapped.value_model.load_state_dict(load_file(str(folder / VALUE_WEIGHTS)))
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self._load_rng_state(str(folder))
        state = json.loads((folder / "trainer_state.json").read_text())
        ppo_state = json.loads((folder / "ppo_state.json").read_text())
        done = state["global_step"]
        self.dataloader.start = done
        if self.ptx is not None:
            self.ptx.skip(ppo_state.get("ptx_draws", 0))
        if isinstance(self.optimizer, Fp16LossScaling) and "grad_scaler" in ppo_state:
            self.optimizer.scaler.load_state_dict(ppo_state["grad_scaler"])
        self.add_callback(_ResumeState({
            "global_step": done, "episode": ppo_state["episode"],
            "max_steps": self.args.num_total_batches, "log_history": state["log_history"]}))
        self.args.num_total_batches -= done  # train() loops over range(1, num_total_batches + 1)


def load_whole_state(model, state: dict, checkpoint: Path) -> None:
    """Load a fully trained policy's saved weights, every one of them: save_pretrained writes a tied weight
    (lm_head = embed_tokens) once, so only a weight tied to one that is loaded may be absent; any other missing or
    unexpected key is an error that lists them (a checkpoint of another model), never a silent partial load."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a weight of another shape
        reason = str(error).splitlines()[-1].strip()
        raise ConfigError(f"{checkpoint}/model.safetensors does not fit this policy: {reason}") from None
    names_of = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    loaded_with = {name: names for names in names_of.values() for name in names if any(n in state for n in names)}
    missing = [key for key in result.missing_keys if key not in loaded_with]
    if missing or result.unexpected_keys:
        def listed(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        raise ConfigError(
            f"{checkpoint}/model.safetensors does not hold this policy's weights"
            + (f"; missing: {listed(missing)}" if missing else "")
            + (f"; not in the policy: {listed(result.unexpected_keys)}" if result.unexpected_keys else "")
            + f". Was {checkpoint.parent} written by another model? Delete it or choose another output_dir.")


def warn_on_ppo_trouble(logs: dict, response_length: int, history: dict) -> None:
    """The usual PPO failure signs, warned about loudly: a negative KL estimate (the policy's samples are more
    likely under the reference than under itself: a sign of a broken reference or sampling mismatch) and answers
    that blow up in length (reward hacking by verbosity, or no EOS any more)."""
    messages = []
    if logs.get("objective/kl", 0.0) < -0.1:  # beyond the noise of the k1 estimate on a small batch
        messages.append(f"KL to the reference is negative ({logs['objective/kl']:.4f})")
    length = logs.get("response_length")
    if length is not None:
        first = history.setdefault("first_length", length)
        if length >= 0.95 * response_length and first < 0.95 * response_length:
            messages.append(f"answers now hit response_length={response_length} (mean {length:.1f} tokens): "
                            "most no longer end with EOS")
        elif length > 2 * first and length > 8:
            messages.append(f"mean answer length grew from {first:.1f} to {length:.1f} tokens")
    for message in messages:
        logger.warning("PPO: %s", message)
        say(f"WARNING PPO: {message}", flush=True)

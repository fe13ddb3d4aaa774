"""Model and tokenizer loading shared by the training stages (full, LoRA, QLoRA)."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch
from trl import get_peft_config, get_quantization_config

from pipeline.config import ModelArguments, RecipeError
from pipeline.io import looks_local

logger = logging.getLogger(__name__)


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_path(name: str, where: str, key: str = "model_name_or_path", tokenizer: bool = True,
                     hub_cache: bool = True) -> None:
    """Before anything loads: `name` is a model directory (config, weights and, if `tokenizer`, tokenizer files;
    a PEFT adapter directory counts) or a hub id (with HF_HUB_OFFLINE, one in the local cache)."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RecipeError(f"{where}: key '{key}': {name} is a file, not a model directory")
        adapter = (p / "adapter_config.json").is_file()
        missing = []
        if not adapter and not (p / "config.json").is_file():
            missing.append("config.json")
        if not any(any(p.glob(g)) for g in _WEIGHTS + (("adapter_model.*",) if adapter else ())):
            missing.append("weights (*.safetensors or pytorch_model*.bin)")
        if tokenizer and not any((p / t).is_file() for t in _TOKENIZER):
            missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
        if missing:
            raise RecipeError(f"{where}: key '{key}': {name} is not a model directory (no {', no '.join(missing)})")
        for cfg in ("config.json", "adapter_config.json"):
            if (p / cfg).is_file():
                try:
                    json.loads((p / cfg).read_text())
                except (ValueError, UnicodeDecodeError):
                    raise RecipeError(f"{where}: key '{key}': {p / cfg} is not valid JSON") from None
        return
    if looks_local(name):
        raise RecipeError(f"{where}: key '{key}': {name} not found")
    if hub_cache and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise RecipeError(f"{where}: key '{key}': {name} is not a local directory and not in the hub cache "
                              "(HF_HUB_OFFLINE is set: nothing is downloaded)")


def resolve_model_path(model_args: ModelArguments, source: str) -> str:
    """The path or hub id to load. A missing local path falls back to the recipe's tiny model (built once)."""
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError(f"{source}: missing required key 'model_name_or_path'")
    if Path(name).exists():
        check_model_path(name, source)
        return name
    if model_args.tiny_model:
        from accelerate import PartialState

        from pipeline.tiny import build_tiny_model, load_spec

        spec = load_spec(model_args.tiny_model)
        with PartialState().main_process_first():  # one process builds, the others wait and reuse
            path = build_tiny_model(spec)
        logger.warning("model_name_or_path %s not found: starting from the tiny model %s (spec %s)",
                       name, path, model_args.tiny_model)
        return str(path)
    if looks_local(name):
        raise RecipeError(f"{source}: key 'model_name_or_path': {name} not found (and no 'tiny_model' to build)")
    check_model_path(name, source)
    return name


def check_model_switches(path: str, model_args: ModelArguments, lc_args, source: str) -> None:
    """Switches that cannot work on this model's architecture (e.g. tiled MLP on a model without a gated MLP, sequence
    parallelism that does not divide its heads): one line, from the config alone, before any weights load."""
    from pipeline.longctx import check_model

    if not lc_args.active_on_model():
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model_args.model_revision,
                                            trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError):
        return  # no readable config: loading the model reports that
    problem = check_model(config, lc_args)
    if problem:
        raise RecipeError(f"{source}: {problem}")


def resolve_ref_path(model_args: ModelArguments, source: str) -> str | None:
    name = model_args.ref_model_name_or_path
    if name:
        check_model_path(name, source, "ref_model_name_or_path", tokenizer=False)
    return name


def load_tokenizer(path: str, model_args: ModelArguments):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                            trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:  # the path was checked; this is a broken or foreign tokenizer
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RecipeError(f"key 'model_name_or_path': cannot load a tokenizer from {path}: {first}") from None
    if tok.pad_token is None:  # base models often ship without one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def _dtype(model_args: ModelArguments):
    if model_args.dtype in (None, "auto"):
        return model_args.dtype
    return getattr(torch, model_args.dtype)


def load_model(path: str, model_args: ModelArguments, training_args):
    """A causal LM ready for the trainer: quantized (bitsandbytes) when the recipe asks for it."""
    from transformers import AutoModelForCausalLM

    if model_args.preserve_super_weights:
        return _load_preserving_super_weights(path, model_args, training_args)
    quantization_config = get_quantization_config(model_args)
    kwargs = dict(revision=model_args.model_revision, dtype=_dtype(model_args),
                  attn_implementation=model_args.attn_implementation,
                  trust_remote_code=model_args.trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:  # the path was checked: unreadable or truncated weights
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RecipeError(f"cannot load a model from {path}: {first}") from None
    if quantization_config is not None:
        from pipeline.quant.qlora import disable_cpu_packing

        disable_cpu_packing(model)
    if training_args.gradient_checkpointing or getattr(training_args, "activation_checkpointing", False):
        model.config.use_cache = False
    serve_declared_attention(model, model_args)
    return model


def serve_declared_attention(model, model_args: ModelArguments | None = None) -> None:
    """A model trained with streaming heads (pipeline/kv/streaming_heads.py) runs with the attention it declares."""
    from pipeline.kv.streaming_heads import use_declared_attention

    if use_declared_attention(model) and model_args is not None and model_args.attn_implementation:
        logger.warning("key 'attn_implementation' %s is not used: the model declares streaming heads "
                       "(config.streaming_heads) and runs with the attention it was trained for",
                       model_args.attn_implementation)


def _load_preserving_super_weights(path: str, model_args: ModelArguments, training_args):
    """A bitsandbytes base whose super weights stay exact (pipeline.quant): detected on the fp model unless a
    registry is given; the registry is written next to the adapter so reloading and merging find it."""
    from pipeline.quant.qlora import load_quantized_preserving_super_weights

    dtype = _dtype(model_args)
    device_map = None
    if torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    model, registry = load_quantized_preserving_super_weights(
        path, load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type, bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage, registry_path=model_args.super_weight_registry,
        output_dir=training_args.output_dir, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        device_map=device_map, trust_remote_code=model_args.trust_remote_code)
    logger.info("super weights kept exact: %s", [(s["layer"], s["row"], s["col"]) for s in registry["super_weights"]])
    if training_args.gradient_checkpointing:
        model.config.use_cache = False
    serve_declared_attention(model, model_args)
    return model


def keep_adapter_dtype_on_resume(model) -> None:
    """A resume must not change what trains in which precision. TRL casts a QLoRA adapter to bf16 when training in
    bf16, but the Trainer resumes a PEFT model through its `load_adapter`, whose default casts the adapter to float32
    (and the optimizer state then loads in float32 too): the resumed run would train other numbers than the
    uninterrupted one. Loading into the adapter as it is keeps its dtype (pinned by tests/test_longctx_contracts)."""
    if callable(getattr(model, "load_adapter", None)) and hasattr(model, "peft_config"):
        model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)


def peft_config(model_args: ModelArguments):
    return get_peft_config(model_args)

"""Model and tokenizer loading shared by the training stages (full, LoRA, QLoRA)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from trl import get_peft_config, get_quantization_config

from pipeline.config import ModelArguments, RecipeError
from pipeline.io import looks_local

logger = logging.getLogger(__name__)


def resolve_model_path(model_args: ModelArguments, source: str) -> str:
    """The path or hub id to load. A missing local path falls back to the recipe's tiny model (built once)."""
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError(f"{source}: missing required key 'model_name_or_path'")
    if Path(name).exists():
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
    return name


def resolve_ref_path(model_args: ModelArguments, source: str) -> str | None:
    name = model_args.ref_model_name_or_path
    if name and not Path(name).exists() and looks_local(name):
        raise RecipeError(f"{source}: key 'ref_model_name_or_path': {name} not found")
    return name


def load_tokenizer(path: str, model_args: ModelArguments):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                        trust_remote_code=model_args.trust_remote_code)
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
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is not None:
        from pipeline.quant.qlora import disable_cpu_packing

        disable_cpu_packing(model)
    if training_args.gradient_checkpointing or getattr(training_args, "activation_checkpointing", False):
        model.config.use_cache = False
    return model


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
    return model


def peft_config(model_args: ModelArguments):
    return get_peft_config(model_args)

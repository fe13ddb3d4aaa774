"""QLoRA on a bitsandbytes 4-bit (or 8-bit) base whose super weights stay exact.

The super weight is taken out of the matrix before it is quantized (so its block-mates get a normal
quantization scale instead of one stretched by a 100x outlier) and added back exactly by a forward hook on
that module: out[..., row] += x[..., col] * w_sw. The hook sits on the bitsandbytes module itself, so it keeps
working when PEFT wraps that module in a LoRA layer (PEFT calls the wrapped base layer, then adds LoRA).

Call sequence (SFT/DPO stages; see docs/quant.md):

    model, registry = load_quantized_preserving_super_weights(path, load_in_4bit=True, output_dir=out)
    trainer = SFTTrainer(model=model, peft_config=LoraConfig(...), ...); trainer.train(); trainer.save_model(out)
    # `out/super_weights.json` was written by the loader; later:
    model, _ = load_quantized_preserving_super_weights(path, registry_path=f"{out}/super_weights.json", ...)
    model = PeftModel.from_pretrained(model, out)          # hooks are already on the base modules
    merged = merge_adapter_preserving_super_weights(path, out)   # full-precision merged model
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipeline.config import RecipeError
from pipeline.quant.registry import (SuperWeight, load_registry, make_registry, read_registry, registry_super_weights,
                                     save_registry)

logger = logging.getLogger(__name__)

REGISTRY_NAME = "super_weights.json"


def holdout_entries(super_weights: list[SuperWeight], protect_activation_rows: bool = False,
                    hidden_size: int | None = None) -> dict[str, list[tuple]]:
    """module name -> (row, col) weight entries kept out of quantization. The super weight itself, and with
    `protect_activation_rows` also rows `col` of gate_proj and up_proj, which produce the huge input the super
    weight multiplies (under NF4 that input drifts by ~20% in 7B models even when down_proj is exact)."""
    out: dict[str, list[tuple]] = {}
    for sw in super_weights:
        out.setdefault(sw.module, []).append((sw.row, sw.col))
        if protect_activation_rows:
            for proj in ("gate_proj", "up_proj"):
                name = f"model.layers.{sw.layer}.mlp.{proj}"
                out.setdefault(name, []).extend((sw.col, j) for j in range(hidden_size))
    return {k: sorted(set(v)) for k, v in out.items()}


def _hook(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor):
    cache: dict = {}

    def fn(module, args, out):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (rows.to(x.device), cols.to(x.device), vals.to(x.device, x.dtype))
        r, c, v = cache[key]
        return out.index_add(-1, r, (x[..., c] * v).to(out.dtype))

    return fn


def attach_holdout_hooks(model, holdouts: dict[str, dict]) -> None:
    """Hook each module to add its held-out entries back exactly. `holdouts`: name -> {"rows", "cols",
    "values"} (tensors). Safe to call again: an existing hook is replaced, never stacked."""
    modules = _named_linear(model)
    for name, h in holdouts.items():
        mod = modules[name]
        old = getattr(mod, "super_weight_hook", None)
        if old is not None:
            old.remove()
        mod.super_weight_hook = mod.register_forward_hook(_hook(h["rows"], h["cols"], h["values"]))


def _named_linear(model) -> dict[str, torch.nn.Module]:
    """'model.layers.N.mlp.X' -> the Linear (bitsandbytes or not), looking through PEFT wrappers."""
    out = {}
    for name, mod in model.named_modules():
        m = re.search(r"(model\.layers\.\d+\.(?:mlp|self_attn)\.\w+)$", name)
        if m and isinstance(mod, torch.nn.Linear):
            out[m.group(1)] = mod
        elif m and hasattr(mod, "get_base_layer"):
            out[m.group(1)] = mod.get_base_layer()
    return out


def _quantized_copy(linear: torch.nn.Linear, cfg):
    """A bitsandbytes module quantized from `linear`'s (already edited) full-precision weight, with the
    same settings transformers used for every other layer."""
    import bitsandbytes as bnb

    w, bias = linear.weight.data, linear.bias is not None
    device = w.device
    storage = cfg.bnb_4bit_quant_storage or torch.uint8
    if cfg.load_in_4bit:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                compute_dtype=cfg.bnb_4bit_compute_dtype, quant_type=cfg.bnb_4bit_quant_type,
                                compress_statistics=cfg.bnb_4bit_use_double_quant, quant_storage=storage)
        new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=cfg.bnb_4bit_quant_type,
                                       compress_statistics=cfg.bnb_4bit_use_double_quant, quant_storage=storage,
                                       module=new)
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=cfg.llm_int8_threshold)
        new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        new.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return new.to(device)


def disable_cpu_packing(model) -> None:
    """bitsandbytes' CPU kernel for AVX512-BF16 repacks 4-bit weights on the first no-grad forward and has no
    autograd: training after any eval would get silently wrong gradients (bitsandbytes #2078). Use the
    unpacked path everywhere (every 4-bit load of the pipeline calls this)."""
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False


def load_quantized_preserving_super_weights(
    model_name_or_path: str, *, load_in_4bit: bool = True, load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4", bnb_4bit_use_double_quant: bool = False,
    bnb_4bit_compute_dtype: torch.dtype | None = None, bnb_4bit_quant_storage: str | None = None,
    llm_int8_threshold: float = 6.0, registry_path: str | None = None, output_dir: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    protect_activation_rows: bool = False, detect_prompt: str | None = None, spike_ratio: float = 50.0,
    weight_ratio: float = 20.0, device_map=None, trust_remote_code: bool = False,
):
    """A transformers model with a bitsandbytes base whose super weights (and, optionally, the gate/up rows that
    feed them) are held out of quantization and added back exactly by forward hooks.

    registry_path None => detect on the full-precision model first and, if `output_dir` is given, write
    `output_dir/super_weights.json` (also written when a registry is given, so the adapter directory always
    carries the registry its merge needs). Returns (model, registry dict).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if load_in_4bit == load_in_8bit:
        raise RecipeError("load_quantized_preserving_super_weights: set exactly one of load_in_4bit / load_in_8bit")
    kwargs = dict(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    if registry_path is None:
        from pipeline.quant.detect import DEFAULT_PROMPT, detect_super_weights, encode_prompt

        fp = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        sws, trace = detect_super_weights(fp, encode_prompt(tokenizer, detect_prompt or DEFAULT_PROMPT), spike_ratio,
                                          weight_ratio)
        trace["prompt"] = detect_prompt or DEFAULT_PROMPT
        registry = make_registry(fp, sws, name_or_path=str(model_name_or_path), detection=trace)
        del fp
        logger.info("detected super weights %s", [(s.layer, s.row, s.col) for s in sws])
    else:
        registry = read_registry(registry_path)
        sws = registry_super_weights(registry, str(registry_path))

    hidden = None
    if protect_activation_rows:
        from transformers import AutoConfig

        hidden = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).hidden_size
    holdouts = holdout_entries(sws, protect_activation_rows, hidden)
    # Full names, regex-escaped: transformers matches skip patterns as prefixes/regexes/suffixes, and a bare
    # "2.mlp.down_proj" would also keep layers 12 and 22 unquantized. Passing the list replaces the default
    # one, so lm_head must be named again.
    cfg = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                             bnb_4bit_quant_type=bnb_4bit_quant_type,
                             bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                             bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
                             bnb_4bit_quant_storage=bnb_4bit_quant_storage, llm_int8_threshold=llm_int8_threshold,
                             llm_int8_skip_modules=["lm_head"] + [re.escape(n) for n in holdouts])
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, quantization_config=cfg, **kwargs)
    if registry_path is not None:
        sws = load_registry(registry_path, model)  # now that the model exists: fingerprint and shape checks

    modules = _named_linear(model)
    tensors = {}
    with torch.no_grad():
        for name, entries in holdouts.items():
            lin = modules[name]
            if type(lin) is not torch.nn.Linear:
                raise RecipeError(f"{name}: expected a full-precision Linear before quantizing, "
                                  f"got {type(lin).__name__}")
            rows = torch.tensor([r for r, _ in entries])
            cols = torch.tensor([c for _, c in entries])
            vals = lin.weight.data[rows, cols].clone()
            for sw in (s for s in sws if s.module == name):  # a value the checkpoint does not hold: wrong registry
                got = lin.weight.data[sw.row, sw.col]
                if got != torch.tensor(sw.value, dtype=got.dtype):
                    raise RecipeError(f"{registry_path or 'detected registry'}: super weight "
                                      f"{(sw.layer, sw.row, sw.col)} is {sw.value!r} in the registry but "
                                      f"{got.item()!r} in {model_name_or_path}")
            lin.weight.data[rows, cols] = 0  # block-mates now quantize with a normal scale
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name).__setattr__(child, _quantized_copy(lin, cfg))
            tensors[name] = {"rows": rows, "cols": cols, "values": vals}
    attach_holdout_hooks(model, tensors)
    if load_in_4bit:
        disable_cpu_packing(model)
    model.super_weight_holdouts = tensors  # read by merge_adapter_preserving_super_weights

    registry["quantization"] = {"load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit,
                                "bnb_4bit_quant_type": bnb_4bit_quant_type,
                                "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant,
                                "bnb_4bit_quant_storage": bnb_4bit_quant_storage,
                                "llm_int8_threshold": llm_int8_threshold,
                                "protect_activation_rows": protect_activation_rows}
    if output_dir is not None:
        save_registry(registry, Path(output_dir) / REGISTRY_NAME)
    return model, registry


def merge_adapter_preserving_super_weights(model_name_or_path: str, adapter_dir: str, *,
                                           registry_path: str | None = None, dtype: torch.dtype | str = torch.float32,
                                           device_map=None):
    """The full-precision merged model of a QLoRA run: the base is re-quantized exactly as in training,
    dequantized (transformers' `dequantize()`), the held-out entries are written back exactly (NF4 and int8
    both map 0 to exactly 0, so each super weight lands bit-exact), and PEFT merges the adapter on top.
    The merged super weight is w_sw + the adapter's own delta at that entry (just w_sw if down_proj was not
    a LoRA target)."""
    from peft import PeftModel

    registry_path = registry_path or str(Path(adapter_dir) / REGISTRY_NAME)
    q = read_registry(registry_path).get("quantization")
    if not q:
        raise RecipeError(f"{registry_path}: key 'quantization' missing (write the registry with "
                          "load_quantized_preserving_super_weights)")
    model, _ = load_quantized_preserving_super_weights(
        model_name_or_path, registry_path=registry_path, dtype=dtype, device_map=device_map,
        load_in_4bit=q["load_in_4bit"], load_in_8bit=q["load_in_8bit"], bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=q["bnb_4bit_use_double_quant"],
        bnb_4bit_quant_storage=q.get("bnb_4bit_quant_storage"), llm_int8_threshold=q["llm_int8_threshold"],
        protect_activation_rows=q["protect_activation_rows"])
    holdouts = model.super_weight_holdouts
    model = model.dequantize(dtype=dtype)
    modules = _named_linear(model)
    with torch.no_grad():
        for name, h in holdouts.items():
            w = modules[name].weight
            w[h["rows"], h["cols"]] += h["values"].to(w.device, w.dtype)
            hook = getattr(modules[name], "super_weight_hook", None)
            if hook is not None:  # the value now lives in the weight; never add it twice
                hook.remove()
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model


def check_exact(model, super_weights: list[SuperWeight]) -> list[bool]:
    """For a full-precision model: is each super weight bit-exactly its registry value?"""
    modules = _named_linear(model)
    return [bool(modules[s.module].weight[s.row, s.col].item() == s.value) for s in super_weights]


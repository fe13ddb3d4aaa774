"""The super-weight registry: a JSON file naming a model's super weights, tied to that model.

A registry records each super weight as (layer, row, col, value) of `model.layers[layer].mlp.down_proj.weight`
together with a fingerprint of the model it was made for, so that a registry for another model (or one with
coordinates outside the weight) is rejected with a one-line error instead of silently protecting the wrong
scalar. `value` is the full-precision weight; JSON floats round-trip float32/bfloat16 values exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from pipeline.config import RecipeError
from pipeline.io import atomic_write_json, model_fingerprint

FORMAT = "pipeline.quant.super_weights/v1"
DOWN_PROJ_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")

# Published coordinates (layer, row, col) of Yu et al. 2024 (arXiv 2411.07191), keyed by the config fields
# that tell these checkpoints apart (Llama-1 and Llama-2 differ in max_position_embeddings).
PUBLISHED: dict[str, dict[str, Any]] = {
    "Llama-7B": {"shape": ("llama", 4096, 32, 11008, 32000, 2048), "coords": [(2, 3968, 7003)]},
    "Llama-13B": {"shape": ("llama", 5120, 40, 13824, 32000, 2048), "coords": [(2, 2231, 2278), (2, 2231, 6939)]},
    "Llama-30B": {"shape": ("llama", 6656, 60, 17920, 32000, 2048),
                  "coords": [(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)]},
    "Llama-2-7B": {"shape": ("llama", 4096, 32, 11008, 32000, 4096), "coords": [(1, 2533, 7890)]},
    "Llama-2-13B": {"shape": ("llama", 5120, 40, 13824, 32000, 4096), "coords": [(3, 4743, 7678)]},
    "Mistral-7B-v0.1": {"shape": ("mistral", 4096, 32, 14336, 32000, 32768), "coords": [(1, 2070, 7310)]},
}


@dataclasses.dataclass(frozen=True)
class SuperWeight:
    layer: int
    row: int  # output channel of down_proj = residual-stream dimension of the super activation
    col: int  # input channel of down_proj = the intermediate channel carrying the huge activation
    value: float

    @property
    def module(self) -> str:
        return f"model.layers.{self.layer}.mlp.down_proj"


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def config_shape(model_or_config) -> tuple:
    c = _config(model_or_config)
    return (c.model_type, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size,
            getattr(c, "max_position_embeddings", None))


def published_match(model_or_config) -> str | None:
    """The name of the published model whose config shape this model has, if any."""
    shape = config_shape(model_or_config)
    for name, entry in PUBLISHED.items():
        if tuple(entry["shape"]) == shape:
            return name
    return None


def fingerprint(model) -> str:
    """The model's embedding fingerprint (`pipeline.io.model_fingerprint`): the same for its fp32, bf16 and
    bitsandbytes loads, with or without LoRA on linear layers."""
    return model_fingerprint(model, embeddings_only=True)


def check_coordinates(super_weights: list[SuperWeight], model_or_config, where: str) -> None:
    c = _config(model_or_config)
    limits = {"layer": c.num_hidden_layers, "row": c.hidden_size, "col": c.intermediate_size}
    for i, sw in enumerate(super_weights):
        for key, limit in limits.items():
            v = getattr(sw, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < limit:
                raise RecipeError(f"{where}: super_weights[{i}].{key} = {v!r} is outside [0, {limit}) for this model "
                                  f"(down_proj weight is {c.hidden_size} x {c.intermediate_size}, "
                                  f"{c.num_hidden_layers} layers)")
        if not isinstance(sw.value, (int, float)) or not math.isfinite(sw.value):
            raise RecipeError(f"{where}: super_weights[{i}].value = {sw.value!r} is not a finite number")


def make_registry(model, super_weights: list[SuperWeight], *, name_or_path: str | None = None,
                  detection: dict | None = None, confirmation: dict | None = None) -> dict:
    check_coordinates(super_weights, model, "detected super weights")
    c = model.config
    published = None
    match = published_match(model)
    if match is not None:
        want = sorted(PUBLISHED[match]["coords"])
        got = sorted((sw.layer, sw.row, sw.col) for sw in super_weights)
        published = {"model": match, "coordinates": [list(x) for x in want], "agrees": got == want}
    return {
        "format": FORMAT,
        "model": {"name_or_path": name_or_path or getattr(c, "_name_or_path", None), "model_type": c.model_type,
                  "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                  "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                  "fingerprint": fingerprint(model)},
        "super_weights": [dataclasses.asdict(sw) | {"module": sw.module} for sw in super_weights],
        "published": published,
        "detection": detection,
        "confirmation": confirmation,
    }


def save_registry(registry: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, registry)
    return path


def read_registry(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: super-weight registry not found")
    try:
        reg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(reg, dict) or reg.get("format") != FORMAT:
        raise RecipeError(f"{path}: not a super-weight registry (key 'format' must be '{FORMAT}')")
    if not isinstance(reg.get("super_weights"), list):
        raise RecipeError(f"{path}: key 'super_weights' must be a list")
    return reg


def registry_super_weights(reg: dict, where: str = "registry") -> list[SuperWeight]:
    out = []
    for i, item in enumerate(reg["super_weights"]):
        if not isinstance(item, dict) or any(k not in item for k in ("layer", "row", "col", "value")):
            raise RecipeError(f"{where}: super_weights[{i}] must have keys layer, row, col, value")
        out.append(SuperWeight(item["layer"], item["row"], item["col"], item["value"]))
    return out


def load_registry(path: str | Path, model) -> list[SuperWeight]:
    """Read a registry and check it belongs to `model` (fingerprint) and fits its shapes."""
    reg = read_registry(path)
    want, got = reg.get("model", {}).get("fingerprint"), fingerprint(model)
    if want != got:
        raise RecipeError(f"{path}: registry was made for model {reg.get('model', {}).get('name_or_path')!r} "
                          f"(fingerprint {want}), not for this model (fingerprint {got})")
    sws = registry_super_weights(reg, str(path))
    check_coordinates(sws, model, str(path))
    return sws

"""Find super weights in one forward pass, confirm them causally, and write the registry + a plot.

Every `mlp.down_proj` is hooked; per layer we record the largest |input| and |output| and where they occur.
A super weight shows as the FIRST layer whose output maximum towers over the other layers' (Llama-7B has a
second spike near the last layer that cancels the first, so the first one is the cause). Its coordinates:
row = the spiking output channel, col = the input channel contributing most to that output at that token,
accepted only if that weight is itself an outlier of its matrix. We zero it and re-run until no such spike
remains (Llama-13B/30B have two or three), then put the weights back.

Confirmation compares zeroing the super weights with zeroing magnitude-matched nulls (the next-largest
|w| of the same matrices): a real super weight moves the output distribution far more than its null.

    python -m pipeline.quant.detect --model_name_or_path outputs/tiny/base --output outputs/tiny/super_weights.json
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path

import torch

from pipeline.config import RecipeError, cli, parse
from pipeline.quant.registry import DOWN_PROJ_RE, SuperWeight, make_registry, save_registry

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


@dataclasses.dataclass
class DetectArguments:
    model_name_or_path: str = dataclasses.field(default="", metadata={"help": "Full-precision model to scan."})
    output: str = dataclasses.field(default="", metadata={"help": "Registry JSON to write (PNG goes next to it)."})
    prompt: str = dataclasses.field(default=DEFAULT_PROMPT, metadata={"help": "One prompt is enough."})
    spike_ratio: float = dataclasses.field(
        default=50.0, metadata={"help": "A layer spikes when its max |down_proj output| exceeds this x the median "
                                "of the other layers' maxima."})
    weight_ratio: float = dataclasses.field(
        default=20.0, metadata={"help": "A candidate must also be an outlier weight: |w| > this x median |w| of its "
                                "matrix (after a super weight is zeroed, its huge input times ordinary weights "
                                "still spikes; those are not super weights)."})
    max_super_weights: int = 8
    confirm: bool = dataclasses.field(default=True, metadata={"help": "Zero vs magnitude-matched null check."})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("key 'model_name_or_path' is required")
        if not self.output.endswith(".json"):
            raise ValueError("key 'output' must be a .json path")
        if self.spike_ratio <= 1 or self.weight_ratio <= 1:
            raise ValueError("keys 'spike_ratio' and 'weight_ratio' must be > 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError("key 'dtype' must be one of float32, bfloat16, float16")


def down_projs(model) -> dict[int, torch.nn.Module]:
    """layer index -> the down_proj Linear (the wrapped base layer under PEFT)."""
    out = {}
    for name, mod in model.named_modules():
        m = DOWN_PROJ_RE.search(name)
        if m:
            out[int(m.group(1))] = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    if not out:
        raise RecipeError(f"{type(model).__name__}: no 'layers.N.mlp.down_proj' modules (not a Llama-style model)")
    return dict(sorted(out.items()))


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids with the BOS token first: the super activation lives on the first token, and Llama-style
    models always see BOS there (our tiny tokenizers do not add it themselves)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor([ids])


@torch.no_grad()
def down_proj_stats(model, input_ids: torch.Tensor) -> list[dict]:
    """Per layer: max |input| and |output| of down_proj with (token, channel), for sequence 0."""
    stats, handles = {}, []

    def hook(layer):
        def fn(mod, args, out):
            x, y = args[0][0].float(), out[0].float()
            xi, yi = x.abs().argmax().item(), y.abs().argmax().item()
            stats[layer] = {"layer": layer, "in_max": x.abs().max().item(), "in_token": xi // x.shape[-1],
                            "in_channel": xi % x.shape[-1], "out_max": y.abs().max().item(),
                            "out_token": yi // y.shape[-1], "out_channel": yi % y.shape[-1]}
            stats[layer]["_x"] = x  # kept only to locate the column; dropped before returning
        return fn

    for layer, mod in down_projs(model).items():
        handles.append(mod.register_forward_hook(hook(layer)))
    try:
        model(input_ids=input_ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return [stats[k] for k in sorted(stats)]


def spike_ratios(stats: list[dict]) -> list[float]:
    """Each layer's max |down_proj output| over the median of the OTHER layers' maxima (with all layers in
    the median, a 2-layer model could never spike)."""
    outs = [s["out_max"] for s in stats]
    if len(outs) < 2:
        return [1.0] * len(outs)
    return [o / max(statistics.median(outs[:i] + outs[i + 1:]), 1e-12) for i, o in enumerate(outs)]


def first_spike(stats: list[dict], spike_ratio: float) -> dict | None:
    for s, r in zip(stats, spike_ratios(stats)):
        if r > spike_ratio:
            return s
    return None


@torch.no_grad()
def detect_super_weights(model, input_ids: torch.Tensor, spike_ratio: float = 50.0, weight_ratio: float = 20.0,
                         max_super_weights: int = 8) -> tuple[list[SuperWeight], dict]:
    """Iterative one-pass detection. Returns the super weights and a JSON-able trace (per-layer maxima
    before and after removal). The model's weights are unchanged on return."""
    projs = down_projs(model)
    found: list[SuperWeight] = []
    rounds = []
    try:
        for _ in range(max_super_weights + 1):
            stats = down_proj_stats(model, input_ids)
            spike = first_spike(stats, spike_ratio)
            rounds.append([{k: v for k, v in s.items() if k != "_x"} for s in stats])
            if spike is None or len(found) == max_super_weights:
                break
            layer, tok, row = spike["layer"], spike["out_token"], spike["out_channel"]
            w = projs[layer].weight
            contrib = (spike["_x"][tok] * w[row].float()).abs()
            col = int(contrib.argmax())
            sw = SuperWeight(layer, row, col, float(w[row, col]))
            if abs(sw.value) <= weight_ratio * w.float().abs().median().item():
                break  # the spike that is left is a huge input times ordinary weights
            found.append(sw)
            w[row, col] = 0
    finally:
        for sw in found:
            projs[sw.layer].weight[sw.row, sw.col] = sw.value
    trace = {"spike_ratio": spike_ratio, "weight_ratio": weight_ratio, "per_layer": rounds[0],
             "per_layer_after_removal": rounds[-1] if found else None,
             "spike_over_median": spike_ratios(rounds[0])}
    return found, trace


def _zero(model, coords) -> list[tuple]:
    projs = down_projs(model)
    saved = []
    for layer, row, col in coords:
        w = projs[layer].weight
        saved.append((layer, row, col, w[row, col].clone()))
        w[row, col] = 0
    return saved


def _restore(model, saved) -> None:
    projs = down_projs(model)
    for layer, row, col, v in saved:
        projs[layer].weight[row, col] = v


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_ref || p)."""
    ref = torch.log_softmax(ref_logits.float(), -1)
    new = torch.log_softmax(logits.float(), -1)
    return (ref.exp() * (ref - new)).sum(-1).mean().item()


@torch.no_grad()
def confirm_super_weights(model, super_weights: list[SuperWeight], input_ids: torch.Tensor,
                          n_null: int = 5, margin: float = 10.0) -> dict:
    """KL to the intact model when the super weights are zeroed vs when, for each of `n_null` draws, the
    k-th next-largest |w| of each super weight's matrix is zeroed instead (a magnitude-matched null)."""
    input_ids = input_ids.to(model.device)
    ref = model(input_ids=input_ids).logits
    saved = _zero(model, [(s.layer, s.row, s.col) for s in super_weights])
    try:
        kl_sw = mean_kl(ref, model(input_ids=input_ids).logits)
    finally:
        _restore(model, saved)
    projs = down_projs(model)
    taken = {(s.layer, s.row, s.col) for s in super_weights}
    ranked = {}
    for s in super_weights:
        w = projs[s.layer].weight.float()
        order = w.abs().flatten().argsort(descending=True)[: len(super_weights) + n_null + 1].tolist()
        ranked[s] = [(s.layer, i // w.shape[1], i % w.shape[1]) for i in order
                     if (s.layer, i // w.shape[1], i % w.shape[1]) not in taken]
    kl_null = []
    for k in range(n_null):
        saved = _zero(model, [ranked[s][k] for s in super_weights if k < len(ranked[s])])
        try:
            kl_null.append(mean_kl(ref, model(input_ids=input_ids).logits))
        finally:
            _restore(model, saved)
    worst = max(kl_null) if kl_null else 0.0
    return {"kl_zero_super_weights": kl_sw, "kl_zero_null": kl_null, "margin": margin,
            "confirmed": bool(super_weights) and kl_sw > margin * worst}


def plot_stats(trace: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("per_layer", "before"), ("per_layer_after_removal", "super weights zeroed")):
        if trace.get(key):
            layers = [s["layer"] for s in trace[key]]
            ax.plot(layers, [s["out_max"] for s in trace[key]], "o-", label=f"max |down_proj out| ({label})")
            ax.plot(layers, [s["in_max"] for s in trace[key]], "s--", alpha=0.6, label=f"max |down_proj in| ({label})")
    layers = [s["layer"] for s in trace["per_layer"]]
    thr = [s["out_max"] / r * trace["spike_ratio"] for s, r in zip(trace["per_layer"], trace["spike_over_median"])]
    ax.plot(layers, thr, color="grey", ls=":", label=f"{trace['spike_ratio']:g} x median of the other layers")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_title(title or "per-layer max activations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, _ = parse([DetectArguments], argv, prog="python -m pipeline.quant.detect")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(args.model_name_or_path).exists():
        raise RecipeError(f"key 'model_name_or_path': {args.model_name_or_path} not found (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype)).eval()
    input_ids = encode_prompt(tokenizer, args.prompt)
    sws, trace = detect_super_weights(model, input_ids, args.spike_ratio, args.weight_ratio, args.max_super_weights)
    trace["prompt"] = args.prompt
    confirmation = confirm_super_weights(model, sws, input_ids) if args.confirm and sws else None
    registry = make_registry(model, sws, name_or_path=args.model_name_or_path, detection=trace,
                             confirmation=confirmation)
    save_registry(registry, args.output)
    png = plot_stats(trace, Path(args.output).with_suffix(".png"), title=Path(args.model_name_or_path).name)
    logger.info("super weights %s -> %s (+ %s)", [(s.layer, s.row, s.col) for s in sws], args.output, png)
    if registry["published"] and not registry["published"]["agrees"]:
        logger.warning("detected coordinates differ from the published ones for %s: %s",
                       registry["published"]["model"], registry["published"]["coordinates"])
    return registry


if __name__ == "__main__":
    cli(main)

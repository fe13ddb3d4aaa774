"""Fidelity measures used to judge quantization: NLL, copy-task accuracy, KL to a reference, and the super
activation (the super weight's layer's down_proj output at (token 0, row))."""

from __future__ import annotations

import torch

from pipeline.quant.detect import down_projs, mean_kl
from pipeline.quant.registry import SuperWeight


@torch.no_grad()
def super_activation(model, ids: torch.Tensor, sw: SuperWeight) -> float:
    """Mean over sequences of the super weight layer's down_proj output at (token 0, row)."""
    got = {}

    def hook(module, args, out):
        got["y"] = out[:, 0, sw.row]

    h = down_projs(model)[sw.layer].register_forward_hook(hook)
    try:
        model(input_ids=ids.to(model.device))
    finally:
        h.remove()
    return got["y"].float().mean().item()


@torch.no_grad()
def fidelity(model, ids: torch.Tensor, ref_logits: torch.Tensor | None = None, sw: SuperWeight | None = None,
             ref_sa: float | None = None) -> dict:
    """NLL, copy accuracy (second half, greedy next-token), KL to reference logits, super-activation error."""
    ids = ids.to(model.device)
    logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    half = (ids.shape[1] - 2) // 2
    pred = logits[:, -half - 1:-1].argmax(-1)
    out = {"nll": nll.item(), "copy_acc": (pred == ids[:, -half:]).float().mean().item()}
    if ref_logits is not None:
        out["kl"] = mean_kl(ref_logits, logits)
    if sw is not None:
        sa = super_activation(model, ids, sw)
        out["super_activation"] = sa
        if ref_sa:
            out["sa_rel_err"] = abs(sa - ref_sa) / abs(ref_sa)
    return out

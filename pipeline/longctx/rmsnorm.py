"""RMSNorm that saves its (bf16) input and one float per token for backward, not float32 copies.

transformers' RMSNorm (Llama, Mistral, Qwen2) upcasts to float32, and autograd saves the float32 input and the
normalised tensor rounded back to bf16: 3x the bytes of the bf16 hidden state per norm, 2 norms per layer. Under
activation checkpointing that is the biggest per-token buffer of the recomputed layer after the MLP's (measured on
an H100 at Llama-8B width: 4 of the 16 GB of activations at 64k tokens). This autograd function saves
only its input (which the layer keeps anyway as its checkpoint or residual) and the per-token inverse RMS, and
recomputes the normalisation in backward, tile by tile so that no float32 copy of the whole sequence is ever live.
Same formula, in float32, as transformers'; only the order of floating-point operations in backward differs.
"""

from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

# Classes whose forward is exactly weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
SUPPORTED = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, tile_tokens):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat, dtype=torch.result_type(weight, flat))
        rstd = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        for start in range(0, flat.shape[0], tile_tokens):
            tile = flat[start:start + tile_tokens].float()
            rstd[start:start + tile_tokens] = torch.rsqrt(tile.pow(2).mean(-1, keepdim=True) + eps)
            out[start:start + tile_tokens] = weight * (tile * rstd[start:start + tile_tokens]).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.tile_tokens = tile_tokens
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(flat) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, flat.shape[0], ctx.tile_tokens):
            stop = start + ctx.tile_tokens
            r = rstd[start:stop]
            normed = flat[start:stop].float() * r
            g = grad_flat[start:stop]
            if want_w:
                grad_w += (g.float() * normed.to(x.dtype).float()).sum(0)
            if want_x:
                grad_n = (g * weight).float()  # through .to(dtype), which passes the gradient unchanged
                grad_x[start:stop] = r * (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True))
        return (grad_x.view_as(x) if want_x else None, grad_w.to(weight.dtype) if want_w else None, None, None)


def patch_rmsnorm(model, tile_tokens: int) -> int:
    """Make every supported RMSNorm of `model` lean (see the module docstring); returns the number patched.
    Sequences of at most `tile_tokens` tokens take the original path."""
    patched, skipped = 0, set()
    for module in model.modules():
        name = type(module).__name__
        if not name.endswith("RMSNorm") or getattr(module, "_longctx_lean", False):
            continue
        if name not in SUPPORTED or not hasattr(module, "variance_epsilon"):
            skipped.add(name)
            continue
        original = module.forward

        def lean_forward(self, x, original=original):
            # Nothing is saved without grad (inference, a checkpointed layer's first pass). Sequences of at most one
            # tile take the plain path, like the tiled MLP's (per row, not batch x length): short-sequence recipes stay
            # bit-for-bit unchanged (a rounding-level change can move a small model's training far). Under ZeRO-3 the
            # norm's module hooks gather the weight around forward and backward as for any module.
            if not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] <= tile_tokens:
                return original(x)
            return RMSNormFunction.apply(x, self.weight, self.variance_epsilon, tile_tokens)

        module.forward = types.MethodType(lean_forward, module)
        module._longctx_lean = True
        patched += 1
    if skipped:
        logger.warning("lean_rmsnorm: %s kept as is (only %s are supported)", ", ".join(sorted(skipped)),
                       ", ".join(SUPPORTED))
    return patched

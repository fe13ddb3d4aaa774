"""Block-wise round-to-nearest quantization with outlier clipping and super-weight restore.

    W_hat = RESTORE(Q^-1(Q(CLIP(W))))

Q is asymmetric min-max INT-b per 2-D block (block size up to the whole tensor). With min-max RTN the super
weight is its block's extreme, so it survives on its own, but it stretches the block's range so every other
weight there rounds to a handful of levels. Clipping each block (z-score or percentile) removes that
stretch; it also destroys the super weight, which is why it is written back afterwards in full precision.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from pipeline.quant.registry import SuperWeight

LINEAR_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C) -> (R/br * C/bc, br*bc), one row per block."""
    (r, c), (br, bc) = w.shape, block
    return w.reshape(r // br, br, c // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)


def _unblocks(b: torch.Tensor, shape, block) -> torch.Tensor:
    (r, c), (br, bc) = shape, block
    return b.reshape(r // br, c // bc, br, bc).permute(0, 2, 1, 3).reshape(r, c)


def clip_blocks(b: torch.Tensor, method: Literal["zscore", "percentile"], value: float) -> torch.Tensor:
    if method == "zscore":  # clamp to mean +- value * std of the block
        mu, sd = b.mean(1, keepdim=True), b.std(1, keepdim=True)
        return torch.maximum(torch.minimum(b, mu + value * sd), mu - value * sd)
    if method == "percentile":  # clamp to the [100-value, value] percentiles of the block
        n = b.shape[1]
        k_hi = max(1, min(n, round(n * value / 100)))
        k_lo = max(1, min(n, round(n * (100 - value) / 100)))
        hi = b.kthvalue(k_hi, dim=1, keepdim=True).values
        lo = b.kthvalue(k_lo, dim=1, keepdim=True).values
        return torch.maximum(torch.minimum(b, hi), lo)
    raise ValueError(f"clip method must be 'zscore' or 'percentile', got {method!r}")


def quantize_dequantize(w: torch.Tensor, bits: int = 4, block: tuple[int, int] | None = None,
                        clip: Literal["zscore", "percentile"] | None = None, clip_value: float = 3.0,
                        restore: list[tuple[int, int]] = ()) -> torch.Tensor:
    """Fake-quantize a 2-D weight: returns the dequantized tensor (same dtype as `w`).

    block: (rows, cols) dividing w's shape; None = the whole tensor. restore: (row, col) entries written back
    from `w` after dequantization. Per element, |result - CLIP(w)| <= scale/2 of its block (unless restored).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    block = tuple(block) if block is not None else tuple(w.shape)
    if w.shape[0] % block[0] or w.shape[1] % block[1]:
        raise ValueError(f"block {block} does not divide weight shape {tuple(w.shape)}")
    b = _blocks(w.detach().float(), block)
    if clip is not None:
        b = clip_blocks(b, clip, clip_value)
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((b - lo) / scale).clamp_(0, levels)
    out = _unblocks(q * scale + lo, w.shape, block)
    for row, col in restore:
        out[row, col] = w[row, col].float()
    return out.to(w.dtype)


@torch.no_grad()
def quantize_model_rtn(model, bits: int = 4, block: tuple[int, int] | None = None,
                       clip: Literal["zscore", "percentile"] | None = None, clip_value: float = 3.0,
                       super_weights: list[SuperWeight] = (), restore_activation_rows: bool = False) -> int:
    """Fake-quantize every attention/MLP projection of every decoder layer in place (embeddings, norms and the
    LM head stay full precision); super weights are restored when `super_weights` is given, and with
    `restore_activation_rows` also rows `col` of gate_proj/up_proj, which produce the input the super weight
    multiplies (clipping their outliers shrinks the super activation even when the super weight is exact).
    A block larger than a matrix is cut to the matrix. Returns the number of matrices quantized."""
    n = 0
    for name, mod in model.named_modules():
        m = LINEAR_RE.search(name)
        if not m:
            continue
        layer, proj = int(m.group(1)), m.group(3)
        w = mod.weight
        restore = [(s.row, s.col) for s in super_weights if proj == "down_proj" and s.layer == layer]
        if restore_activation_rows and proj in ("gate_proj", "up_proj"):
            restore += [(s.col, j) for s in super_weights if s.layer == layer for j in range(w.shape[1])]
        blk = None if block is None else (min(block[0], w.shape[0]), min(block[1], w.shape[1]))
        w.copy_(quantize_dequantize(w, bits, blk, clip, clip_value, restore))
        n += 1
    return n

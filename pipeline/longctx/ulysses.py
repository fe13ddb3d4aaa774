"""Ulysses sequence parallelism on plain torch.distributed (works with gloo on CPU and NCCL on GPU).

Each rank of a sequence-parallel (SP) group holds a contiguous shard of every sequence. Everything in a decoder
layer except attention is token-wise, so it runs on the shard as is. Attention swaps the split: an all-to-all turns
(all heads, my tokens) into (my heads, all tokens), attention runs over the full sequence for 1/sp of the heads,
and a second all-to-all turns it back. Requires the query and key/value head counts to be divisible by sp.

The attention function is registered with transformers' public `AttentionInterface` as "ulysses_sdpa". Outside a
sharded forward (`sp_context`) it is plain SDPA, so evaluation and generation are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "ulysses_sdpa"


@dataclass
class _Shard:
    group: dist.ProcessGroup
    mask: torch.Tensor | None  # block-diagonal causal mask over the full (packed) sequence, or None for plain causal


_CURRENT: contextvars.ContextVar[_Shard | None] = contextvars.ContextVar("longctx_sp", default=None)


@contextlib.contextmanager
def sp_context(group, full_position_ids: torch.Tensor | None):
    """Attention inside this context is sequence-parallel over `group`; packed rows need their full position ids."""
    mask = None if full_position_ids is None else packed_causal_mask(full_position_ids)
    token = _CURRENT.set(_Shard(group, mask))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[1, 1, S, S] boolean mask: causal, and a token sees only its own sequence (a new one starts where the
    position does not continue by +1), the rule transformers applies to packed rows."""
    pos = position_ids[0]
    seq = torch.cat([pos.new_zeros(1), (pos[1:] - pos[:-1] != 1).long()]).cumsum(0)
    idx = torch.arange(pos.numel(), device=pos.device)
    mask = (seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :])
    return mask[None, None]


def _all_to_all(x: torch.Tensor, group, split_dim: int, cat_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(world, dim=split_dim)]
    outputs = [torch.empty_like(t) for t in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=cat_dim)


class _SeqToHeads(torch.autograd.Function):
    """[B, H, S/sp, D] (all heads, my tokens) -> [B, H/sp, S, D] (my heads, all tokens)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group, split_dim=1, cat_dim=2)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, split_dim=2, cat_dim=1), None


class _HeadsToSeq(torch.autograd.Function):
    """[B, H/sp, S, D] -> [B, H, S/sp, D]; the inverse of `_SeqToHeads`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group, split_dim=2, cat_dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, split_dim=1, cat_dim=2), None


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _GatherSeq(torch.autograd.Function):
    """All-gather shards along dim 1. The loss computed from the gathered tensor is the same on every rank of the
    group, so the gradient of a rank's shard is its own slice (no reduction)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.size = group, x.shape[1]
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad[:, rank * ctx.size : (rank + 1) * ctx.size].contiguous(), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    if x.dtype == torch.bool:  # not every backend gathers bool tensors
        return _gather(x.to(torch.uint8), group).bool()
    return _GatherSeq.apply(x, group) if x.requires_grad else _gather(x, group)


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    shard = _CURRENT.get()
    if shard is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q, k, v = (_SeqToHeads.apply(t, shard.group) for t in (query, key, value))
    out, _ = sdpa_attention_forward(module, q, k, v, shard.mask, is_causal=shard.mask is None,
                                    dropout=kwargs.get("dropout", 0.0), scaling=kwargs.get("scaling"))
    out = _HeadsToSeq.apply(out.transpose(1, 2), shard.group)  # sdpa returns [B, S, H/sp, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, ulysses_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # outside SP, masks are built exactly as for sdpa


def check_heads(config, sp: int) -> None:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp or kv % sp:
        raise ValueError(f"sequence_parallel_size {sp} must divide the attention heads ({heads}) and key/value "
                         f"heads ({kv}) of the model")

"""Attention for long rows: per-sequence SDPA for packed rows, and Ulysses sequence parallelism on DeepSpeed's
`UlyssesSPAttentionHF` (ALST), under DDP or DeepSpeed ZeRO (gloo on CPU, NCCL on GPU).

Each rank of a sequence-parallel (SP) group holds a contiguous shard of every sequence. Everything in a decoder
layer except attention is token-wise, so it runs on the shard as is. Attention swaps the split: DeepSpeed's
all-to-all turns (all heads, my tokens) into (my heads, all tokens), our core runs causal SDPA over the full sequence
for 1/sp of the heads (per packed sequence: DeepSpeed's own call drops the mask, and SDPA ignores position ids), and
a second all-to-all turns it back. Requires the query and key/value head counts to be divisible by sp.

The attention function is registered with transformers' public `AttentionInterface` as "longctx_sdpa" (DeepSpeed's
route through accelerate would instead replace the process-wide "sdpa" entry). Outside a long-context forward
(`layout_context`) it is plain SDPA, so evaluation and generation are unchanged.
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

ATTN_IMPLEMENTATION = "longctx_sdpa"


@dataclass
class _Layout:
    group: dist.ProcessGroup | None  # sequence-parallel group, or None: the whole sequence is local
    segments: list[tuple[int, int]] | None  # packed sequences of the full row as (start, end), or None: one sequence


_CURRENT: contextvars.ContextVar[_Layout | None] = contextvars.ContextVar("longctx_layout", default=None)


@contextlib.contextmanager
def layout_context(group, full_position_ids: torch.Tensor | None):
    """Yields the `longctx_layout` keyword to pass to the model: attention then runs sequence-parallel over `group`
    (if any) and, for one packed row with its full position ids, causal SDPA on each packed sequence separately (no
    [T, T] mask; flash kernels stay usable). The keyword travels with the layer inputs, so activation checkpointing
    recomputes the same attention in backward; the context itself only stops transformers from building a mask."""
    layout = _Layout(group, None if full_position_ids is None else segments(full_position_ids))
    token = _CURRENT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """(start, end) of each packed sequence of a [1, T] row: a new one starts where the position does not continue
    by +1 (transformers' rule for packed rows). None for a single sequence."""
    pos = position_ids[0]
    starts = [0] + ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()
    if len(starts) == 1:
        return None
    return list(zip(starts, starts[1:] + [pos.numel()]))


def _ulysses(group, module, query) -> "UlyssesSPAttentionHF":  # noqa: F821
    """DeepSpeed's Ulysses attention (ALST) for this group, batch size and head layout: its all-to-alls swap (all
    heads, my tokens) <-> (my heads, all tokens) and gather the position ids; the attention itself between them is
    ours (`_core`), because DeepSpeed's drops the mask and SDPA would then attend across packed sequences."""
    key = (group.group_name, query.shape[0], module.config.num_attention_heads, module.config.num_key_value_heads,
           query.shape[-1])
    if key not in _ULYSSES:
        import deepspeed.comm
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        if not deepspeed.comm.is_initialized():  # DDP runs: DeepSpeed's collectives on the existing process group
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        _ULYSSES[key] = UlyssesSPAttentionHF(
            attn=_core, batch_size=key[1], attn_head_count=key[2], kv_head_count=key[3], attn_head_size=key[4],
            num_hidden_layers=module.config.num_hidden_layers, process_group=group, seq_length_is_variable=True)
    return _ULYSSES[key]


_ULYSSES: dict = {}


def _core(module, q, k, v, attention_mask, *, longctx_layout, position_ids=None, **kwargs):
    """Causal SDPA over the full sequence for this rank's heads (DeepSpeed passes the gathered position ids; the
    packed sequences' spans are already in the layout)."""
    return _causal(module, q, k, v, longctx_layout.segments, **kwargs), None


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


def _causal(module, q, k, v, spans, **kwargs):
    if spans is None:
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
    return torch.cat([sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None,
                                             is_causal=True, **kwargs)[0] for a, b in spans], dim=1)


def longctx_attention(module, query, key, value, attention_mask, **kwargs):
    layout = kwargs.pop("longctx_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kept = {k: kwargs[k] for k in ("dropout", "scaling") if k in kwargs}
    if layout.group is None:
        return _causal(module, query, key, value, layout.segments, **kept), None
    out, _ = _ulysses(layout.group, module, query)(module, query, key, value, None, longctx_layout=layout,
                                                    position_ids=kwargs["position_ids"], **kept)
    return out.view(*out.shape[:2], -1, query.shape[-1]), None  # [B, S/sp, H, D], like every attention function


def _mask(*args, **kwargs):
    # A long-context forward needs no mask (attention is causal per sequence); elsewhere: exactly sdpa's.
    return None if _CURRENT.get() is not None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, longctx_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)


def check_heads(config, sp: int) -> None:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp or kv % sp:
        raise ValueError(f"sequence_parallel_size {sp} must divide the attention heads ({heads}) and key/value "
                         f"heads ({kv}) of the model")

"""Padding-free packing and sequence sharding around TRL's fused LM head, for SFT and DPO alike.

Both TRL trainers score tokens through `model(..., labels=labels, fused_lm_head=True)` (added by TRL's
`add_fused_lm_head`), which returns per-token log-probs of shape [rows, seq_len - 1]. `wrap_fused_forward` puts a
layer around that call which, for the model, (1) packs the right-padded rows into one row with `position_ids` and no
attention mask (transformers then builds a block-diagonal causal mask, or flash-attention goes varlen), and/or
(2) shards that row along the sequence across a sequence-parallel group and gathers the per-token outputs back;
then it returns the outputs in exactly the padded layout the trainer asked for. So TRL's DPO loss, reference
log-probs and metrics run unchanged on exact per-sequence log-probs, whatever the layout inside.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from trl.trainer.utils import FusedCausalLMOutput

from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION, gather_seq, layout_context

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Varlen flash-attention metadata of TRL's padding-free SFT collator: describes the unsharded row only.
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def wrap_fused_forward(model, *, pack: bool, sp_group=None, sp_active=lambda: True) -> None:
    """Wrap `model.forward` (already patched by TRL's `add_fused_lm_head`). `pack`: run right-padded rows packed.
    `sp_group`: shard across this process group while `sp_active()` (every rank of the group holds the same batch)."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, fused_lm_head=False, **kwargs):
        sharded = sp_group is not None and sp_active()
        if not fused_lm_head or args or not (pack or sharded):
            return inner(*args, fused_lm_head=fused_lm_head, **kwargs)
        # Our attention (per-sequence SDPA, Ulysses) needs the layout; flash-attention reads packing from position_ids.
        ours = model.config._attn_implementation == ATTN_IMPLEMENTATION
        return _long_forward(inner, pack=pack, group=sp_group if sharded else None, ours=ours, **kwargs)

    model.forward = forward


def pack_rows(input_ids, attention_mask, labels):
    """Right-padded rows -> one row of real tokens. Returns (ids, position_ids, labels, starts, lengths); the first
    token of every sequence gets label -100, so no sequence is scored on its predecessor's last token."""
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(input_ids.shape[1], device=lengths.device) < lengths[:, None]):
        raise ValueError("padding-free packing needs right-padded rows (attention_mask = ones then zeros)")
    keep = attention_mask.bool()
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)[keep]
    packed_labels = labels[keep].clone()
    packed_labels[starts] = -100
    return input_ids[keep][None], position_ids[None], packed_labels[None], starts, lengths


def unpack(field: torch.Tensor, starts, lengths, width: int) -> torch.Tensor:
    """Packed per-token outputs [1, T] (position p scores token p+1) -> padded [rows, width - 1] (TRL's layout)."""
    j = torch.arange(width - 1, device=field.device)
    valid = j[None] < (lengths[:, None] - 1)
    index = (starts[:, None] + j[None]).clamp(max=field.shape[1] - 1)
    out = field[0][index]
    return out.masked_fill(~valid, 0) if out.dtype != torch.bool else out & valid


def _long_forward(inner, *, pack, group, ours, input_ids, labels, attention_mask=None, position_ids=None,
                  shift_labels=None, num_items_in_batch=None, **kwargs):
    if shift_labels is not None:
        raise ValueError("long-context forward: pre-shifted `shift_labels` are not supported (pass `labels`)")
    if group is not None:
        if not ours:
            raise ValueError(f"sequence parallelism needs attn_implementation '{ATTN_IMPLEMENTATION}'")
        for key in _VARLEN_KEYS:
            kwargs.pop(key, None)
    rows, width = input_ids.shape
    layout = None
    if pack and attention_mask is not None:
        ids, pos, lab, starts, lengths = pack_rows(input_ids, attention_mask, labels)
        layout = (starts, lengths)
    else:  # already one packed row (TRL's padding-free SFT), or right-padded rows run as they are
        if attention_mask is not None and group is not None:
            lengths = attention_mask.sum(1)
            if not torch.equal(attention_mask.bool(), torch.arange(width, device=lengths.device) < lengths[:, None]):
                raise ValueError("sequence parallelism needs right-padded rows (attention_mask = ones then zeros)")
        # Right padding needs no mask under causal attention: real tokens never attend to the pads after them.
        ids, lab = input_ids, labels
        pos = position_ids if position_ids is not None else \
            torch.arange(width, device=input_ids.device).expand(rows, -1)
        if group is None and attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
    shift = F.pad(lab[:, 1:], (0, 1), value=-100)  # position p is scored on token p+1

    one_row = layout is not None or (attention_mask is None and rows == 1)
    if group is None:
        with layout_context(None, pos if one_row else None) if ours else contextlib.nullcontext() as attn_layout:
            if ours:
                kwargs["longctx_layout"] = attn_layout
            out = inner(input_ids=ids, position_ids=pos, shift_labels=shift, fused_lm_head=True, **kwargs)
        fields = {name: getattr(out, name) for name in FIELDS}
    else:
        if not one_row and position_ids is not None and \
                not torch.equal(pos, torch.arange(width, device=pos.device).expand(rows, -1)):
            raise ValueError("sequence parallelism: several packed rows per batch are not supported (use one row)")
        sp, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        length = ids.shape[1]
        pad = -length % sp
        if pad:  # pad tokens continue the last sequence's positions; they come last, so nothing attends to them
            ids = F.pad(ids, (0, pad), value=0)
            pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)], 1)
            shift = F.pad(shift, (0, pad), value=-100)
        size = ids.shape[1] // sp
        part = slice(rank * size, (rank + 1) * size)
        with layout_context(group, pos if one_row else None) as attn_layout:
            out = inner(input_ids=ids[:, part], position_ids=pos[:, part], shift_labels=shift[:, part],
                        fused_lm_head=True, longctx_layout=attn_layout, **kwargs)
        fields = {name: None if getattr(out, name) is None else gather_seq(getattr(out, name), group)[:, :length]
                  for name in FIELDS}

    if layout is not None:
        fields = {k: None if v is None else unpack(v, *layout, width) for k, v in fields.items()}
    else:
        fields = {k: None if v is None else v[:, : width - 1] for k, v in fields.items()}
    label_mask = labels[:, 1:] != -100
    denominator = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / denominator, label_mask=label_mask, **fields)

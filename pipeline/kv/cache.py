"""Head-level KV compression that really frees memory.

`HeadKVCache` is a transformers `Cache` whose layers keep, per layer, two separate pairs of tensors:
full K/V for the selected KV heads `[B, n_full, T, d]` and only `sink` first + `window` most recent
positions for the other ("streaming") heads `[B, n_stream, <= sink + window, d]`. Nothing is kept
for the dropped positions, so the bytes shrink as the formula says (`expected_bytes`).

A layer's `update` returns a `HeadwiseKV` (not a plain tensor) that the attention function registered
here as "kv_headwise" understands: full heads attend with the model's mask, streaming heads with the
mask restricted to their kept positions. `use_headwise_attention(model)` switches a model to it; with
no `HeadKVCache` (training, a plain DynamicCache) the function is ordinary causal SDPA.

Prefill (the prompt's forward pass) has two modes:
  - "full": every head attends to the whole prompt, then the streaming heads evict (kvpress, and the
    way DuoAttention's released code serves prompts that fit in memory);
  - "local": streaming heads see only the sink + window for every query, also inside the prompt.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "kv_headwise"


class HeadwiseKV(NamedTuple):
    full_k: torch.Tensor  # [B, n_full, T, d]
    full_v: torch.Tensor
    stream_k: torch.Tensor  # [B, n_stream, L, d], L = kept positions (all of the prompt during prefill)
    stream_v: torch.Tensor
    stream_pos: torch.Tensor  # [B, L] cache slot of each streaming key (column in the attention mask)
    stream_ok: torch.Tensor  # [B, L] False for a sink slot not filled yet or a window key that is also a sink
    layer: "HeadKVLayer"  # evicts once the attention knows each row's first real token (`evict`)
    full_heads: tuple[int, ...]
    stream_heads: tuple[int, ...]
    sink: int
    window: int
    local: bool  # streaming heads restricted to sink + window for every query (not only after eviction)

    @property
    def shape(self):  # reached only when another attention function gets these keys
        raise TypeError(f"HeadKVCache needs the '{ATTN_NAME}' attention: call "
                        "pipeline.kv.cache.use_headwise_attention(model) first")


class HeadKVLayer(CacheLayerMixin):
    """One layer: full K/V for `full_heads`, sink + recent window for the other KV heads."""

    is_sliding = False
    is_compileable = False

    def __init__(self, num_kv_heads: int, full_heads, sink: int, window: int, prefill: str = "full"):
        super().__init__()
        if prefill not in ("full", "local"):
            raise ValueError(f"prefill must be 'full' or 'local', got {prefill!r}")
        if sink < 0 or window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink} window={window}")
        self.full_heads = tuple(sorted(set(int(h) for h in full_heads)))
        if any(h < 0 or h >= num_kv_heads for h in self.full_heads):
            raise ValueError(f"full heads {self.full_heads} out of range for {num_kv_heads} KV heads")
        self.stream_heads = tuple(h for h in range(num_kv_heads) if h not in self.full_heads)
        self.sink, self.window, self.local = sink, window, prefill == "local"
        self.seen = 0  # tokens seen so far = cache slots
        self.first = None  # [B] each row's first real slot (left padding), set by the first attention call
        self._pending = None  # this step's new streaming keys, evicted after its attention
        self._sinks_done = False

    def lazy_initialization(self, key_states, value_states):
        b, _, _, d = key_states.shape
        dev, dt = key_states.device, key_states.dtype
        nf, ns = len(self.full_heads), len(self.stream_heads)
        self.full_k = key_states.new_zeros((b, nf, 0, d))
        self.full_v = value_states.new_zeros((b, nf, 0, d))
        self.sink_k = key_states.new_zeros((b, ns, 0, d))
        self.sink_v = value_states.new_zeros((b, ns, 0, d))
        self.recent_k = key_states.new_zeros((b, ns, 0, d))
        self.recent_v = value_states.new_zeros((b, ns, 0, d))
        self._fidx = torch.tensor(self.full_heads, device=dev, dtype=torch.long)
        self._sidx = torch.tensor(self.stream_heads, device=dev, dtype=torch.long)
        self.dtype, self.device = dt, dev
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:  # the attention of the last step did not run (a direct `update` call)
            self.evict(None)
        b, q = key_states.shape[0], key_states.shape[-2]
        start = self.seen
        self.seen += q
        new_fk, new_fv = key_states.index_select(1, self._fidx), value_states.index_select(1, self._fidx)
        new_sk, new_sv = key_states.index_select(1, self._sidx), value_states.index_select(1, self._sidx)
        self.full_k = torch.cat([self.full_k, new_fk], dim=-2)
        self.full_v = torch.cat([self.full_v, new_fv], dim=-2)

        # Keys the streaming heads attend to in this step: what is kept plus all new tokens. A row's sinks are
        # its first `sink` real tokens (left padding shifts them), so their slots differ by row.
        dev = key_states.device
        n_sink, n_rec = self.sink_k.shape[-2], self.recent_k.shape[-2]
        first = self.first if self.first is not None else torch.zeros(b, dtype=torch.long, device=dev)
        sink_pos = first[:, None] + torch.arange(n_sink, device=dev)
        rec_pos = torch.arange(start - n_rec, start, device=dev).expand(b, -1)
        pos = torch.cat([sink_pos, rec_pos, torch.arange(start, start + q, device=dev).expand(b, -1)], dim=-1)
        ok = torch.cat([sink_pos < start, (rec_pos < first[:, None]) | (rec_pos >= first[:, None] + n_sink),
                        torch.ones((b, q), dtype=torch.bool, device=dev)], dim=-1)
        att_k = torch.cat([self.sink_k, self.recent_k, new_sk], dim=-2)
        att_v = torch.cat([self.sink_v, self.recent_v, new_sv], dim=-2)
        self._pending = (new_sk, new_sv, start)
        kv = HeadwiseKV(self.full_k, self.full_v, att_k, att_v, pos, ok, self, self.full_heads, self.stream_heads,
                        self.sink, self.window, self.local)
        return kv, None

    def evict(self, first: torch.Tensor | None) -> None:
        """After this step's attention: keep each row's sinks (slot j of row b holds position first[b] + j) and
        the last `window` positions from `sink` on. `first` ([B], from the attention mask) is taken once."""
        new_sk, new_sv, start = self._pending
        self._pending = None
        b, ns, q, d = new_sk.shape
        if self.first is None:
            self.first = first if first is not None else torch.zeros(b, dtype=torch.long, device=new_sk.device)
        n_sink, n_rec = self.sink_k.shape[-2], self.recent_k.shape[-2]
        size = min(self.sink, start + q)
        if not self._sinks_done and size > 0:
            want = self.first[:, None] + torch.arange(size, device=new_sk.device)  # [B, size]
            hit = ((want >= start) & (want < start + q))[:, None, :, None]
            idx = (want - start).clamp(0, q - 1)[:, None, :, None].expand(b, ns, size, d)
            pad = new_sk.new_zeros((b, ns, size - n_sink, d))
            self.sink_k = torch.where(hit, new_sk.gather(2, idx), torch.cat([self.sink_k, pad], dim=-2))
            self.sink_v = torch.where(hit, new_sv.gather(2, idx), torch.cat([self.sink_v, pad], dim=-2))
            if size == self.sink:  # one host sync per layer until every row's sinks are in
                self._sinks_done = bool((want[:, -1] < start + q).all())
        # `cat` copies, so the stored window is a fresh tensor of at most `window` positions: it never pins
        # the prompt-sized tensors it was cut from.
        rest = q - max(min(self.sink - start, q), 0)  # new positions from `sink` on
        old_keep = max(0, min(n_rec, self.window - rest))
        self.recent_k = torch.cat([self.recent_k[..., n_rec - old_keep:, :], new_sk[..., q - min(rest, self.window):, :]], -2)
        self.recent_v = torch.cat([self.recent_v[..., n_rec - old_keep:, :], new_sv[..., q - min(rest, self.window):, :]], -2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_initialized:
            return []
        return [self.full_k, self.full_v, self.sink_k, self.sink_v, self.recent_k, self.recent_v]

    def reset(self) -> None:
        self.is_initialized = False
        self.seen, self.first, self._pending, self._sinks_done = 0, None, None, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("full_k", "full_v", "sink_k", "sink_v", "recent_k", "recent_v", "first"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("full_k", "full_v", "sink_k", "sink_v", "recent_k", "recent_v", "first"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t[indices])


class HeadKVCache(Cache):
    """`full_heads[l]` = KV heads of layer l kept whole; every other KV head keeps `sink` + `window` tokens."""

    def __init__(self, config, full_heads: dict[int, list[int]] | list[list[int]], sink: int = 4,
                 window: int = 64, prefill: str = "full"):
        n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
        if isinstance(full_heads, dict):
            full_heads = [list(full_heads.get(l, [])) for l in range(n_layers)]
        if len(full_heads) != n_layers:
            raise ValueError(f"full_heads has {len(full_heads)} layers, the model {n_layers}")
        super().__init__(layers=[HeadKVLayer(n_kv, h, sink, window, prefill) for h in full_heads])
        self.sink, self.window, self.prefill = sink, window, prefill

    def nbytes(self) -> int:
        """Bytes held by the cache's K/V tensors right now (measured, not computed)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


def expected_bytes(config, full_heads: list[list[int]], seq_len: int, batch_size: int, sink: int, window: int,
                   dtype=torch.float32) -> int:
    """K and V bytes: full heads hold T positions, the others min(T, sink + window)."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    el = torch.tensor([], dtype=dtype).element_size()
    n_full = sum(len(set(h)) for h in full_heads)
    n_stream = config.num_hidden_layers * config.num_key_value_heads - n_full
    kept = min(seq_len, sink + window)
    return 2 * batch_size * d * el * (n_full * seq_len + n_stream * kept)


def kv_ratio(full_fraction: float, seq_len: int, sink: int, window: int) -> float:
    """kept / full = r + (1 - r) * min(1, (sink + window) / T)."""
    return full_fraction + (1 - full_fraction) * min(1.0, (sink + window) / seq_len)


def headwise_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for `HeadwiseKV` keys; plain causal SDPA for plain tensors. Returns [B, q, H, d]."""
    groups = query.shape[1] // (key.full_k.shape[1] + key.stream_k.shape[1] if isinstance(key, HeadwiseKV)
                                else key.shape[1])
    if not isinstance(key, HeadwiseKV):
        return _sdpa(query, key, value, attention_mask, groups, scaling), None
    kv = key
    b, n_q_heads, q_len, d = query.shape
    kv_len = kv.full_k.shape[-2]
    mask = attention_mask  # None only for a decode step without padding (see `_bool_mask`): nothing to mask
    if mask is None and q_len > 1:
        mask = torch.ones((b, 1, q_len, kv_len), dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    out = query.new_empty((b, n_q_heads, q_len, d))
    if kv.full_heads:
        qidx = _query_heads(kv.full_heads, groups, query.device)
        out[:, qidx] = _sdpa(query[:, qidx], kv.full_k, kv.full_v, mask, groups, scaling).transpose(1, 2)
    first = first_real(mask, b, query.device) if kv.layer.first is None else kv.layer.first
    if kv.stream_heads:
        pos, ok = kv.stream_pos, kv.stream_ok[:, None, None, :]  # [B, L], [B, 1, 1, L]
        if mask is None:
            smask = ok
        else:
            smask = mask.expand(b, 1, q_len, kv_len).gather(-1, pos[:, None, None, :].expand(b, 1, q_len, -1)) & ok
        if kv.local:  # every query sees only its row's sinks and its own recent window
            q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, None, :, None]
            k_pos, lo = pos[:, None, None, :], first[:, None, None, None]
            smask = smask & ((q_pos - k_pos < kv.window) | ((k_pos >= lo) & (k_pos < lo + kv.sink)))
        qidx = _query_heads(kv.stream_heads, groups, query.device)
        out[:, qidx] = _sdpa(query[:, qidx], kv.stream_k, kv.stream_v, smask, groups, scaling).transpose(1, 2)
    kv.layer.evict(first)
    return out.transpose(1, 2).contiguous(), None


def first_real(mask, b: int, device=None) -> torch.Tensor:
    """[B] the first key each row may attend to (its left padding), from a boolean [B or 1, 1, q, kv] mask; zeros
    without a mask (no padding)."""
    if mask is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    return mask[:, 0, -1].expand(b, -1).int().argmax(-1)


@functools.lru_cache(maxsize=256)
def _query_heads(kv_heads: tuple[int, ...], groups: int, device) -> torch.Tensor:
    return torch.tensor([h * groups + g for h in kv_heads for g in range(groups)], device=device)


def _sdpa(query, key, value, mask, groups: int, scaling) -> torch.Tensor:
    # enable_gqa: SDPA broadcasts a KV head over its query group without copying K/V (repeat_interleave
    # would copy the whole cache every decode step).
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1,
                                         is_causal=mask is None and query.shape[-2] > 1)
    return out.transpose(1, 2).contiguous()


def _bool_mask(*args, **kwargs):
    # A boolean [B, 1, q, kv] mask (the streaming heads slice its columns), except for a decode step without
    # padding: there transformers' own once-per-step check returns None, so no layer has to look at a mask
    # (reading a GPU mask's values per layer would stall the host every step).
    q_length = kwargs["q_length"] if "q_length" in kwargs else args[1]
    kwargs["allow_is_causal_skip"] = q_length == 1
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_NAME, headwise_attention)
AttentionMaskInterface.register(ATTN_NAME, _bool_mask)


def use_headwise_attention(model):
    """Switch `model` to the attention that understands `HeadKVCache` (plain SDPA otherwise)."""
    model.set_attn_implementation(ATTN_NAME)
    return model

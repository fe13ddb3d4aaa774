"""Train a model for the head-level KV cache it will be served with.

`HeadKVCache(prefill="local")` keeps full K/V for a few retrieval heads and, for every other KV head, only the
first `sink` and the last `window` positions, for every query. A model fine-tuned with full attention everywhere
is free to spread its long-range reads over any head, and fine-tuning does (docs/kv.md: after SFT a head with a
Wu score of 0 carries the needle). `use_streaming_heads(model, full_heads, sink, window)` makes training see
exactly the attention the cache serves: the listed heads attend causally to everything, the others to their sinks
and recent window, so whatever the model learns to fetch from far away it learns to fetch through the heads
whose K/V the cache keeps (the streaming heads of DuoAttention, trained into the weights instead of gated).

The attention is registered with transformers' `AttentionInterface` and set on the model explicitly (the SFT / DPO
recipe switch `streaming_heads`). The model then declares it: `config.streaming_heads` (full heads by layer, sink,
window) is saved in its config.json, and the pipeline's loaders serve a model that declares it with the attention it
was trained for (`use_declared_attention`; full attention on such a model reads positions it never learnt to weigh:
measured in docs/kv.md). Generation with a plain cache gives the same pattern, so a model evaluated under it scores
what `HeadKVCache(prefill="local")` serves, at a fraction of the KV bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from pipeline.kv.cache import _bool_mask, first_real
from pipeline.kv.detect import heads_by_layer, load_registry, top_heads

ATTN_NAME = "kv_streaming_heads"
logger = logging.getLogger(__name__)


def streaming_heads_attention(full_heads: list[list[int]], sink: int, window: int, weights: bool = False):
    """An attention function: KV heads `full_heads[layer]` attend causally to every position, the others to the
    first `sink` positions and the last `window` (their own included). Returns [B, q, H, d] like SDPA's, and with
    `weights` the attention probabilities too (as the eager attention does: retrieval-head detection reads them)."""
    full = [tuple(sorted(set(h))) for h in full_heads]
    last = {}  # the masks of the forward pass in progress: every layer gets the same attention_mask tensor

    def masks(attention_mask, b, q_len, kv_len, dev):
        if last.get("of") is not attention_mask or attention_mask is None:  # holding it keeps its id unique
            mask = attention_mask if attention_mask is not None else torch.ones(
                (b, 1, q_len, kv_len), dtype=torch.bool, device=dev).tril(kv_len - q_len)
            q_pos = torch.arange(kv_len - q_len, kv_len, device=dev)[:, None]
            k_pos = torch.arange(kv_len, device=dev)[None, :]
            # A row's sinks are its first `sink` real tokens: left padding (batched generation) shifts them.
            lo = first_real(mask, b, dev)[:, None, None, None]
            sinks = (k_pos >= lo) & (k_pos < lo + sink)
            last.update(of=attention_mask, mask=mask, local=mask & ((q_pos - k_pos < window) | sinks))
        return last["mask"], last["local"]

    @functools.cache
    def split_heads(heads: tuple, n_kv: int, groups: int, device, whole: bool):
        """(query head indices, KV head indices) of the full heads (`whole`) or of the streaming ones."""
        kv = torch.tensor([h for h in range(n_kv) if (h in heads) == whole], device=device)
        return (kv[:, None] * groups + torch.arange(groups, device=device)).flatten(), kv

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, n_q, q_len, _ = query.shape
        n_kv, kv_len = key.shape[1], key.shape[-2]
        groups = n_q // n_kv
        mask, local = masks(attention_mask, b, q_len, kv_len, query.device)
        heads = full[module.layer_idx]
        if not heads:
            head_mask = local  # [B, 1, q, kv]
        elif len(heads) == n_kv:
            head_mask = mask
        elif not weights and q_len > 1:
            # Training and prefill: the full and the streaming heads as two SDPA calls, each with its [B, 1, q, kv]
            # mask. Building and reading a per-head [B, H, q, kv] mask made a demo SFT step 11-12% slower
            # (scripts/bench_streaming_attention.py); each head's result is bitwise the same without attention
            # dropout (tests/test_streaming_heads.py). One decoded token's mask is small: there the one call is faster.
            out = query.new_empty(query.shape)
            for q_idx, kv_idx, m in ((*split_heads(heads, n_kv, groups, query.device, True), mask),
                                     (*split_heads(heads, n_kv, groups, query.device, False), local)):
                out[:, q_idx] = F.scaled_dot_product_attention(
                    query[:, q_idx], key[:, kv_idx], value[:, kv_idx], attn_mask=m, scale=scaling,
                    dropout_p=dropout if module.training else 0.0, enable_gqa=groups > 1)
            return out.transpose(1, 2).contiguous(), None
        else:
            is_full = torch.zeros(n_q, dtype=torch.bool, device=query.device)
            for h in heads:
                is_full[h * groups:(h + 1) * groups] = True
            head_mask = torch.where(is_full[None, :, None, None], mask, local)  # [B, H, q, kv]
        if weights:
            k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
            scores = (query @ k.transpose(-1, -2)) * (scaling or 1 / math.sqrt(query.shape[-1]))
            probs = scores.masked_fill(~head_mask, float("-inf")).softmax(-1)
            return (probs @ v).transpose(1, 2).contiguous(), probs
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=head_mask, scale=scaling,
                                             dropout_p=dropout if module.training else 0.0, enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None

    return attention


def registry_heads(path, model, k: int) -> list[list[int]]:
    """The top `k` KV heads of a retrieval-head registry, by layer. The registry may come from the model this one
    is fine-tuned from (its shape is checked, not its weights)."""
    reg = load_registry(path, model, same_weights=False)
    n_kv = model.config.num_hidden_layers * model.config.num_key_value_heads
    if not 0 <= k <= n_kv:
        raise ValueError(f"{k} full heads is not in [0, {n_kv}]")
    return heads_by_layer(top_heads(reg["kv_scores"], k), model.config.num_hidden_layers)


def use_streaming_heads(model, full_heads: list[list[int]], sink: int, window: int, weights: bool = False,
                        registry: str | None = None):
    """Switch `model` to the streaming-heads attention (training and generation with a plain cache) and record it
    in `model.config.streaming_heads`, so that the saved model declares it."""
    cfg = model.config
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink} window={window}")
    if len(full_heads) != cfg.num_hidden_layers or any(h < 0 or h >= cfg.num_key_value_heads
                                                         for row in full_heads for h in row):
        raise ValueError(f"full_heads {full_heads} do not fit the model's {cfg.num_hidden_layers} layers x "
                         f"{cfg.num_key_value_heads} KV heads")
    spec = {"full_heads": [sorted(set(int(h) for h in row)) for row in full_heads], "sink": sink, "window": window}
    # One registered name per head set: two models with different heads can live in one process.
    key = hashlib.sha1(json.dumps([spec, weights]).encode()).hexdigest()[:10]
    name = f"{ATTN_NAME}_{key}"
    AttentionInterface.register(name, streaming_heads_attention(spec["full_heads"], sink, window, weights))
    AttentionMaskInterface.register(name, _bool_mask)
    model.set_attn_implementation(name)
    previous = getattr(cfg, "streaming_heads", None) or {}
    cfg.streaming_heads = {**spec, "registry": registry or previous.get("registry")}
    return model


def is_streaming(model) -> bool:
    return str(model.config._attn_implementation).startswith(ATTN_NAME)


def use_declared_attention(model, weights: bool = False) -> bool:
    """Serve a model that declares streaming heads (`config.streaming_heads`, written by a `streaming_heads`
    training) with the attention it was trained for. Returns whether it declares them."""
    spec = getattr(model.config, "streaming_heads", None)
    if not spec:
        return False
    use_streaming_heads(model, spec["full_heads"], spec["sink"], spec["window"], weights=weights,
                        registry=spec.get("registry"))
    logger.info("the model declares streaming heads: %s whole, sink %d + window %d for the rest",
                describe(spec["full_heads"]), spec["sink"], spec["window"])
    return True


def describe(full_heads: list[list[int]]) -> str:
    return " ".join(f"L{layer}H{h}" for layer, row in enumerate(full_heads) for h in row) or "no heads"

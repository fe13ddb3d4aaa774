"""DuoAttention-style head selection: one gate per KV head, optimised with the model frozen.

Each head's attention output is alpha * full + (1 - alpha) * streaming (sink + recent window, the
same budget the cache will use); the loss is the MSE between the final hidden states of the full
model and the gated one, plus `l1` * mean(alpha), which pushes every gate that is not needed to 0.
The gates that stay high mark the heads whose long-range reads matter: those keep full K/V.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from pipeline.kv.cache import _bool_mask

logger = logging.getLogger(__name__)
GATE_ATTN = "kv_gate"


def _gated_attention_factory(gates: torch.Tensor, sink: int, window: int):
    def gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, n_q, q_len, _ = query.shape
        groups = n_q // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        kv_len = key.shape[-2]
        mask = attention_mask if attention_mask is not None else torch.ones(
            (b, 1, q_len, kv_len), dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        k_pos = torch.arange(kv_len, device=query.device)[None, :]
        local = mask & ((q_pos - k_pos < window) | (k_pos < sink))
        full = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        stream = F.scaled_dot_product_attention(query, key, value, attn_mask=local, scale=scaling)
        a = gates[module.layer_idx].clamp(0, 1).repeat_interleave(groups)[None, :, None, None]
        return (a * full + (1 - a) * stream).transpose(1, 2).contiguous(), None
    return gated_attention


def optimise_gates(model, batches, sink: int, window: int, steps: int = 60, lr: float = 0.05, l1: float = 0.05,
                   seed: int = 0) -> tuple[list[list[float]], list[dict]]:
    """`batches`: a list of (input_ids, attention_mask) to cycle through. Returns (gates [L][kv_heads], log)."""
    torch.manual_seed(seed)
    cfg = model.config
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    original = cfg._attn_implementation
    targets = []
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for ids, mask in batches:
            targets.append(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1])
    gates = torch.nn.Parameter(torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads))
    AttentionInterface.register(GATE_ATTN, _gated_attention_factory(gates, sink, window))
    AttentionMaskInterface.register(GATE_ATTN, _bool_mask)
    model.set_attn_implementation(GATE_ATTN)
    opt = torch.optim.Adam([gates], lr=lr)
    log = []
    rng = random.Random(seed)
    order = list(range(len(batches)))
    try:
        for step in range(steps):
            if step % len(order) == 0:
                rng.shuffle(order)
            i = order[step % len(order)]
            ids, mask = batches[i]
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            keep = mask.bool()
            distill = F.mse_loss(h[keep], targets[i][keep])
            loss = distill + l1 * gates.clamp(0, 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
            if step % 10 == 0 or step == steps - 1:
                log.append({"step": step, "distill": distill.item(), "mean_gate": gates.mean().item()})
                logger.info("gate step %d distill %.5f mean gate %.3f", step, distill.item(), gates.mean().item())
    finally:
        model.set_attn_implementation(original)
    return gates.detach().tolist(), log

"""Streaming-heads attention in training: the layer's full and streaming heads as two SDPA calls (what
`pipeline.kv.streaming_heads` runs) against one call with a per-head [B, H, q, kv] mask (what it ran before), on the
demo base with its declared heads (top-4 Wu heads, sink 16, window 64): seconds per forward + backward of one demo SFT
batch (16 x 448 tokens), one thread, the two alternated; logits and gradients must be bitwise equal.

    OMP_NUM_THREADS=1 python scripts/bench_streaming_attention.py    # -> benchmarks/streaming_attention.{json,png}
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.kv.cache import _bool_mask, first_real  # noqa: E402
from pipeline.kv.streaming_heads import registry_heads, streaming_heads_attention, use_streaming_heads  # noqa: E402


def per_head_mask_attention(full_heads, sink, window):
    """The one-call baseline: a layer with both kinds of heads gets the two masks merged into a per-head
    [B, H, q, kv] mask; every other layer runs the pipeline's own attention (no difference there)."""
    streaming = streaming_heads_attention(full_heads, sink, window)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        heads = full_heads[module.layer_idx]
        if not heads or len(heads) == key.shape[1]:
            return streaming(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        (b, n_q, q_len, _), kv_len = query.shape, key.shape[2]
        groups = n_q // key.shape[1]
        mask = attention_mask
        q_pos, k_pos = torch.arange(kv_len - q_len, kv_len)[:, None], torch.arange(kv_len)[None, :]
        lo = first_real(mask, b, query.device)[:, None, None, None]
        local = mask & ((q_pos - k_pos < window) | ((k_pos >= lo) & (k_pos < lo + sink)))
        is_full = torch.tensor([h // groups in heads for h in range(n_q)])
        head_mask = torch.where(is_full[None, :, None, None], mask, local)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=head_mask, scale=scaling,
                                             enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None

    return attention


def main() -> None:
    torch.manual_seed(0)
    base = ROOT / "data/models/demo-base"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (16, 448), generator=g)
    am = torch.ones_like(ids)
    for i in range(8, 16):  # right padding, as the SFT collator pads: half the rows shorter
        am[i, 100 + 40 * (i - 8):] = 0
    models = {}
    for name in ("two calls", "per-head mask"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        heads = registry_heads(base / "retrieval_heads.json", model, 4)
        use_streaming_heads(model, heads, 16, 64)
        if name == "per-head mask":
            AttentionInterface.register("bench_per_head_mask", per_head_mask_attention(
                [tuple(h) for h in heads], 16, 64))
            AttentionMaskInterface.register("bench_per_head_mask", _bool_mask)
            model.set_attn_implementation("bench_per_head_mask")
        models[name] = model.train()

    def step(model):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100))
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (la, ga), (lb, gb) = step(models["two calls"]), step(models["per-head mask"])
    equal = torch.equal(la, lb) and all(torch.equal(ga[k], gb[k]) for k in ga)
    times = {name: [] for name in models}
    for _ in range(6):
        for name, model in models.items():
            t = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t)
    summary = {name: {"median_s": statistics.median(ts), "runs_s": [round(t, 4) for t in ts]}
               for name, ts in times.items()}
    speedup = summary["per-head mask"]["median_s"] / summary["two calls"]["median_s"]
    result = {"command": "OMP_NUM_THREADS=1 python scripts/bench_streaming_attention.py",
              "threads": torch.get_num_threads(), "batch": list(ids.shape), "bitwise_equal": equal,
              "seconds_per_step": summary, "speedup": round(speedup, 3)}
    out = ROOT / "benchmarks/streaming_attention"
    atomic_write_json(out.with_suffix(".json"), result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(summary), [v["median_s"] for v in summary.values()], color=["tab:green", "tab:gray"])
    ax.set_ylabel("s per forward + backward (median of 6)")
    ax.set_title(f"demo SFT batch 16 x 448, 1 thread: {speedup:.2f}x, bitwise equal: {equal}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(result)
    if not equal:
        sys.exit("the two attentions differ: see benchmarks/streaming_attention.json")


if __name__ == "__main__":
    main()

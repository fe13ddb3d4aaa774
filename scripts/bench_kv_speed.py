"""Decode speed vs context length, default cache vs `HeadKVCache`, on a randomly initialised wide Llama.

The tiny retrieval model (hidden 128) is bound by Python overhead, so its decode speed says nothing about
KV reads. Here the model is wide enough (default: hidden 1024, 16 query / 8 KV heads, 2 layers, small MLP
and vocab) that reading the KV cache dominates a decode step at 4k-16k tokens. Weights are random: only
the timing and the bytes matter, not the text.

Per context length T the cache is prefilled directly with random K/V of T positions (through the cache's
own `update`, so the compressed cache evicts exactly as after a real prefill; a real 16k prefill would take
minutes on one CPU thread), then `steps` single-token decode steps are timed. Configurations run
interleaved, `repeats` times each, and the report gives medians and ratios against the default cache
from the same run (the CPU is shared and noisy):
  - default: transformers `DynamicCache` with the model's SDPA attention;
  - headwise_all_full: `HeadKVCache` keeping every head whole (the cost of the two-path attention alone);
  - compressed: `HeadKVCache` keeping `full_fraction` of the KV heads whole, sink + window for the rest.
Measured cache bytes are asserted equal to `expected_bytes`.

    OMP_NUM_THREADS=1 python scripts/bench_kv_speed.py   # -> benchmarks/kv_speed.json, benchmarks/kv_speed.png
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.config import cli, parse  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.kv.cache import HeadKVCache, expected_bytes, use_headwise_attention  # noqa: E402

logger = logging.getLogger("bench_kv_speed")


@dataclasses.dataclass
class SpeedArgs:
    out: str = "benchmarks/kv_speed"
    hidden_size: int = 1024
    num_hidden_layers: int = 2
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    intermediate_size: int = 1024
    vocab_size: int = 1024
    lengths: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    full_fraction: float = 0.25
    sink: int = 4
    window: int = 60
    steps: int = 8
    repeats: int = 5
    seed: int = 0


def full_heads_for(cfg, fraction: float) -> list[list[int]]:
    """The first round(fraction * H) KV heads of every layer (which heads does not matter for speed)."""
    n = round(fraction * cfg.num_key_value_heads)
    return [list(range(n)) for _ in range(cfg.num_hidden_layers)]


def prefilled(make_cache, cfg, length: int, seed: int):
    cache = make_cache()
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, length, d, generator=g)
        cache.update(k, torch.randn(k.shape, generator=g), layer)
    return cache


def cache_bytes(cache) -> int:
    if isinstance(cache, HeadKVCache):
        return cache.nbytes()
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
               for l in cache.layers)


@torch.no_grad()
def time_decode(model, cache, steps: int) -> float:
    """Seconds per decode step (mean over `steps` single-token forwards that extend `cache`)."""
    ids = torch.zeros((1, 1), dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        ids = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (args,), _, _ = parse([SpeedArgs], argv, prog="scripts/bench_kv_speed.py")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                      num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                      intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                      max_position_embeddings=max(args.lengths) + args.steps + 8)
    model = LlamaForCausalLM(cfg).eval()
    L = cfg.num_hidden_layers
    compressed = full_heads_for(cfg, args.full_fraction)
    configs = {
        "default": ("sdpa", lambda: DynamicCache(config=cfg), [list(range(cfg.num_key_value_heads))] * L),
        "headwise_all_full": ("headwise", lambda: HeadKVCache(cfg, [list(range(cfg.num_key_value_heads))] * L,
                                                               args.sink, args.window), None),
        "compressed": ("headwise", lambda: HeadKVCache(cfg, compressed, args.sink, args.window), compressed),
    }
    configs["headwise_all_full"] = configs["headwise_all_full"][:2] + (configs["default"][2],)
    rows = []
    for length in args.lengths:
        times = {name: [] for name in configs}
        nbytes = {}
        for rep in range(args.repeats):  # interleaved: every repeat runs every configuration once
            for name, (attn, make, heads) in configs.items():
                if attn == "sdpa":
                    model.set_attn_implementation("sdpa")
                else:
                    use_headwise_attention(model)
                cache = prefilled(make, cfg, length, args.seed + rep)
                times[name].append(time_decode(model, cache, args.steps))
                t_len = length + args.steps
                nbytes[name] = cache_bytes(cache)
                sink, window = (0, t_len) if name != "compressed" else (args.sink, args.window)
                assert nbytes[name] == expected_bytes(cfg, heads, t_len, 1, sink, window), (name, nbytes[name])
                del cache
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"context": length, "decode_steps": args.steps, "repeats": args.repeats,
               "bytes": nbytes, "bytes_ratio": nbytes["compressed"] / nbytes["default"],
               "median_s_per_token": med, "tok_s": {n: 1 / t for n, t in med.items()},
               "speedup_vs_default": {n: med["default"] / t for n, t in med.items()},
               "all_s_per_token": times}
        rows.append(row)
        logger.info("T=%d  bytes %.1f -> %.1f MiB (%.3f)  tok/s %s  speedup %s", length, nbytes["default"] / 2**20,
                    nbytes["compressed"] / 2**20, row["bytes_ratio"],
                    {n: round(v, 1) for n, v in row["tok_s"].items()},
                    {n: round(v, 2) for n, v in row["speedup_vs_default"].items()})
    result = {"args": dataclasses.asdict(args), "config": {
        "hidden": cfg.hidden_size, "layers": L, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads, "params": sum(p.numel() for p in model.parameters()),
        "full_kv_heads": sum(map(len, compressed)), "torch_threads": torch.get_num_threads()}, "rows": rows}
    atomic_write_json(args.out + ".json", result)
    plot(result, args.out + ".png")
    logger.info("wrote %s.json/.png", args.out)
    return result


def plot(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    ctx = [x["context"] for x in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in rows[0]["tok_s"]:
        a.plot(ctx, [x["tok_s"][name] for x in rows], marker="o", label=name)
    a.set(xscale="log", xlabel="context tokens", ylabel="decode tokens/s (median)",
          title=f"Decode speed, random Llama h{r['config']['hidden']} x{r['config']['layers']} "
                f"({r['config']['heads']}q/{r['config']['kv_heads']}kv heads), 1 thread")
    a.legend(fontsize=8)
    b.plot(ctx, [x["bytes"]["default"] / 2**20 for x in rows], marker="o", label="default cache")
    b.plot(ctx, [x["bytes"]["compressed"] / 2**20 for x in rows], marker="o",
           label=f"compressed ({r['config']['full_kv_heads']} full KV heads, sink {r['args']['sink']} + window "
                 f"{r['args']['window']})")
    b.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="KV MiB (measured == formula)",
          title="KV cache bytes")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    cli(main)

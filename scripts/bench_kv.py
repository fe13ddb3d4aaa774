"""Retrieval heads on the tiny retrieval model: detection, ablation, compression at equal bytes, memory/speed.

    OMP_NUM_THREADS=1 python scripts/bench_kv.py [--model data/models/retrieval-tiny] [--n_eval 48 ...]

(decode speed on a model wide enough for KV reads to matter: scripts/bench_kv_speed.py)

1. Wu retrieval scores over a length x depth grid of passkey prompts -> <model>/retrieval_heads.json|png.
2. DuoAttention-style gates (frozen model) -> <model>/retrieval_heads_gate.json|png.
3. Ablation: uniform attention on the top-k heads (Wu, gate) vs k random heads outside the Wu top-k.
4. Compression: NIAH accuracy vs measured KV bytes for top-k Wu / gate heads kept whole, k random heads,
   and a uniform sink + window on every head at the same bytes; both prefill modes.
5. KV bytes (measured == formula) and decode tokens/s vs context length: default cache vs compressed.
6. NIAH grid heatmaps and FlenQA-style length curves for full / compressed / uniform window.
Writes benchmarks/kv.json and benchmarks/kv.png. Every accuracy is the mean over `seeds` eval seeds
(different prompts; one trained model).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from pipeline.config import cli, parse  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.kv.cache import HeadKVCache, expected_bytes, use_headwise_attention  # noqa: E402
from pipeline.kv.detect import (heads_by_layer, load_registry, masked_heads, plot_scores, query_heads_of,  # noqa: E402
                                random_heads, save_registry, top_heads, wu_scores)
from pipeline.kv.evaluate import (flenqa_curve, generate_answers, niah_examples, niah_grid,  # noqa: E402
                                  words_for_tokens)
from pipeline.kv.gate import optimise_gates  # noqa: E402
from pipeline.tasks.needle import Passkey, prompt_of  # noqa: E402

logger = logging.getLogger("bench_kv")


@dataclasses.dataclass
class BenchArgs:
    model: str = "data/models/retrieval-tiny"
    out: str = "benchmarks/kv"
    eval_length: int = 1024
    n_eval: int = 48
    seeds: int = 3
    sink: int = 4
    window: int = 32
    detect_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024])
    detect_depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    detect_per_cell: int = 4
    gate_steps: int = 80
    gate_l1: float = 0.05
    ablation_k: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    random_draws: int = dataclasses.field(
        default=0, metadata={"help": "Random head sets drawn per k (draw i scored on eval seed i % seeds); 0 = seeds."})
    ablation_flagged: int = dataclasses.field(
        default=8, metadata={"help": "A second random column draws outside the top-N of both Wu and the gate."})
    budgets: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16, 24])
    speed_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
    speed_new_tokens: int = 32
    speed_full_heads: int = 4
    grid_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
    grid_depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    grid_n: int = 8
    flenqa_pads: list[int] = dataclasses.field(default_factory=lambda: [0, 128, 256, 512, 896])
    flenqa_n: int = 16
    reuse_registries: bool = False
    key_digits: int = 5


def accuracy(model, tok, length, n, seeds, make_cache=None, task="passkey", depth=None, key_digits=5, first_seed=0):
    """Mean and per-seed accuracy at `length` tokens; depths spread evenly over [0, 1] unless given."""
    per_seed = []
    for s in range(first_seed, first_seed + seeds):
        depths = [depth] if depth is not None else [i / 7 for i in range(8)]
        exs = [e for d in depths for e in niah_examples(tok, task, length, d, max(1, n // len(depths)), 1000 + s,
                                                        key_digits)]
        per_seed.append(sum(generate_answers(model, tok, exs, make_cache)) / len(exs))
    return {"mean": statistics.mean(per_seed), "per_seed": per_seed,
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0}


def gate_batches(tok, length, n_batches=8, batch_size=4, seed=0, key_digits=5):
    import random
    rng = random.Random(f"gate/{seed}")
    words = words_for_tokens(tok, length)
    batches = []
    for b in range(n_batches):
        task = Passkey(key_digits=key_digits)
        texts = [prompt_of(ex) + " " + ex.answer for ex in (task.make(rng, words, rng.random()) for _ in range(batch_size))]
        tok.padding_side = "right"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batches.append((enc["input_ids"], enc["attention_mask"]))
    return batches


def equal_bytes_window(n_total, k, T, sink, window):
    """Uniform window whose bytes equal k full heads + (n_total - k) heads with sink + window, at length T."""
    per_head = (k * T + (n_total - k) * min(T, sink + window)) / n_total
    return max(1, round(per_head) - sink)


def cache_nbytes(cache) -> int:
    if isinstance(cache, HeadKVCache):
        return cache.nbytes()
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)


@torch.no_grad()
def decode_speed(model, tok, length, new_tokens, make_cache):
    """(tokens/s over `new_tokens` decode steps, measured cache bytes at the end, formula-checked)."""
    ex = niah_examples(tok, "passkey", length, 0.5, 1, 7)[0]
    enc = tok([prompt_of(ex)], return_tensors="pt", add_special_tokens=False)
    times = {}
    for n in (1, new_tokens + 1):
        best = float("inf")
        for _ in range(2):
            cache = make_cache()
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache,
                           pad_token_id=tok.pad_token_id)
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    return new_tokens / (times[new_tokens + 1] - times[1]), cache_nbytes(cache), enc["input_ids"].shape[1] + new_tokens


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (args,), _, _ = parse([BenchArgs], argv, prog="scripts/bench_kv.py")
    torch.manual_seed(0)
    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    groups = cfg.num_attention_heads // H
    n_kv = L * H
    result = {"model": args.model, "args": dataclasses.asdict(args), "config": {
        "layers": L, "heads": cfg.num_attention_heads, "kv_heads": H, "hidden": cfg.hidden_size,
        "params": sum(p.numel() for p in model.parameters())}}
    wu_path, gate_path = Path(args.model) / "retrieval_heads.json", Path(args.model) / "retrieval_heads_gate.json"

    # 1. Wu scores
    if args.reuse_registries and wu_path.exists():
        wu = load_registry(wu_path, model)
    else:
        exs = [Passkey(key_digits=args.key_digits).make(random.Random(f"detect/{n}/{d}/{i}"), words_for_tokens(tok, n), d)
               for n in args.detect_lengths for d in args.detect_depths for i in range(args.detect_per_cell)]
        t0 = time.time()
        res = wu_scores(model, tok, exs)
        wu = save_registry(wu_path, model, "wu", res["scores"], {
            "lengths": args.detect_lengths, "depths": args.detect_depths, "per_cell": args.detect_per_cell,
            "n_prompts": res["n_prompts"], "n_success": res["n_success"], "seconds": round(time.time() - t0, 1)},
            args.model)
        plot_scores(wu_path.with_suffix(".png"), wu["scores"], f"Wu retrieval score ({res['n_success']}/"
                    f"{res['n_prompts']} prompts retrieved)")
    result["wu"] = {"kv_scores": wu["kv_scores"], "settings": wu["settings"]}
    use_headwise_attention(model)  # plain SDPA without a HeadKVCache

    # 2. Gates
    if args.reuse_registries and gate_path.exists():
        gate = load_registry(gate_path, model)
    else:
        t0 = time.time()
        gates, log = optimise_gates(model, gate_batches(tok, args.eval_length, key_digits=args.key_digits), args.sink, args.window,
                                    steps=args.gate_steps, l1=args.gate_l1)
        use_headwise_attention(model)
        gate = save_registry(gate_path, model, "duo_gate", gates, {
            "sink": args.sink, "window": args.window, "steps": args.gate_steps, "l1": args.gate_l1,
            "length": args.eval_length, "log": log, "seconds": round(time.time() - t0, 1)}, args.model)
        plot_scores(gate_path.with_suffix(".png"), gate["scores"], "DuoAttention-style gate per KV head")
    result["gate"] = {"kv_scores": gate["kv_scores"], "settings": gate["settings"]}
    rank = {"wu": top_heads(wu["kv_scores"], n_kv), "gate": top_heads(gate["kv_scores"], n_kv)}
    logger.info("wu top-8 %s", rank["wu"][:8])
    logger.info("gate top-8 %s", rank["gate"][:8])

    T, n, S = args.eval_length, args.n_eval, args.seeds
    acc = functools.partial(accuracy, key_digits=args.key_digits)
    base = acc(model, tok, T, n, S)
    base_kv = acc(model, tok, T, n, S, task="kv_haystack")
    by_length = {L_: acc(model, tok, L_, n, S) for L_ in args.grid_lengths}
    result["full_cache"] = {"passkey": base, "kv_haystack": base_kv, "passkey_by_length": by_length}
    logger.info("full cache @%d: passkey %.3f kv_haystack %.3f; by length %s", T, base["mean"], base_kv["mean"],
                {L_: round(a["mean"], 3) for L_, a in by_length.items()})

    # 3. Ablation (masking = uniform attention on every query head of the chosen KV heads)
    abl = []
    for k in args.ablation_k:
        row = {"k": k}
        for name in ("wu", "gate"):
            with masked_heads(model, query_heads_of(rank[name][:k], groups)):
                row[f"top_{name}"] = acc(model, tok, T, n, S)
        # k random heads outside Wu's top-k (the baseline), and outside the top-N of both methods
        # (are the heads neither method flags safe to mask?)
        flagged = set(rank["wu"][:args.ablation_flagged]) | set(rank["gate"][:args.ablation_flagged])
        for col, exclude in (("random", rank["wu"][:k]), ("random_unflagged", sorted(flagged))):
            rand, draws = [], []
            for s in range(args.random_draws or S):
                heads = random_heads(L, H, k, seed=s, exclude=exclude)
                with masked_heads(model, query_heads_of(heads, groups)):
                    rand.append(acc(model, tok, T, n, 1, first_seed=s % S)["mean"])
                draws.append(heads)
            row[col] = {"mean": statistics.mean(rand), "per_seed": rand, "std": statistics.stdev(rand),
                        "heads": draws}
        logger.info("ablation k=%d: top-wu %.3f top-gate %.3f random %.3f random outside both top-%d %.3f", k,
                    row["top_wu"]["mean"], row["top_gate"]["mean"], row["random"]["mean"], args.ablation_flagged,
                    row["random_unflagged"]["mean"])
        abl.append(row)
    result["ablation"] = abl

    # 4. Compression at equal bytes, both prefill modes
    comp = []
    none = [[] for _ in range(L)]
    for prefill in ("full", "local"):
        for k in args.budgets:
            def cache_for(heads, window=args.window):
                return lambda: HeadKVCache(cfg, heads_by_layer(heads, L), args.sink, window, prefill)
            uw = equal_bytes_window(n_kv, k, T, args.sink, args.window)
            ratio = expected_bytes(cfg, heads_by_layer(rank["wu"][:k], L), T, 1, args.sink, args.window) / \
                expected_bytes(cfg, none, T, 1, 0, T)
            row = {"prefill": prefill, "k": k, "kv_bytes_ratio": ratio, "uniform_window": uw,
                   "wu": acc(model, tok, T, n, S, cache_for(rank["wu"][:k])),
                   "gate": acc(model, tok, T, n, S, cache_for(rank["gate"][:k])),
                   "uniform": acc(model, tok, T, n, S, lambda: HeadKVCache(cfg, none, args.sink, uw, prefill))}
            # head draw s is scored on eval seed s, so the random column sees the same prompts as the others
            rand = [acc(model, tok, T, n, 1, cache_for(random_heads(L, H, k, seed=s)), first_seed=s)["mean"]
                    for s in range(S)]
            row["random"] = {"mean": statistics.mean(rand), "per_seed": rand, "std": statistics.stdev(rand)}
            # measured bytes of one compressed cache after a real generate, against the formula
            ex = niah_examples(tok, "passkey", T, 0.5, 1, 5)[0]
            enc = tok([prompt_of(ex)], return_tensors="pt", add_special_tokens=False)
            c = cache_for(rank["wu"][:k])()
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, past_key_values=c,
                           pad_token_id=tok.pad_token_id)
            t_len = c.get_seq_length()
            row["measured_bytes"] = c.nbytes()
            row["formula_bytes"] = expected_bytes(cfg, heads_by_layer(rank["wu"][:k], L), t_len, 1, args.sink,
                                                  args.window)
            row["full_bytes"] = expected_bytes(cfg, none, t_len, 1, 0, t_len)
            assert row["measured_bytes"] == row["formula_bytes"], row
            logger.info("compress %s k=%d ratio %.3f: wu %.3f gate %.3f random %.3f uniform(w=%d) %.3f", prefill, k,
                        ratio, row["wu"]["mean"], row["gate"]["mean"], row["random"]["mean"], uw,
                        row["uniform"]["mean"])
            comp.append(row)
    result["compression"] = comp

    # 5. Memory and decode speed vs length
    best = rank["wu"][:args.speed_full_heads]
    speed = []
    for length in args.speed_lengths:
        tps_full, b_full, t_len = decode_speed(model, tok, length, args.speed_new_tokens,
                                               lambda: DynamicCache(config=cfg))
        tps_c, b_c, _ = decode_speed(model, tok, length, args.speed_new_tokens,
                                     lambda: HeadKVCache(cfg, heads_by_layer(best, L), args.sink, args.window))
        assert b_c == expected_bytes(cfg, heads_by_layer(best, L), t_len, 1, args.sink, args.window)
        speed.append({"context": t_len, "full_bytes": b_full, "compressed_bytes": b_c, "bytes_ratio": b_c / b_full,
                      "full_tok_s": tps_full, "compressed_tok_s": tps_c, "speed_ratio": tps_c / tps_full})
        logger.info("speed %d: bytes %d -> %d (%.3f), tok/s %.1f -> %.1f", t_len, b_full, b_c, b_c / b_full,
                    tps_full, tps_c)
    result["memory_speed"] = {"full_heads": best, "sink": args.sink, "window": args.window, "rows": speed}

    # 6. NIAH grids and FlenQA curves, local prefill (streaming heads never see the needle once it is out of
    # their window), at the smallest budget where Wu's or the gate's heads keep >= 98% of full accuracy.
    ok = [r for r in comp if r["prefill"] == "local" and max(r["wu"]["mean"], r["gate"]["mean"]) >= 0.98 * base["mean"]]
    k = min((r["k"] for r in ok), default=max(args.budgets))
    Tg = max(args.grid_lengths)
    uw = equal_bytes_window(n_kv, k, Tg, args.sink, args.window)
    policies = {"full": None,
                f"gate top-{k}, local": lambda: HeadKVCache(cfg, heads_by_layer(rank["gate"][:k], L), args.sink,
                                                            args.window, "local"),
                f"uniform w={uw}, local": lambda: HeadKVCache(cfg, none, args.sink, uw, "local"),
                f"wu top-{k}, local": lambda: HeadKVCache(cfg, heads_by_layer(rank["wu"][:k], L), args.sink,
                                                          args.window, "local")}
    result["niah_grid"] = {"lengths": args.grid_lengths, "depths": args.grid_depths, "n_per_cell": args.grid_n,
                           "k": k, "grids": {name: niah_grid(model, tok, args.grid_lengths, args.grid_depths,
                                                             args.grid_n, make, key_digits=args.key_digits)
                                                   for name, make in policies.items()}}
    result["flenqa"] = {"pads": args.flenqa_pads, "n": args.flenqa_n, "curves": {
        name: flenqa_curve(model, tok, args.flenqa_pads, ["start", "middle", "end"], args.flenqa_n, make,
                           key_digits=args.key_digits)
        for name, make in policies.items()}}
    result["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(args.out + ".json", result)
    plot(result, args.out + ".png")
    logger.info("wrote %s.json/.png in %.0fs", args.out, result["seconds"])
    return result


def plot(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    for ax, key, title in ((axes[0, 0], "wu", "Wu retrieval score (KV heads)"),
                           (axes[0, 1], "gate", "DuoAttention-style gate")):
        im = ax.imshow(r[key]["kv_scores"], cmap="viridis", aspect="auto", vmin=0)
        ax.set(title=title, xlabel="KV head", ylabel="layer")
        fig.colorbar(im, ax=ax)
    ax = axes[0, 2]
    ks = [a["k"] for a in r["ablation"]]
    for i, (key, label) in enumerate((("top_wu", "top-k Wu"), ("top_gate", "top-k gate"), ("random", "k random"),
                                      ("random_unflagged", "k random, unflagged"))):
        ax.bar([x + 0.2 * (i - 1.5) for x in range(len(ks))], [a[key]["mean"] for a in r["ablation"]], 0.2,
               yerr=[a[key]["std"] for a in r["ablation"]], label=label)
    ax.axhline(r["full_cache"]["passkey"]["mean"], color="k", ls="--", lw=1, label="no masking")
    ax.set(xticks=range(len(ks)), xticklabels=[f"k={k}" for k in ks], ylim=(0, 1.05),
           title=f"Masking ablation, passkey @{r['args']['eval_length']}", ylabel="accuracy")
    ax.legend(fontsize=7)
    for ax, prefill in ((axes[1, 0], "full"), (axes[1, 1], "local")):
        rows = [c for c in r["compression"] if c["prefill"] == prefill]
        x = [c["kv_bytes_ratio"] for c in rows]
        for key, label in (("wu", "Wu top-k full"), ("gate", "gate top-k full"), ("random", "random k full"),
                           ("uniform", "uniform window, equal bytes")):
            ax.errorbar(x, [c[key]["mean"] for c in rows], yerr=[c[key]["std"] for c in rows], marker="o", label=label,
                        capsize=2)
        ax.axhline(r["full_cache"]["passkey"]["mean"], color="k", ls="--", lw=1, label="full cache")
        ax.set(xscale="log", ylim=(0, 1.05), xlabel="KV bytes / full", ylabel="accuracy",
               title=f"Compression, prefill={prefill}, passkey @{r['args']['eval_length']}")
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    rows = r["memory_speed"]["rows"]
    ctx = [s["context"] for s in rows]
    ax.plot(ctx, [s["full_bytes"] / 2**20 for s in rows], marker="o", label="KV MiB, default cache")
    ax.plot(ctx, [s["compressed_bytes"] / 2**20 for s in rows], marker="o", label="KV MiB, compressed")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="KV MiB (batch 1)",
           title="KV bytes and decode speed")
    ax2 = ax.twinx()
    ax2.plot(ctx, [s["full_tok_s"] for s in rows], "k--", marker="x", label="tok/s default")
    ax2.plot(ctx, [s["compressed_tok_s"] for s in rows], "r--", marker="x", label="tok/s compressed")
    ax2.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="lower left")
    g = r["niah_grid"]
    shown = [(n, grid) for prefix in ("wu", "uniform") for n, grid in g["grids"].items() if n.startswith(prefix)]
    for ax, (name, grid) in zip((axes[2, 0], axes[2, 1]), shown):
        ax.imshow([[grid[i][j] for i in range(len(g["lengths"]))] for j in range(len(g["depths"]))], cmap="RdYlGn",
                  vmin=0, vmax=1, aspect="auto")
        ax.set(xticks=range(len(g["lengths"])), xticklabels=g["lengths"], yticks=range(len(g["depths"])),
               yticklabels=[f"{d:.0%}" for d in g["depths"]], xlabel="context tokens", ylabel="needle depth",
               title=f"NIAH, {name} (full cache mean {sum(map(sum, g['grids']['full'])) / (len(g['lengths']) * len(g['depths'])):.2f})")
        for i in range(len(g["lengths"])):
            for j in range(len(g["depths"])):
                ax.text(i, j, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    ax = axes[2, 2]
    fq = r["flenqa"]
    for name, curves in fq["curves"].items():
        mean = [statistics.mean(v[i] for v in curves.values()) for i in range(len(fq["pads"]))]
        ax.plot(fq["pads"], mean, marker="o", label=name)
    ax.set(ylim=(0, 1.05), xlabel="irrelevant padding tokens", ylabel="accuracy (mean of 3 placements)",
           title="FlenQA-style length robustness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    cli(main)

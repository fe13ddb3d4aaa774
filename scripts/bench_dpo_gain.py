"""Is the demo's DPO gain over its SFT start more than the noise? A paired comparison on more held-out examples.

For each seed of `scripts/bench_demo.py`, the SFT model and the DPO model answer the same held-out test questions
of the tasks the pairs target (greedy, the eval's system prompt). Per task: both accuracies, the difference, and
its paired standard error (std of the per-question difference / sqrt(n)), with the questions each model alone got
right. The first 200 questions per task are the ones the demo's own eval scores.

    python scripts/bench_dpo_gain.py --runs outputs/bench_demo --seeds 0 1 2 --n 800   # benchmarks/dpo_gain.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import held_out, load_for_generation, score  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402


def paired(sft_rows: list[dict], dpo_rows: list[dict]) -> dict:
    d = [int(b["correct"]) - int(a["correct"]) for a, b in zip(sft_rows, dpo_rows)]
    n = len(d)
    return {"n": n, "sft": sum(r["correct"] for r in sft_rows) / n, "dpo": sum(r["correct"] for r in dpo_rows) / n,
            "gain": sum(d) / n, "paired_se": statistics.stdev(d) / n ** 0.5,
            "dpo_only_right": d.count(1), "sft_only_right": d.count(-1)}


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="outputs/bench_demo", help="scripts/bench_demo.py's --out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=["add", "sort"], help="the tasks recipes/tiny/pairs.yaml targets")
    ap.add_argument("--n", type=int, default=800, help="held-out test questions per task (add has 819 at difficulty 1)")
    ap.add_argument("--system_prompt", default="Think step by step.", help="recipes/tiny/dpo.yaml's eval_system_prompt")
    ap.add_argument("--result", default="benchmarks/dpo_gain")
    args = ap.parse_args()
    if args.n < 2:  # a paired standard error needs two questions
        fail(f"--n: must be >= 2, got {args.n}")
    for k in args.seeds:
        for stage in ("sft", "dpo"):
            if not (Path(args.runs) / f"seed{k}" / stage / "config.json").is_file():
                fail(f"{args.runs}/seed{k}/{stage}: no model there; run scripts/bench_demo.py first")
    try:
        examples = held_out(args.tasks, args.n, "test")
    except (KeyError, ValueError) as e:  # an unknown task, or more questions than the test split has
        fail(f"--tasks / --n: {e}")
    per_seed = {}
    for k in args.seeds:
        rows, t0 = {}, time.time()
        for stage in ("sft", "dpo"):
            model, tokenizer = load_for_generation(str(Path(args.runs) / f"seed{k}" / stage))
            rows[stage] = score(model, tokenizer, examples, args.system_prompt, batch_size=256, max_new_tokens=128)
        per_seed[k] = {t: paired([r for r in rows["sft"] if r["task"] == t], [r for r in rows["dpo"] if r["task"] == t])
                       for t in args.tasks}
        print(f"seed {k} ({time.time() - t0:.0f} s): " + "; ".join(
            f"{t} {v['sft']:.3f} -> {v['dpo']:.3f} ({v['gain']:+.3f} ± {v['paired_se']:.3f})"
            for t, v in per_seed[k].items()), flush=True)
    summary = {t: {f: {"mean": statistics.mean(per_seed[k][t][f] for k in args.seeds),
                       "std": statistics.stdev(per_seed[k][t][f] for k in args.seeds) if len(args.seeds) > 1 else 0.0}
                   for f in ("sft", "dpo", "gain")} for t in args.tasks}
    atomic_write_json(Path(args.result + ".json"), {
        "command": "python scripts/bench_dpo_gain.py " + " ".join(sys.argv[1:]), "runs": args.runs,
        "tasks": args.tasks, "n_per_task": args.n, "system_prompt": args.system_prompt,
        "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary})
    plot(per_seed, args.tasks, Path(args.result + ".png"))


def plot(per_seed: dict, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) * len(per_seed) + 1.5, 3.2))
    labels, x = [], 0
    for t in tasks:
        for k, res in per_seed.items():
            v = res[t]
            ax.bar(x, v["gain"], yerr=2 * v["paired_se"], capsize=3, color="tab:blue" if v["gain"] > 0 else "tab:red")
            labels.append(f"{t}\nseed {k}")
            x += 1
        x += 0.5
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([i + (i // len(per_seed)) * 0.5 for i in range(len(labels))], labels, fontsize=8)
    ax.set(ylabel="DPO - SFT held-out accuracy", title=f"DPO over its SFT start, ± 2 paired SE "
                                                        f"(n = {next(iter(per_seed.values()))[tasks[0]]['n']} per task)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

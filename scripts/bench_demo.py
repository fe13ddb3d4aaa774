"""The tiny staged recipe (recipes/tiny/pipeline.yaml) with several training seeds: mean ± std per stage and task.

Every path under outputs/tiny/ in the recipe and its stage recipes is moved to <out>/seed<k>/, and every stage that
has a `seed` key gets seed + k (the generated data and the pairs too; the held-out test sets stay the same). Then
the per-seed reports are gathered into benchmarks/demo.json and a chart benchmarks/demo.png.

    python scripts/bench_demo.py --seeds 0 1 2 --jobs 2        # two seeds at a time on 2 cores, one thread each

`make demo` runs alone and lets torch use every core; here each seed's stages get cores / jobs threads
(OMP_NUM_THREADS in the recipe's env), so the two runs also differ by a rounding-level change (thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline.io import atomic_write_json, read_stage_result  # noqa: E402

PREFIX = "outputs/tiny/"


def seeded_recipe(recipe: dict, out: Path, k: int, threads: int) -> dict:
    def move(v):  # nested too: the pairs stage's teacher is {model_name_or_path: outputs/tiny/sft, ...}
        if isinstance(v, dict):
            return {key: move(x) for key, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return str(out / v[len(PREFIX):]) if isinstance(v, str) and v.startswith(PREFIX) else v

    recipe = dict(recipe, output_dir=str(out), name=f"{recipe['name']}-seed{k}",
                  env={**recipe.get("env", {}), "OMP_NUM_THREADS": threads})
    stages = []
    for st in recipe["stages"]:
        cfg = yaml.safe_load((ROOT / st["config"]).read_text())
        args = {key: move(v) for key, v in cfg.items() if move(v) != v}
        args.update({key: move(v) for key, v in st.get("args", {}).items()})
        if "seed" in cfg:
            args["seed"] = int(cfg["seed"]) + k
        stages.append(dict(st, args=args))
    recipe["stages"] = stages
    return recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="recipes/tiny/pipeline.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="outputs/bench_demo")
    ap.add_argument("--result", default="benchmarks/demo")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    ap.add_argument("--threads", type=int, default=None, help="threads per seed's stages (default: cores / jobs)")
    args = ap.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    base = yaml.safe_load((ROOT / args.config).read_text())
    recipes, procs, t0, seconds = {}, {}, {}, {}

    def running() -> int:  # and records each finished seed's wall time when it is first seen done
        for j, p in procs.items():
            if p.poll() is not None and j not in seconds:
                seconds[j] = round(time.time() - t0[j], 1)
        return sum(p.poll() is None for p in procs.values())

    for k in args.seeds:  # a finished seed's stages return at once on a rerun (the runner resumes)
        while running() >= args.jobs:
            time.sleep(2)
        out = Path(args.out) / f"seed{k}"
        recipes[k] = seeded_recipe(base, out, k, threads)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "pipeline.yaml"
        path.write_text(yaml.safe_dump(recipes[k], sort_keys=False))
        t0[k] = time.time()
        with open(out / "bench.log", "a") as log:
            procs[k] = subprocess.Popen([sys.executable, "-m", "pipeline.run", "--config", str(path)], cwd=ROOT,
                                        stdout=log, stderr=subprocess.STDOUT)
    while running():
        time.sleep(2)
    failed = [k for k, p in procs.items() if p.returncode]
    if failed:
        sys.exit(f"seeds {failed} failed: see {args.out}/seed<k>/bench.log")
    runs = {}
    for k in args.seeds:
        metrics = {}
        for st in recipes[k]["stages"]:
            res = read_stage_result(st["args"].get("output_dir") or Path(args.out) / f"seed{k}" / st["name"])
            metrics[st["name"]] = {m: v for m, v in (res or {}).get("metrics", {}).items() if isinstance(v, (int, float))}
        state = json.loads((Path(args.out) / f"seed{k}" / "run_state.json").read_text())
        stage_s = {name: st["seconds"] for name, st in state.items() if isinstance(st, dict) and "seconds" in st}
        # stages' own times (a rerun that skips finished stages keeps them); wall = this call's time for the seed
        runs[k] = {"wall_seconds": seconds[k], "stage_seconds": stage_s,
                   "stages_total_seconds": round(sum(stage_s.values()), 1), "metrics": metrics}
    summary = {}
    for stage in runs[args.seeds[0]]["metrics"]:
        for m in runs[args.seeds[0]]["metrics"][stage]:
            vals = [runs[k]["metrics"].get(stage, {}).get(m) for k in args.seeds]
            if all(isinstance(v, (int, float)) for v in vals):
                summary.setdefault(stage, {})[m] = {"mean": statistics.mean(vals),
                                                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                                    "values": vals}
    atomic_write_json(Path(args.result + ".json"), {"command": "python scripts/bench_demo.py " + " ".join(sys.argv[1:]),
                                                    "seeds": args.seeds, "threads_per_seed": threads, "runs": runs,
                                                    "summary": summary})
    plot(summary, Path(args.result + ".png"))


def plot(summary: dict, path: Path) -> None:
    """Held-out accuracy by task after each stage; beside it NIAH accuracy per KV-cache policy (with the bytes each
    keeps) and accuracy per quantization variant; mean ± std over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shown(k: str) -> bool:  # accuracies; not the mean, nor EvoPrompt's gain and its SE (differences)
        return k.startswith("accuracy/") and k != "accuracy/mean" and not k.startswith("accuracy/test_gain")

    rows = [(s, m) for s, m in summary.items() if any(shown(k) for k in m)]
    if not rows:
        return
    tasks = sorted({k for _, m in rows for k in m if shown(k)})
    niah = {k.split("/", 1)[1]: v for k, v in summary.get("niah", {}).items() if k.startswith("niah_acc/")}
    quant = {k.split("/", 1)[1]: v for k, v in summary.get("quant", {}).items() if k.startswith("quant_accuracy/")}
    panels = [p for p in (niah, quant) if p]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(1.4 * len(tasks) + 2 + 3.5 * len(panels), 3.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4 * len(tasks) + 2] + [3.5] * len(panels)})
    ax = axes[0][0]
    w = 0.8 / len(rows)
    for i, (name, m) in enumerate(rows):
        ax.bar([j + i * w for j in range(len(tasks))], [m.get(t, {}).get("mean", 0) for t in tasks], w,
               yerr=[m.get(t, {}).get("std", 0) for t in tasks], label=name, capsize=2)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], [t.split("/", 1)[1] for t in tasks])
    ax.set(ylim=(0, 1), ylabel="held-out accuracy (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    for pax, values, title in zip(axes[0][1:], panels, ["NIAH (chat), by KV cache", "quantized aligned model"]):
        labels = list(values)
        if values is niah:  # the bytes each policy keeps, from the same runs
            ratio = {k.rsplit("/", 1)[1]: v["mean"] for k, v in summary["niah"].items() if k.startswith("kv_bytes_ratio@")}
            labels = [f"{p}\n({ratio.get(p, 1.0):.2f} of KV bytes)" for p in values]
        pax.bar(range(len(values)), [v["mean"] for v in values.values()], yerr=[v["std"] for v in values.values()],
                color="tab:gray", capsize=2)
        pax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7)
        pax.set(ylim=(0, 1), title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

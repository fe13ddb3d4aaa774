"""The tiny staged recipe (recipes/tiny/pipeline.yaml) with several training seeds: mean ± std per stage and task.

Every path under outputs/tiny/ in the recipe and its stage recipes is moved to <out>/seed<k>/, and every stage that
has a `seed` key gets seed + k (the generated data and the held-out sets stay the same). Then the per-seed
reports are gathered into benchmarks/demo.json and a chart benchmarks/demo.png.

    OMP_NUM_THREADS=1 python scripts/bench_demo.py --seeds 0 1 2        # ~3 x the demo's wall time
"""

from __future__ import annotations

import argparse
import json
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


def seeded_recipe(recipe: dict, out: Path, k: int) -> dict:
    def move(v):
        return str(out / v[len(PREFIX):]) if isinstance(v, str) and v.startswith(PREFIX) else v

    recipe = dict(recipe, output_dir=str(out), name=f"{recipe['name']}-seed{k}")
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
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / args.config).read_text())
    runs = {}
    for k in args.seeds:
        out = Path(args.out) / f"seed{k}"
        recipe = seeded_recipe(base, out, k)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "pipeline.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pipeline.run", "--config", str(path)], cwd=ROOT, check=True)
        metrics = {}
        for st in recipe["stages"]:
            res = read_stage_result(st["args"].get("output_dir") or Path(out) / st["name"])
            metrics[st["name"]] = {m: v for m, v in (res or {}).get("metrics", {}).items() if isinstance(v, (int, float))}
        runs[k] = {"seconds": round(time.time() - t0, 1), "metrics": metrics}
    summary = {}
    for stage in runs[args.seeds[0]]["metrics"]:
        for m in runs[args.seeds[0]]["metrics"][stage]:
            vals = [runs[k]["metrics"].get(stage, {}).get(m) for k in args.seeds]
            if all(isinstance(v, (int, float)) for v in vals):
                summary.setdefault(stage, {})[m] = {"mean": statistics.mean(vals),
                                                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                                    "values": vals}
    atomic_write_json(Path(args.result + ".json"), {"command": "python scripts/bench_demo.py " + " ".join(sys.argv[1:]),
                                                    "seeds": args.seeds, "runs": runs, "summary": summary})
    plot(summary, Path(args.result + ".png"))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(s, m) for s, m in summary.items() if any(k.startswith("accuracy/") and k != "accuracy/mean" for k in m)]
    if not rows:
        return
    tasks = sorted({k for _, m in rows for k in m if k.startswith("accuracy/") and k != "accuracy/mean"})
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.5))
    w = 0.8 / len(rows)
    for i, (name, m) in enumerate(rows):
        ax.bar([j + i * w for j in range(len(tasks))], [m.get(t, {}).get("mean", 0) for t in tasks], w,
               yerr=[m.get(t, {}).get("std", 0) for t in tasks], label=name, capsize=2)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], [t.split("/", 1)[1] for t in tasks])
    ax.set(ylim=(0, 1), ylabel="held-out accuracy (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

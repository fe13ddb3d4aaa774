"""The z-score clip of the demo's per-tensor INT4 RTN: SW-preserving accuracy of each seed's aligned model by clip.

For each seed of `scripts/bench_demo.py` and each --zscore, `pipeline.quant.compare` runs with
`recipes/tiny/quant.yaml` on the seed's DPO model, scoring fp and INT4 RTN + clip + super weights restored (200
held-out examples per task, as the stage does). The spread over seeds is what the recipe's `clip_zscore` was chosen
by; plain RTN (0.00 at every clip: the super weight is not restored) is not rerun.

    python scripts/bench_quant_clip.py --runs outputs/bench_demo --seeds 0 1 2     # benchmarks/quant_clip.{json,png}
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json, read_stage_result  # noqa: E402


def run(model: Path, out: Path, z: float) -> dict:
    if read_stage_result(out) is None:
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pipeline.quant.compare", "--config", str(ROOT / "recipes/tiny/quant.yaml"),
               "--model_name_or_path", str(model), "--output_dir", str(out), "--clip_zscore", str(z),
               "--variants", "[fp, rtn_clip_restore_sw]", "--nf4", "false"]
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_stage_result(out)["metrics"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="outputs/bench_demo", help="scripts/bench_demo.py's --out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--zscore", type=float, nargs="+", default=[2.5, 3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--work", default="outputs/quant_clip")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--result", default="benchmarks/quant_clip")
    args = ap.parse_args()
    if not all(z > 0 for z in args.zscore):
        print(f"error: --zscore: every clip must be > 0 standard deviations, got {args.zscore}", file=sys.stderr)
        sys.exit(2)
    for k in args.seeds:
        if not (Path(args.runs) / f"seed{k}" / "dpo" / "config.json").is_file():
            print(f"error: {args.runs}/seed{k}/dpo: missing; run scripts/bench_demo.py first", file=sys.stderr)
            sys.exit(2)
    jobs = [(z, k) for z in args.zscore for k in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # each job is its own process (one thread)
        got = list(pool.map(lambda j: run(Path(args.runs) / f"seed{j[1]}" / "dpo",
                                          Path(args.work) / f"z{j[0]:g}-seed{j[1]}", j[0]), jobs))
    per_seed = {f"{z:g}": {} for z in args.zscore}
    for (z, k), m in zip(jobs, got):
        per_seed[f"{z:g}"][str(k)] = {"fp": m["quant_accuracy/fp"], "sw_kept": m["quant_accuracy/rtn_clip_restore_sw"],
                                      "sw_kept_nll": m["quant_nll/rtn_clip_restore_sw"]}
    summary = {z: {"mean": statistics.mean(r["sw_kept"] for r in rows.values()),
                   "std": statistics.stdev(r["sw_kept"] for r in rows.values()) if len(rows) > 1 else 0.0}
               for z, rows in per_seed.items()}
    for z, s in summary.items():
        values = " / ".join(f"{r['sw_kept']:.3f}" for r in per_seed[z].values())
        print(f"clip {z} sigma: SW-kept INT4 {s['mean']:.3f} ± {s['std']:.3f} ({values})")
    atomic_write_json(Path(args.result + ".json"), {
        "command": "python scripts/bench_quant_clip.py " + " ".join(sys.argv[1:]), "runs": args.runs,
        "recipe": "recipes/tiny/quant.yaml (per-tensor INT4, 200 held-out examples per task)",
        "per_seed": per_seed, "summary": summary})
    plot(per_seed, Path(args.result + ".png"))


def plot(per_seed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    zs = list(per_seed)
    for k in next(iter(per_seed.values())):
        ax.plot([float(z) for z in zs], [per_seed[z][k]["sw_kept"] for z in zs], "o-", label=f"seed {k}")
    fp = statistics.mean(r["fp"] for rows in per_seed.values() for r in rows.values())
    ax.axhline(fp, color="k", ls="--", lw=0.8, label=f"fp (mean {fp:.3f})")
    ax.set(xlabel="z-score clip (sigmas)", ylabel="held-out accuracy",
           title="per-tensor INT4 RTN + clip, super weight restored")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

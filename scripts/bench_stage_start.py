"""What a stage process costs to start: the runner's fork server (`preload: true`, the default: stages forked from a
process that imported torch, transformers and trl once) against a fresh `python -m` interpreter per stage (`preload:
false`). The pipeline is four real stages with little work each (held-out eval of the demo base on 6 questions, then
2 SFT steps, twice), run by `python -m pipeline.run` as a user runs it; the two settings alternate, 3 runs each. Their
results must be equal.

    python scripts/bench_stage_start.py     # -> benchmarks/stage_start.{json,png}
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json  # noqa: E402

BASE = "data/models/demo-base"


def pipeline_yaml(tmp: Path, preload: bool, run: int) -> Path:
    out = tmp / f"{'preload' if preload else 'python-m'}-{run}"
    ev = {"module": "pipeline.evaluate", "config": "recipes/tiny/eval.yaml"}
    sft = {"module": "pipeline.sft", "config": "recipes/tiny/sft.yaml"}
    stages = []
    for k in (1, 2):
        stages.append({**ev, "name": f"eval{k}", "args": {"model_name_or_path": BASE, "n": 1,
                                                         "output_dir": str(out / f"eval{k}")}})
        stages.append({**sft, "name": f"sft{k}", "args": {"model_name_or_path": BASE, "max_steps": 2,
                                                         "dataset_name": "data/tiny/sft.jsonl", "eval_examples": 1,
                                                         "eval_tasks": ["add"], "output_dir": str(out / f"sft{k}")}})
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"name": out.name, "output_dir": str(out), "preload": preload,
                                    "env": {"HF_HUB_OFFLINE": 1, "TOKENIZERS_PARALLELISM": "false"},
                                    "stages": stages}))
    return path


def main() -> None:
    runs: dict[str, list[dict]] = {"python -m": [], "preload": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(3):
            for preload in (False, True):
                path = pipeline_yaml(Path(tmp), preload, run)
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pipeline.run", "--config", str(path)], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - t
                out = Path(yaml.safe_load(path.read_text())["output_dir"])
                state = json.loads((out / "run_state.json").read_text())
                metrics = {name: {k: v for k, v in json.loads((out / name / "stage_result.json").read_text())[
                    "metrics"].items() if "accuracy" in k or k == "train_loss"} for name in state if name[0] != "_"}
                runs["preload" if preload else "python -m"].append({
                    "wall_s": round(wall, 2), "stage_s": {n: s["seconds"] for n, s in state.items() if n[0] != "_"},
                    "metrics": metrics})
                print(preload, round(wall, 1), runs["preload" if preload else "python -m"][-1]["stage_s"], flush=True)
    equal = all(a["metrics"] == b["metrics"] for a, b in zip(runs["python -m"], runs["preload"]))
    median = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    per_stage = {k: statistics.median(sum(r["stage_s"].values()) / len(r["stage_s"]) for r in v)
                 for k, v in runs.items()}
    result = {"command": "python scripts/bench_stage_start.py", "stages": ["eval1", "sft1", "eval2", "sft2"],
              "median_wall_s": median, "median_seconds_per_stage": per_stage,
              "saved_per_stage_s": round(per_stage["python -m"] - per_stage["preload"], 2),
              "speedup_wall": round(median["python -m"] / median["preload"], 3), "results_equal": equal,
              "runs": runs}
    out = ROOT / "benchmarks/stage_start"
    atomic_write_json(out.with_suffix(".json"), result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = result["stages"]
    for j, (label, color) in enumerate((("python -m", "tab:gray"), ("preload", "tab:green"))):
        ax.bar([i + 0.4 * j for i in range(len(names))],
               [statistics.median(r["stage_s"][n] for r in runs[label]) for n in names], 0.4, label=label, color=color)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names)
    ax.set_ylabel("stage wall time, s (median of 3)")
    ax.set_title(f"4-stage pipeline: {median['python -m']:.1f} s -> {median['preload']:.1f} s "
                 f"({result['speedup_wall']:.2f}x), results equal: {equal}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print({k: v for k, v in result.items() if k != "runs"})
    if not equal:
        sys.exit("the two settings gave different results: see benchmarks/stage_start.json")


if __name__ == "__main__":
    main()

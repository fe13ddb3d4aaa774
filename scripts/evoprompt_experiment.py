"""EvoPrompt on the tiny world: best evolved vs best initial system prompt on the held-out TEST split.

    python scripts/evoprompt_experiment.py [--seeds 0 1 2] [--algorithms ga de]

The task model must care about its system prompt, so it is a tiny model SFT'd on task-world data whose
system prompts vary (no prompt erasure): each prompt of data/system_prompts.yaml asks for a style (worked
steps, an explanation, the answer only) and the oracle teacher answers in that style. If the model is
missing it is made first (about 20 min on 2 busy CPU cores): 300 SFT steps on all six tasks, then 900 more
on copy, reverse, sort and kv_lookup. The commands are in `prepare()` below. At this budget the 1M-parameter
model scores 0 on add, multihop, copy and reverse whatever the prompt, so the search runs on sort and
kv_lookup, where its dev accuracy ranges from about 0.1 to 0.3 depending on the system prompt.

Each (seed, algorithm) run is one `pipeline.evoprompt` run: the seed sets the operator's randomness and
which dev examples are drawn; the test split (n_test per task, fixed) is the same for every run and is only
used for the two final prompts of each run. The operator is the lexical one (no LLM is available offline).
Writes benchmarks/evoprompt.json and benchmarks/evoprompt.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import evoprompt  # noqa: E402
from pipeline.evo.search import LocalTaskModel, Scorer  # noqa: E402
from pipeline.generation.teachers import RequestCache  # noqa: E402
from pipeline.io import atomic_write_json, read_stage_result  # noqa: E402
from pipeline.tasks import get_task, make_split  # noqa: E402


def prepare(work: Path) -> Path:
    """The prompt-sensitive task model (made once; each step is skipped when its output exists)."""
    styles = "[steps, explain, concise]"
    oracle = "[{type: oracle, wrong_rate: 0.0}]"
    steps = [
        (work / "data" / "stage_result.json",
         ["-m", "pipeline.generate", "--config", "recipes/tiny/generate.yaml", "--output_dir", f"{work}/data",
          "--styles", styles, "--prompt_erasure", "false", "--teachers", oracle, "--n_samples", "1",
          "--save_datasets", "false"]),
        (work / "base" / "config.json",
         ["-m", "pipeline.tiny", "--config", "recipes/tiny/model.yaml", "--output_dir", f"{work}/base",
          "--corpus", f"{work}/data/corpus.txt"]),
        (work / "sft" / "stage_result.json",
         ["-m", "pipeline.sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", f"{work}/base",
          "--dataset_name", f"{work}/data/sft.jsonl", "--output_dir", f"{work}/sft"]),
        (work / "data4" / "stage_result.json",
         ["-m", "pipeline.generate", "--config", "recipes/tiny/generate.yaml", "--output_dir", f"{work}/data4",
          "--tasks", "[copy, reverse, sort, kv_lookup]", "--n_per_task", "900", "--styles", styles,
          "--prompt_erasure", "false", "--teachers", oracle, "--n_samples", "1", "--save_datasets", "false"]),
        (work / "sft2" / "stage_result.json",
         ["-m", "pipeline.sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", f"{work}/sft",
          "--dataset_name", f"{work}/data4/sft.jsonl", "--output_dir", f"{work}/sft2", "--max_steps", "900",
          "--save_steps", "300"]),
    ]
    for done, cmd in steps:
        if not done.exists():
            print("$ python", " ".join(cmd), flush=True)
            subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    return work / "sft2"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['algorithm'].upper()} s{r['seed']}\ndev {r['n_dev']}" for r in runs]
    x = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 3.8))
    ax.bar([i - 0.2 for i in x], [r["test_best_initial"] for r in runs], 0.4, label="best initial prompt")
    ax.bar([i + 0.2 for i in x], [r["test_best_evolved"] for r in runs], 0.4, label="best evolved prompt")
    ax.set_xticks(list(x), labels)
    ax.set(ylabel="held-out TEST accuracy", title="EvoPrompt (lexical operator) on the tiny task world",
           ylim=(0, 1))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithms", nargs="+", default=["ga", "de"], choices=["ga", "de"])
    ap.add_argument("--population_size", type=int, default=10)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--tasks", default="[sort, kv_lookup]")
    ap.add_argument("--n_dev", type=int, nargs="+", default=[15, 50],
                    help="dev examples per task (fitness); one set of runs per value")
    ap.add_argument("--n_test", type=int, default=100, help="test examples per task (final report)")
    ap.add_argument("--work", default="outputs/evoprompt_exp")
    ap.add_argument("--out", default="benchmarks/evoprompt")
    a = ap.parse_args()
    os.chdir(ROOT)
    model = prepare(Path(a.work))

    runs = []
    for n_dev, seed, algorithm in [(n, s, al) for n in a.n_dev for s in a.seeds for al in a.algorithms]:
        # One run per (dev size, seed, algorithm); a finished run is read back, not redone.
        name = f"{algorithm}_seed{seed}_pop{a.population_size}_gen{a.generations}_dev{n_dev}_test{a.n_test}"
        out = Path(a.work) / name
        argv = ["--config", "recipes/tiny/evoprompt.yaml", "--output_dir", str(out),
                "--task_model_name_or_path", str(model), "--algorithm", algorithm, "--seed", str(seed),
                "--data_seed", str(seed), "--population_size", str(a.population_size),
                "--generations", str(a.generations), "--tasks", a.tasks, "--n_dev", str(n_dev),
                "--n_test", str(a.n_test)]
        start = time.perf_counter()
        metrics = (read_stage_result(out) or {}).get("metrics") or evoprompt.main(argv)
        best = json.loads((out / "best_prompt.json").read_text())
        runs.append({"seed": seed, "algorithm": algorithm, "operator": metrics["operator"],
                     "test_best_initial": metrics["accuracy/test_best_initial"],
                     "test_best_evolved": metrics["accuracy/test_best_evolved"],
                     "dev_best_initial": metrics["dev_fitness/best_initial"],
                     "dev_best_evolved": metrics["dev_fitness/best_evolved"],
                     "best_initial_prompt": best["best_initial_prompt"], "best_evolved_prompt": best["prompt"],
                     "prompts_scored": metrics["prompts_scored"], "n_dev": best["n_dev"], "n_test": best["n_test"],
                     "seconds": metrics["seconds"], "wall_seconds_this_call": round(time.perf_counter() - start, 1)})
        print(json.dumps(runs[-1]), flush=True)

    # Context, not selection: how far apart the hand-written prompts are on test (the spread the search can use).
    scorer = Scorer(LocalTaskModel(str(model)), RequestCache(Path(a.work) / "initial_test_cache.jsonl"))
    initial = evoprompt.load_prompts("data/evoprompt/initial_prompts.yaml")
    tasks = [t.strip() for t in a.tasks.strip("[]").split(",")]
    test = [e for t in tasks for e in make_split(get_task(t), "test", a.n_test, 0)]
    initial_test = dict(zip(initial, scorer.scores(initial, test)))

    summary = {}
    for algorithm, n_dev in [(al, n) for n in a.n_dev for al in a.algorithms]:
        rs = [r for r in runs if r["algorithm"] == algorithm and r["n_dev"] == n_dev * len(tasks)]
        gains = [r["test_best_evolved"] - r["test_best_initial"] for r in rs]
        summary[f"{algorithm}/dev_per_task={n_dev}"] = {"mean_test_best_initial": sum(r["test_best_initial"] for r in rs) / len(rs),
                              "mean_test_best_evolved": sum(r["test_best_evolved"] for r in rs) / len(rs),
                              "mean_test_gain": sum(gains) / len(gains),
                              "seeds_improved": sum(g > 0 for g in gains), "seeds_worse": sum(g < 0 for g in gains),
                              "ratio_evolved_over_initial": (sum(r["test_best_evolved"] for r in rs)
                                                             / max(1e-9, sum(r["test_best_initial"] for r in rs)))}
    command = "python scripts/evoprompt_experiment.py " + " ".join(sys.argv[1:])
    atomic_write_json(ROOT / f"{a.out}.json", {"command": command.strip(), "task_model": str(model),
                                                "split_reported": "test (held out; fitness used dev only)",
                                                "summary": summary, "runs": runs,
                                                "test_accuracy_of_each_initial_prompt": initial_test})
    plot(runs, ROOT / f"{a.out}.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

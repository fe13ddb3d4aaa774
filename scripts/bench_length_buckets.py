"""SFT wall time with and without `length_buckets`, on the tiny demo's own data and recipe.

The tiny SFT recipe (`recipes/tiny/sft.yaml`: the demo base, streaming heads) trains `--steps` steps on the data of
`recipes/tiny/generate.yaml` twice per repeat: with random batches (`--length_buckets []`) and with the recipe's
bucket edges. Reported: the train runtime of each (the Trainer's `train_runtime`, one thread, runs alternating so a
slow minute hits both), and the tokens a step computes, padding included, for the batches each order makes: the
bucketed order is the one the stage uses (`length_bucketed_order`), the random one is drawn like the Trainer's sampler
(a seeded permutation), over the same number of steps.

    python scripts/bench_length_buckets.py                  # benchmarks/length_buckets.{json,png}
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json, read_stage_result  # noqa: E402


def padded_tokens(lengths: list[int], order: list[int], batch_size: int, steps: int) -> tuple[float, float]:
    """(tokens computed per row, padding included; real tokens per row) over the first `steps` batches."""
    batches = [order[i:i + batch_size] for i in range(0, steps * batch_size, batch_size)]
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    rows = sum(len(b) for b in batches)
    return computed / rows, real / rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--edges", default="[256]", help="the length_buckets value to compare with random batches")
    ap.add_argument("--work", default="outputs/bench_length_buckets")
    ap.add_argument("--result", default="benchmarks/length_buckets")
    args = ap.parse_args()
    try:
        edges = json.loads(args.edges)
        assert isinstance(edges, list) and edges and all(isinstance(e, int) and e >= 1 for e in edges)
    except (ValueError, AssertionError):
        print(f"error: --edges must be a JSON list of token lengths >= 1, got {args.edges}", file=sys.stderr)
        sys.exit(2)
    if args.steps < 1 or args.repeats < 1:
        print("error: --steps and --repeats must be >= 1", file=sys.stderr)
        sys.exit(2)
    work = Path(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    data = work / "data"
    if read_stage_result(data) is None:
        subprocess.run([sys.executable, "-m", "pipeline.generate", "--config", "recipes/tiny/generate.yaml",
                        "--output_dir", str(data)], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    from transformers import AutoTokenizer

    from pipeline.config import load_yaml
    from pipeline.data import length_bucketed_order

    recipe = load_yaml(ROOT / "recipes/tiny/sft.yaml")
    tok = AutoTokenizer.from_pretrained(ROOT / recipe["model_name_or_path"])
    rows = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    raw = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
           for r in rows]
    lengths = [min(n, recipe["max_length"]) for n in raw]  # what the stage trains on: cut at max_length
    bucket_of = [bisect.bisect_left(edges, n) for n in lengths]
    bs = recipe["per_device_train_batch_size"]
    shuffled = list(range(len(lengths)))
    random.Random(recipe["seed"]).shuffle(shuffled)
    tokens = {"random": padded_tokens(lengths, shuffled, bs, args.steps),
              "buckets": padded_tokens(lengths, length_bucketed_order(lengths, edges, bs, recipe["seed"]), bs,
                                       args.steps)}

    runtimes = {"random": [], "buckets": []}
    for r in range(args.repeats):
        for name, value in (("random", "[]"), ("buckets", args.edges)):
            out = work / f"{name}-{r}"
            if read_stage_result(out) is None:
                cmd = [sys.executable, "-m", "pipeline.sft", "--config", "recipes/tiny/sft.yaml", "--dataset_name",
                       str(data / "sft.jsonl"), "--output_dir", str(out), "--max_steps", str(args.steps),
                       "--eval_tasks", "[]", "--length_buckets", value, "--save_steps", str(10 * args.steps)]
                with open(work / f"{name}-{r}.log", "w") as log:
                    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            runtimes[name].append(read_stage_result(out)["metrics"]["train_runtime"])
            print(f"{name} repeat {r}: {runtimes[name][-1]:.1f} s", flush=True)

    mean = {k: statistics.mean(v) for k, v in runtimes.items()}
    result = {
        "command": "python " + " ".join(sys.argv), "steps": args.steps, "batch_size": bs, "edges": edges,
        "rows": len(lengths), "max_length": recipe["max_length"],
        "rows_cut_at_max_length": sum(n > recipe["max_length"] for n in raw),
        "buckets": [{"rows": sum(1 for x in bucket_of if x == b),
                     "tokens_before_cut": [min(n for n, x in zip(raw, bucket_of) if x == b),
                                           max(n for n, x in zip(raw, bucket_of) if x == b)]}
                    for b in range(len(edges) + 1) if b in bucket_of],
        "train_runtime_s": runtimes, "train_runtime_mean_s": mean,
        "speedup": mean["random"] / mean["buckets"],
        "tokens_per_row_computed": {k: v[0] for k, v in tokens.items()},
        "tokens_per_row_real": {k: v[1] for k, v in tokens.items()},
        "threads": 1,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(f"{args.result}.json"), result)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = ["random", "buckets"]
    a.bar(names, [mean[n] for n in names], color=["#999", "#2a7"])
    for i, n in enumerate(names):
        a.scatter([i] * len(runtimes[n]), runtimes[n], color="k", s=12, zorder=3)
    a.set_ylabel(f"train runtime, {args.steps} steps (s, 1 thread)")
    a.set_title(f"SFT, tiny demo recipe: {result['speedup']:.2f}x")
    b.bar(names, [tokens[n][0] for n in names], color=["#999", "#2a7"], label="computed (padding included)")
    b.bar(names, [tokens[n][1] for n in names], color="#135", label="real")
    b.set_ylabel("tokens per row")
    b.legend(fontsize=8)
    b.set_title(f"length_buckets {edges}")
    fig.tight_layout()
    fig.savefig(f"{args.result}.png", dpi=110)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

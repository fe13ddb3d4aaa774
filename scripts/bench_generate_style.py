"""Orca's question on the tiny task world: do explanation-style SFT data beat answer-only data at equal budget?

Both data sets come from the generation stage (recipes/tiny/generate.yaml) with the same queries, the same
oracle teacher (no mistakes) and the recipe's prompt erasure (no system message, as evaluation prompts);
only the system-prompt styles differ: [steps, explain] vs [concise]. Each run trains the same tiny base model
for the same number of steps at the same batch size (the same number of examples) with the SFT recipe's
optimizer settings (AdamW lr 1e-2, beta2 0.95, cosine, 5% warmup, batch 8), loss on the assistant tokens
only, and records held-out test accuracy (greedy, task verifiers) along the way. A plain PyTorch loop, so
each run is one small process.

    OMP_NUM_THREADS=1 python scripts/bench_generate_style.py --seeds 0,1,2 --steps 1500 --eval_at 500,1000 --jobs 1
Writes benchmarks/generate_style.json and benchmarks/generate_style.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STYLES = {"orca": "[steps, explain]", "answer_only": "[concise]"}


def prepare(work: Path, n_per_task: int, tasks: list[str]) -> Path:
    """Generate both data sets with the real stage, then build the tiny base model on their corpus."""
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    for name, styles in STYLES.items():
        subprocess.run([sys.executable, "-m", "pipeline.generate", "--config", str(ROOT / "recipes/tiny/generate.yaml"),
                        "--output_dir", str(work / name), "--styles", styles, "--n_per_task", str(n_per_task),
                        "--tasks", json.dumps(tasks), "--teachers", '[{"type": "oracle"}]', "--n_samples", "1",
                        "--save_datasets", "false", "--system_prompts", str(ROOT / "data/system_prompts.yaml")],
                       check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    corpus = work / "corpus.txt"
    corpus.write_text((work / "orca" / "corpus.txt").read_text() + (work / "answer_only" / "corpus.txt").read_text())
    spec = TinyModelSpec(output_dir=str(work / "base"), num_key_value_heads=4, intermediate_size=512,
                         corpus=[str(corpus)])  # recipes/tiny/model.yaml
    return build_tiny_model(spec)


def train(args) -> None:
    """One run: SFT on one style's data, evaluating on the held-out test split at the given steps."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluate import evaluate

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base")
    rows = [json.loads(line) for line in (work / args.style / "sft.jsonl").read_text().splitlines()]
    data = []
    for r in rows:
        enc = tok.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])]
        data.append((enc["input_ids"], labels))
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=0.0)
    warmup = max(1, round(args.steps * args.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    evals, train_s, tokens, order = [], 0.0, 0, []
    eval_at = sorted({int(s) for s in args.eval_at.split(",")} | {args.steps})
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        if len(order) < args.batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:args.batch_size]], order[args.batch_size:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - start
        tokens += int((labels != -100).sum())
        if step in eval_at:
            m = evaluate(model, tok, args.tasks.split(","), n=args.n_eval, max_new_tokens=128)
            evals.append({"step": step, "train_seconds": round(train_s, 1), "loss": round(loss.item(), 4),
                          "assistant_tokens": tokens, **{k: round(v, 4) for k, v in m.items()}})
            print(json.dumps({"style": args.style, "seed": args.seed, **evals[-1]}), flush=True)
            model.train()
    Path(args.result).write_text(json.dumps({"style": args.style, "seed": args.seed, "lr": args.lr, "beta2": args.beta2,
                                             "batch_size": args.batch_size, "evals": evals}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval_at", default="500,1000")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps")
    ap.add_argument("--n_per_task", type=int, default=1500)
    ap.add_argument("--n_eval", type=int, default=50)
    ap.add_argument("--tasks", default="add,copy,reverse,sort,kv_lookup,multihop")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_generate_style"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate_style"))
    ap.add_argument("--report_only", action="store_true", help="Summarize the runs already finished in --work.")
    ap.add_argument("--worker", nargs=3, metavar=("STYLE", "SEED", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.style, args.seed, args.result = args.worker[0], int(args.worker[1]), args.worker[2]
        return train(args)

    work = Path(args.work)
    if args.report_only:
        return report([json.loads(p.read_text()) for p in sorted(work.glob("run_*.json"))], args)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.n_per_task, args.tasks.split(","))
    runs = [(style, int(seed)) for seed in args.seeds.split(",") for style in STYLES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("steps", "eval_at", "batch_size", "lr", "beta2", "warmup",
                                                             "n_eval", "tasks", "work")]
    pending, running, results = list(runs), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            style, seed = pending.pop(0)
            result = work / f"run_{style}_{seed}.json"
            running.append((subprocess.Popen([sys.executable, __file__, *passthrough, "--worker", style, str(seed),
                                              str(result)], env=env, stderr=subprocess.DEVNULL), result))
        time.sleep(2)
        for proc, result in list(running):
            if proc.poll() is not None:
                running.remove((proc, result))
                if proc.returncode != 0:
                    raise SystemExit(f"run {result.name} failed with exit code {proc.returncode}")
                results.append(json.loads(result.read_text()))
    report(results, args)


def report(results: list[dict], args) -> None:
    import statistics

    summary = {}
    for style in STYLES:
        runs = [r for r in results if r["style"] == style]
        if not runs:
            continue
        steps = [e["step"] for e in runs[0]["evals"]]
        summary[style] = []
        for i, step in enumerate(steps):
            evs = [r["evals"][i] for r in runs]
            keys = [k for k in evs[0] if k.startswith("accuracy/")]
            summary[style].append({"step": step, "seeds": len(evs),
                                   "train_seconds_mean": round(statistics.mean(e["train_seconds"] for e in evs), 1),
                                   "assistant_tokens_mean": round(statistics.mean(e["assistant_tokens"] for e in evs)),
                                   **{k: round(statistics.mean(e[k] for e in evs), 4) for k in keys},
                                   "accuracy/mean_std": round(statistics.pstdev(e["accuracy/mean"] for e in evs), 4)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 python scripts/bench_generate_style.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("seeds", "steps", "batch_size", "lr", "beta2", "warmup", "n_per_task",
                                                   "n_eval", "tasks")},
        "summary": summary, "runs": results}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = args.tasks.split(",")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for style, rows in summary.items():
        a.errorbar([r["step"] for r in rows], [r["accuracy/mean"] for r in rows],
                   yerr=[r["accuracy/mean_std"] for r in rows], marker="o", capsize=3, label=style)
    a.set(xlabel="SFT steps (batch %d)" % args.batch_size, ylabel="held-out accuracy (mean over tasks)",
          title="explanations (Orca) vs answer-only, equal steps", ylim=(0, 1))
    a.legend()
    width = 0.4
    for j, (style, rows) in enumerate(summary.items()):
        b.bar([i + j * width for i in range(len(tasks))], [rows[-1][f"accuracy/{t}"] for t in tasks], width, label=style)
    b.set_xticks([i + width / 2 for i in range(len(tasks))], tasks, rotation=20)
    b.set(ylabel=f"accuracy after {args.steps} steps", ylim=(0, 1), title="per task (mean over seeds)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

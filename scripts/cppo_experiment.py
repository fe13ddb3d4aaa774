"""Forgetting experiment: plain online RL vs CPPO on a two-task sequence of the tiny task world.

    OMP_NUM_THREADS=1 python scripts/cppo_experiment.py            # ~10 min on 2 busy CPU cores

1. A tiny Llama is built and briefly SFT-ed (pipeline.sft, in-process) on task-1 data plus a little task-2
   data, so that it solves task 1 well (there must be something to forget) and task 2 sometimes (GRPO
   needs a non-zero reward to learn from).
2. From that one SFT model, for each seed, the CPPO stage (pipeline.cppo) runs RL on task 1 then task 2
   twice at the same steps: plain online RL (the same trainer with c_kr=0 and weighting=none) and CPPO
   (recipe defaults: heuristic weights, c_kr).
3. Forgetting of task 1 = its accuracy after task 1 minus after task 2 (held-out greedy accuracy);
   written with task-2 accuracy, per seed and as means, to benchmarks/cppo.json and benchmarks/cppo.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json, read_stage_result  # noqa: E402
from pipeline.tasks import get_task, make_split  # noqa: E402


def sft_data(path: Path, task1: str, task2: str, n1: int, n2: int) -> None:
    rows = []
    for task, n in ((task1, n1), (task2, n2)):
        for e in make_split(get_task(task), "train", n, seed=123):
            rows.append({"messages": [{"role": "user", "content": e.question},
                                      {"role": "assistant", "content": f"Answer: {e.answer}"}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_policy(work: Path, args) -> Path:
    """Tiny base -> brief SFT. Cached: reruns reuse the finished SFT model."""
    from pipeline import sft
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    sft_dir = work / "sft"
    if read_stage_result(sft_dir) is not None:
        return sft_dir
    data = work / "sft.jsonl"
    sft_data(data, args.task1, args.task2, args.sft_n1, args.sft_n2)
    base = build_tiny_model(TinyModelSpec(output_dir=str(work / "base"), hidden_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=512, vocab_size=512,
                                          corpus=[str(data)], seed=0))
    sft.main(["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(sft_dir),
              "--max_length", "96", "--assistant_only_loss", "true", "--per_device_train_batch_size", "32",
              "--max_steps", str(args.sft_steps), "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "0.05", "--logging_steps", "50", "--save_strategy", "no",
              "--gradient_checkpointing", "false", "--bf16", "false", "--report_to", "none", "--seed", "0"])
    return sft_dir


# The baseline, CPPO, the two halves of CPPO for an ablation, and GRPO with its KL penalty (TRL's reference model:
# each task's starting policy, the same anchor as CPPO's snapshot).
METHODS = {
    "plain": lambda a: ["--c_kr", "0", "--weighting", "none"],
    "plain_kl": lambda a: ["--c_kr", "0", "--weighting", "none", "--beta", str(a.kl_beta)],
    "cppo": lambda a: ["--c_kr", str(a.c_kr), "--weighting", "heuristic"],
    "kr_only": lambda a: ["--c_kr", str(a.c_kr), "--weighting", "none"],
    "weights_only": lambda a: ["--c_kr", "0", "--weighting", "heuristic"],
}
LABELS = {"plain": "plain online RL (GRPO)", "plain_kl": "GRPO + KL", "cppo": "CPPO", "kr_only": "KR loss only",
          "weights_only": "weights only"}
COLORS = {"plain": "tab:gray", "plain_kl": "tab:purple", "cppo": "tab:blue", "kr_only": "tab:green",
          "weights_only": "tab:orange"}


def run_method(work: Path, policy: Path, method: str, seed: int, args) -> dict:
    from pipeline import cppo

    out = work / f"{method}{args.tag}-seed{seed}"
    tasks = (f"[{{task: {args.task1}, max_steps: {args.t1_steps}, difficulty: {args.t1_difficulty}}}, "
             f"{{task: {args.task2}, max_steps: {args.t2_steps}, difficulty: {args.t2_difficulty}}}]")
    argv = ["--config", str(ROOT / "recipes/tiny/cppo.yaml"), "--model_name_or_path", str(policy),
            "--output_dir", str(out), "--tasks", tasks, "--seed", str(seed), "--eval_n", str(args.eval_n),
            "--learning_rate", str(args.lr), "--save_steps", "1000", "--logging_steps", "10",
            # 4 prompts x 8 samples per step. The built policy's SFT data has no system prompt and terse answers;
            # a given --policy (the demo's aligned model) is run under the prompt it is deployed with.
            "--system_prompt", args.system_prompt or "null", "--max_completion_length", str(args.max_completion_length),
            "--per_device_train_batch_size", "32", "--num_generations", "8"]
    argv += METHODS[method](args)
    cppo.main(argv)  # returns at once if this run is already complete (reruns re-summarise)
    report = json.loads((out / "forgetting.json").read_text())
    train_seconds = sum(read_stage_result(d)["metrics"]["train_runtime"] for d in sorted(out.glob("task*")))
    (a1, b1), (a2, b2) = report["matrix"]
    return {"method": method, "seed": seed, "initial": report["initial"], "matrix": report["matrix"],
            "task1_after_task1": a1, "task1_after_task2": a2, "task1_forgetting": a1 - a2,
            "task2_after_task2": b2, "train_seconds": round(train_seconds, 1)}


def summarise(runs: list[dict], methods: list[str]) -> dict:
    def stats(values):
        return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "values": values}

    out = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        out[method] = {k: stats([r[k] for r in rs]) for k in
                       ("task1_after_task1", "task1_after_task2", "task1_forgetting", "task2_after_task2")}
    # Each method against the first one, the baseline, of the same runs (none with a single method). The keys say
    # "plain": the baseline is plain RL in every run the docs quote.
    base = methods[0]
    f_plain, t2_plain = out[base]["task1_forgetting"]["mean"], out[base]["task2_after_task2"]["mean"]
    out["ratios"] = {}
    for method in methods[1:]:
        f, t2 = out[method]["task1_forgetting"]["mean"], out[method]["task2_after_task2"]["mean"]
        out["ratios"][method] = {"forgetting_over_plain": f / f_plain if f_plain > 0 else None,
                                 "forgetting_reduction": 1 - f / f_plain if f_plain > 0 else None,
                                 "task2_over_plain": t2 / t2_plain if t2_plain > 0 else None}
    return out


def plot(path: Path, summary: dict, methods: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("task1_after_task1", "task 1 acc.\nafter task 1"), ("task1_after_task2", "task 1 acc.\nafter task 2"),
            ("task1_forgetting", "task 1\nforgetting"), ("task2_after_task2", "task 2 acc.\nafter task 2")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        means = [summary[method][k]["mean"] for k, _ in keys]
        stds = [summary[method][k]["std"] for k, _ in keys]
        ax.bar(xs, means, width, yerr=stds, color=COLORS[method], alpha=0.8, capsize=3, label=LABELS[method])
        for x, (k, _) in zip(xs, keys):
            ax.scatter([x] * len(summary[method][k]["values"]), summary[method][k]["values"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_ylabel("held-out greedy accuracy")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / "outputs/cppo_experiment"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--task1", default="copy")
    p.add_argument("--task2", default="reverse")
    p.add_argument("--sft_n1", type=int, default=2000)
    p.add_argument("--sft_n2", type=int, default=400)
    p.add_argument("--sft_steps", type=int, default=225)
    p.add_argument("--t1_steps", type=int, default=10)
    p.add_argument("--t2_steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--c_kr", type=float, default=0.1)
    p.add_argument("--eval_n", type=int, default=128)
    p.add_argument("--kl_beta", type=float, default=0.04, help="KL coefficient of the plain_kl method.")
    p.add_argument("--methods", nargs="+", default=["plain", "cppo"], choices=list(METHODS),
                   help="The first is the baseline the others are compared with.")
    p.add_argument("--tag", default="", help="Suffix of the run directories (RL settings sweeps on one SFT model).")
    p.add_argument("--sft_only", action="store_true", help="Build and score the SFT policy, then stop.")
    p.add_argument("--policy", default=None,
                   help="Start every run from this model (e.g. the tiny demo's outputs/tiny/dpo) instead of building one.")
    p.add_argument("--system_prompt", default=None, help="System prompt of the RL and eval prompts (with --policy).")
    p.add_argument("--max_completion_length", type=int, default=24)
    p.add_argument("--t1_difficulty", type=int, default=1)
    p.add_argument("--t2_difficulty", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/cppo"))
    args = p.parse_args()
    if "plain_kl" in args.methods and args.kl_beta <= 0:
        p.error(f"--kl_beta: must be > 0 for plain_kl, got {args.kl_beta}")

    work = Path(args.work)
    policy = Path(args.policy) if args.policy else build_policy(work, args)
    if args.sft_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.evaluate import evaluate

        model, tok = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
        print(evaluate(model, tok, [args.task1, args.task2], args.eval_n, max_new_tokens=32))
        return
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(run_method(work, policy, method, seed, args))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs, args.methods)
    command = "OMP_NUM_THREADS=1 python scripts/cppo_experiment.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "setup": vars(args), "summary": summary, "runs": runs}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    r = summary["ratios"]
    ratios = ", ".join(f"{m} {v['forgetting_over_plain']:.2f}" for m, v in r.items()
                       if v["forgetting_over_plain"] is not None)
    plot(out.with_suffix(".png"), summary, args.methods,
         f"{args.task1} -> {args.task2}, {len(args.seeds)} seeds, {args.t1_steps}+{args.t2_steps} GRPO steps, "
         f"lr {args.lr}\ntask-1 forgetting / {args.methods[0]}'s: "
         f"{ratios or ('n/a (one method)' if len(args.methods) == 1 else 'n/a (no forgetting to compare with)')}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

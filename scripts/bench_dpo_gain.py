"""Is the demo's DPO gain over its SFT start more than the noise? A paired comparison on more held-out examples.

For each seed of `scripts/bench_demo.py`, the SFT model and the DPO model answer the same held-out test questions
of the tasks the pairs target (greedy, the eval's system prompt). Per task: both accuracies, the difference, and
its paired standard error (std of the per-question difference / sqrt(n)), with the questions each model alone got
right. The first 200 questions per task are the ones the demo's own eval scores.

It also scores the DPO stage's held-out pairs (its `eval_split_size` rows, split as the stage split them): the
implicit-reward accuracy, the share of pairs with beta * (log-ratio of chosen - log-ratio of rejected) > 0 against the
SFT model (the stage's reference), on the pairs as trained (`rejected`: cut after the first wrong character when the
pairs stage cut them) and with whole replies (`rejected_full`). A cut rejected reply ends with an end-of-turn token
right after the slip, which DPO learns to push down: an easy tell, so the whole replies are the fair test.

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


def completion_logps(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """Sum of the log-probs of the completion's tokens (end-of-turn included) after the chat-templated prompt."""
    import torch

    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(tokenizer.apply_chat_template(prompt + completion, tokenize=False), return_tensors="pt",
                    add_special_tokens=False).input_ids.to(model.device)
    start = len(tokenizer(head, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[start - 1:].sum().item()


def held_out_pairs(dpo_dir: Path) -> list[dict]:
    """The DPO stage's held-out pairs, split exactly as the stage split them (its recorded dataset and seed)."""
    import json

    from pipeline.config import DataArguments
    from pipeline.data import load_train_data

    keys = json.loads((dpo_dir / "recipe_fingerprint.json").read_text())["keys"]
    data = DataArguments(dataset_name=keys["dataset_name"], eval_split_size=keys["eval_split_size"])
    _, evaluation = load_train_data(data, "dpo", str(dpo_dir), seed=keys["seed"])
    return list(evaluation)


def reward_accuracy(ref, policy, tokenizer, pairs: list[dict]) -> dict:
    """Implicit-reward accuracy of `policy` against `ref` on the pairs as trained and with whole rejected replies."""
    out = {}
    for name, rejected in (("as_trained", lambda r: r["rejected"]),
                           ("whole_replies", lambda r: [{"role": "assistant", "content": r["rejected_full"]}]
                            if r.get("rejected_full") else r["rejected"])):
        margins = []
        for r in pairs:
            chosen = [completion_logps(m, tokenizer, r["prompt"], r["chosen"]) for m in (policy, ref)]
            worse = [completion_logps(m, tokenizer, r["prompt"], rejected(r)) for m in (policy, ref)]
            margins.append((chosen[0] - chosen[1]) - (worse[0] - worse[1]))
        out[name] = {"accuracy": sum(m > 0 for m in margins) / len(margins),
                     "mean_margin_nats": statistics.mean(margins)}
    out["n"] = len(pairs)
    return out


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
    per_seed, rewards = {}, {}
    for k in args.seeds:
        rows, t0 = {}, time.time()
        for stage in ("sft", "dpo"):
            model, tokenizer = load_for_generation(str(Path(args.runs) / f"seed{k}" / stage))
            rows[stage] = score(model, tokenizer, examples, args.system_prompt, batch_size=256, max_new_tokens=128)
        per_seed[k] = {t: paired([r for r in rows["sft"] if r["task"] == t], [r for r in rows["dpo"] if r["task"] == t])
                       for t in args.tasks}
        run = Path(args.runs) / f"seed{k}"
        ref, tokenizer = load_for_generation(str(run / "sft"))
        policy, _ = load_for_generation(str(run / "dpo"))
        rewards[k] = reward_accuracy(ref, policy, tokenizer, held_out_pairs(run / "dpo"))
        print(f"seed {k} ({time.time() - t0:.0f} s): " + "; ".join(
            f"{t} {v['sft']:.3f} -> {v['dpo']:.3f} ({v['gain']:+.3f} ± {v['paired_se']:.3f})"
            for t, v in per_seed[k].items()) + "; held-out reward accuracy "
            f"{rewards[k]['as_trained']['accuracy']:.3f} as trained, {rewards[k]['whole_replies']['accuracy']:.3f} "
            f"whole replies (n={rewards[k]['n']})", flush=True)
    summary = {t: {f: {"mean": statistics.mean(per_seed[k][t][f] for k in args.seeds),
                       "std": statistics.stdev(per_seed[k][t][f] for k in args.seeds) if len(args.seeds) > 1 else 0.0}
                   for f in ("sft", "dpo", "gain")} for t in args.tasks}
    atomic_write_json(Path(args.result + ".json"), {
        "command": "python scripts/bench_dpo_gain.py " + " ".join(sys.argv[1:]), "runs": args.runs,
        "tasks": args.tasks, "n_per_task": args.n, "system_prompt": args.system_prompt,
        "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary,
        "held_out_reward_accuracy": {str(k): v for k, v in rewards.items()}})
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

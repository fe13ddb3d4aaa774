"""What carries the demo's DPO gain: the DPO stage rerun from each seed's SFT model with one thing changed.

For each seed of `scripts/bench_demo.py`, from its SFT model and its pairs (`pairs/dpo.jsonl`), each variant below runs
`pipeline.dpo` with `recipes/tiny/dpo.yaml` plus its overrides; then the SFT and the variant's model answer the same
held-out questions (greedy, the eval's system prompt) and the paired gain and its SE are computed as in
`scripts/bench_dpo_gain.py`, and the implicit-reward accuracy on the run's held-out pairs with whole rejected replies
(its `eval_split_size` rows; `reward_accuracy` there). Variants on "whole" pairs train on the student's whole wrong
reply (`rejected_full`) instead of the reply cut after its first wrong character.

    python scripts/bench_dpo_ablation.py --runs outputs/bench_demo --seeds 0 1 2      # benchmarks/dpo_ablation.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json, atomic_write_text, read_stage_result  # noqa: E402

RECIPE = "the recipe: cut rejects, sigmoid (beta 0.1) + NLL, 3 epochs at 1e-4"
# name -> (description, which pairs, DPO overrides on top of recipes/tiny/dpo.yaml)
VARIANTS = {
    "recipe": (RECIPE, "cut", []),
    "nll_only": ("NLL on chosen only (no preference term)", "cut", ["--loss_type", "[sft]", "--loss_weights", "[1.0]"]),
    "dpo_only": ("cut rejects, sigmoid (beta 0.1) alone (no NLL term)", "cut",
                 ["--loss_type", "[sigmoid]", "--loss_weights", "[1.0]"]),
    "cut_hinge": ("cut rejects, hinge (beta 3) + NLL", "cut", ["--loss_type", "[hinge, sft]", "--beta", "3"]),
    "whole_sigmoid": ("whole rejects, sigmoid (beta 0.1) + NLL", "whole", []),
    "whole_hinge": ("whole rejects, hinge (beta 3) + NLL", "whole", ["--loss_type", "[hinge, sft]", "--beta", "3"]),
    "previous_recipe": ("whole rejects, hinge (beta 3) + NLL, 1 epoch at 5e-5 (the recipe before)", "whole",
                        ["--loss_type", "[hinge, sft]", "--beta", "3", "--num_train_epochs", "1",
                         "--learning_rate", "5e-5"]),
    "add_pairs_only": ("cut rejects, the add pairs only (no sort pairs)", "cut_add", []),
}


def write_pairs(src: Path, dst: Path, which: str) -> None:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    if which == "whole":
        if not all("rejected_full" in r for r in rows):
            raise SystemExit(f"error: {src}: no 'rejected_full' column (pairs made without cut_rejected)")
        rows = [dict(r, rejected=[{"role": "assistant", "content": r["rejected_full"]}]) for r in rows]
    elif which == "cut_add":
        rows = [r for r in rows if r["task"] == "add"]
    atomic_write_text(dst, "".join(json.dumps(r) + "\n" for r in rows))


def train(run: Path, out: Path, which: str, overrides: list[str]) -> None:
    if read_stage_result(out / "dpo") is not None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(run / "pairs" / "dpo.jsonl", out / "pairs.jsonl", which)
    seed = json.loads((run / "dpo" / "recipe_fingerprint.json").read_text())["keys"]["seed"]  # the stage's own seed
    cmd = [sys.executable, "-m", "pipeline.dpo", "--config", str(ROOT / "recipes/tiny/dpo.yaml"),
           "--model_name_or_path", str(run / "sft"), "--dataset_name", str(out / "pairs.jsonl"),
           "--output_dir", str(out / "dpo"), "--seed", str(seed), "--eval_tasks", "[add]", "--eval_examples", "8",
           *overrides]
    with open(out / "dpo.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="outputs/bench_demo", help="scripts/bench_demo.py's --out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n", type=int, default=800, help="held-out add questions (sort: half as many)")
    ap.add_argument("--work", default="outputs/dpo_ablation")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--result", default="benchmarks/dpo_ablation")
    args = ap.parse_args()
    for k in args.seeds:
        for what in ("sft/config.json", "pairs/dpo.jsonl", "dpo/recipe_fingerprint.json"):
            if not (Path(args.runs) / f"seed{k}" / what).is_file():
                print(f"error: {args.runs}/seed{k}/{what}: missing; run scripts/bench_demo.py first", file=sys.stderr)
                sys.exit(2)
    from bench_dpo_gain import held_out_pairs, paired, reward_accuracy

    from pipeline.evaluate import held_out, load_for_generation, score

    jobs = [(v, k) for v in args.variants for k in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:  # each job is its own process (one thread)
        list(pool.map(lambda j: train(Path(args.runs) / f"seed{j[1]}", Path(args.work) / j[0] / f"seed{j[1]}",
                                      *VARIANTS[j[0]][1:]), jobs))
    print(f"trained {len(jobs)} runs in {time.time() - t0:.0f} s", flush=True)

    examples = {"add": held_out(["add"], args.n, "test"), "sort": held_out(["sort"], args.n // 2, "test")}

    def answers(model, tokenizer) -> dict:
        return {t: score(model, tokenizer, ex, "Think step by step.", 256, 88) for t, ex in examples.items()}

    results, rewards = {v: {} for v in args.variants}, {v: {} for v in args.variants}
    for k in args.seeds:
        ref, tokenizer = load_for_generation(str(Path(args.runs) / f"seed{k}" / "sft"))
        sft = answers(ref, tokenizer)
        for v in args.variants:
            out = Path(args.work) / v / f"seed{k}" / "dpo"
            policy, _ = load_for_generation(str(out))
            got = answers(policy, tokenizer)
            results[v][str(k)] = {t: paired(sft[t], got[t]) for t in examples}
            # the held-out pairs of this run, with whole rejected replies: what the preference term learnt
            rewards[v][str(k)] = reward_accuracy(ref, policy, tokenizer, held_out_pairs(out))["whole_replies"]
            r = results[v][str(k)]
            print(f"{v} seed {k}: add {r['add']['gain']:+.3f} ± {r['add']['paired_se']:.3f}, "
                  f"sort {r['sort']['gain']:+.3f} ± {r['sort']['paired_se']:.3f}, held-out reward accuracy "
                  f"(whole replies) {rewards[v][str(k)]['accuracy']:.3f}", flush=True)
    summary = {v: {**{t: {"mean_gain": statistics.mean(results[v][str(k)][t]["gain"] for k in args.seeds),
                          "min_gain": min(results[v][str(k)][t]["gain"] for k in args.seeds)} for t in examples},
                   "reward_accuracy_whole_replies": statistics.mean(rewards[v][str(k)]["accuracy"]
                                                                    for k in args.seeds)}
               for v in args.variants}
    atomic_write_json(Path(args.result + ".json"), {
        "command": "python scripts/bench_dpo_ablation.py " + " ".join(sys.argv[1:]), "runs": args.runs,
        "n_per_task": {t: len(ex) for t, ex in examples.items()}, "system_prompt": "Think step by step.",
        "variants": {v: VARIANTS[v][0] for v in args.variants}, "per_seed": results,
        "held_out_reward_accuracy_whole_replies": rewards, "summary": summary})
    plot(results, args.variants, args.seeds, Path(args.result + ".png"))


def plot(results: dict, variants: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(variants) + 2), sharey=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, task in zip(axes, ("add", "sort")):
        for i, v in enumerate(variants):
            for j, k in enumerate(seeds):
                r = results[v][str(k)][task]
                ax.errorbar(r["gain"], i + (j - (len(seeds) - 1) / 2) * 0.2, xerr=2 * r["paired_se"], fmt="o",
                            color=colors[j % len(colors)], label=f"seed {k}" if i == 0 else None, capsize=2)
        ax.axvline(0, color="k", lw=0.8)
        ax.set(title=f"{task}: held-out gain over SFT (± 2 paired SE)", xlabel="variant - SFT accuracy")
    axes[0].set_yticks(range(len(variants)), [VARIANTS[v][0] for v in variants], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Continual RLHF with CPPO: online RL on a sequence of tasks without forgetting the earlier ones.

    python -m pipeline.cppo --config recipes/tiny/cppo.yaml
    python -m pipeline.cppo --config recipes/tiny/cppo.yaml --c_kr 0 --weighting none   # plain online RL

For each task of `tasks` in turn: a CPPOTrainer (TRL's GRPOTrainer plus CPPO's per-sample weights and
knowledge-retention loss, see pipeline/rl/cppo_trainer.py) trains the policy on the task's prompts with
the task world's verifier as reward, anchored to a frozen snapshot of the policy as it was when the task
began (the previous task's saved model; for the first task, the input model). After each task every task
of the sequence is evaluated (greedy, held-out test split), which fills the forgetting matrix
R[j][i] = accuracy on task i after training task j; `forgetting.json` / `forgetting.png` hold it with
the average score, forgetting and backward transfer.

Resume: `progress.json` records the tasks finished (their model = the next task's snapshot); a task
interrupted mid-way resumes from the last checkpoint in its own directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/cppo.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelArguments, RecipeError, cli, parse  # noqa: E402
from pipeline.io import atomic_write_json, read_stage_result, write_stage_result  # noqa: E402
from pipeline.rl.cppo_trainer import CPPOConfig, CPPOTrainer  # noqa: E402
from pipeline.training import logger, setup_logging, train_and_save  # noqa: E402

TASK_KEYS = ("task", "max_steps", "n_train", "difficulty", "reward")


@dataclasses.dataclass
class CPPOArguments:
    tasks: list[dict] = dataclasses.field(
        default_factory=list,
        metadata={"help": "The task sequence: a list of {task, max_steps, n_train, difficulty, reward}. `task` is a "
                  "task-world task; `reward: verifier` (the default) is its exact verifier, any other value the "
                  "path of a sequence-classification reward model (one logit). Evaluation always uses the verifier."})
    n_train: int = dataclasses.field(default=512, metadata={"help": "Training prompts per task (default)."})
    difficulty: int = dataclasses.field(default=1, metadata={"help": "Task difficulty (default)."})
    eval_n: int = dataclasses.field(default=50, metadata={"help": "Held-out test examples per task and evaluation."})
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "Prepended as a system message."})
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "Check the recipe, print the plan, exit."})


def check_tasks(args: CPPOArguments, training_args: CPPOConfig, model_args: ModelArguments, source: str) -> list[dict]:
    """The task sequence with defaults filled in; one-line errors naming the item and key."""
    from pipeline.tasks import TASKS

    if not args.tasks:
        raise RecipeError(f"{source}: key 'tasks' must list at least one task")
    if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
        raise RecipeError(f"{source}: key 'use_peft': the CPPO stage trains the full model (the anchor snapshot "
                          "of each task is the previous task's saved model)")
    out = []
    for i, item in enumerate(args.tasks):
        if not isinstance(item, dict) or "task" not in item:
            raise RecipeError(f"{source}: tasks[{i}] must be a mapping with a 'task'")
        for key in item:
            if key not in TASK_KEYS:
                raise RecipeError(f"{source}: unknown key 'tasks[{i}].{key}' (valid: {', '.join(TASK_KEYS)})")
        if item["task"] not in TASKS:
            raise RecipeError(f"{source}: key 'tasks[{i}].task': unknown task '{item['task']}' "
                              f"(valid: {', '.join(TASKS)})")
        reward = item.get("reward", "verifier")
        if reward != "verifier" and not (isinstance(reward, str) and Path(reward).is_dir()):
            raise RecipeError(f"{source}: key 'tasks[{i}].reward' must be 'verifier' (the task world's exact "
                              f"verifier) or a reward-model directory; {reward!r} is neither")
        steps = item.get("max_steps", training_args.max_steps)
        for key, value in (("max_steps", steps), ("n_train", item.get("n_train", args.n_train)),
                           ("difficulty", item.get("difficulty", args.difficulty))):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"{source}: key 'tasks[{i}].{key}' must be a positive integer, got {value!r}")
        out.append({"task": item["task"], "max_steps": steps, "n_train": item.get("n_train", args.n_train),
                    "difficulty": item.get("difficulty", args.difficulty), "reward": reward})
    return out


def task_labels(tasks: list[dict]) -> list[str]:
    """Metric names of the sequence's tasks: a task above difficulty 1, or met twice, is named with its difficulty
    (multihop_d2), so it is not read as the eval's task of that name (which is difficulty 1)."""
    names = [t["task"] for t in tasks]
    return [t["task"] if t["difficulty"] == 1 and names.count(t["task"]) == 1 else f"{t['task']}_d{t['difficulty']}"
            for t in tasks]


def task_dataset(task: str, n: int, difficulty: int, seed: int, system_prompt: str | None):
    """Training prompts of one task (train split) with the columns the verifier reward reads."""
    from datasets import Dataset

    from pipeline.tasks import get_task, make_split, to_prompt

    rows = [{"prompt": to_prompt(e, system_prompt), "task": e.task, "answer": e.answer, "question": e.question}
            for e in make_split(get_task(task), "train", n, seed, difficulty)]
    return Dataset.from_list(rows)


def transfer_metrics(matrix: list[list[float]]) -> dict[str, float]:
    """From R[j][i] (accuracy on task i after training task j, T x T): average score (final row), forgetting
    (mean over i < T-1 of the best earlier accuracy after learning i minus the final one; Chaudhry et al.
    2018) and backward transfer (mean of R[T-1][i] - R[i][i]; Lopez-Paz & Ranzato 2017)."""
    T = len(matrix)
    final = matrix[-1]
    metrics = {"average_score": sum(final) / T}
    if T > 1:
        best = [max(matrix[j][i] for j in range(i, T - 1)) for i in range(T - 1)]
        metrics["forgetting"] = sum(best[i] - final[i] for i in range(T - 1)) / (T - 1)
        metrics["backward_transfer"] = sum(final[i] - matrix[i][i] for i in range(T - 1)) / (T - 1)
    return metrics


def plot_matrix(path: Path, names: list[str], initial: list[float], matrix: list[list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [initial] + matrix
    labels = ["before"] + [f"after {i + 1}: {n}" for i, n in enumerate(names)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 0.55 * len(rows)))
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(names)), [f"task {i + 1}: {n}" for i, n in enumerate(names)])
    ax.set_yticks(range(len(rows)), labels)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="held-out accuracy")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict | None:
    (args, training_args, model_args), _, source = parse(
        [CPPOArguments, CPPOConfig, ModelArguments], argv, prog="python -m pipeline.cppo")
    tasks = check_tasks(args, training_args, model_args, source)
    names = [t["task"] for t in tasks]
    plan = (f"stage: cppo ({source}); model {model_args.model_name_or_path}; tasks "
            + " -> ".join(f"{t['task']} ({t['max_steps']} steps, reward {t['reward']})" for t in tasks)
            + f"; c_kr={training_args.c_kr}, weighting={training_args.weighting} (k={training_args.k}, "
            f"lb={training_args.lb}, ub={training_args.ub}); output_dir {training_args.output_dir}")
    if args.dry_run:
        print(plan)
        return None
    setup_logging(training_args)
    logger.info(plan)

    from pipeline.evaluate import evaluate
    from pipeline.modeling import load_model, load_tokenizer, resolve_model_path
    from pipeline.tasks import verifier_reward

    out = Path(training_args.output_dir)
    done = read_stage_result(out)
    if done is not None:
        logger.warning("%s is already complete: delete it or choose another output_dir to retrain", out)
        return done["metrics"]
    progress_path = out / "progress.json"
    initial_path = resolve_model_path(model_args, source)
    progress = {"tasks": names, "initial_model": initial_path, "initial": None, "done": []}
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress["tasks"] != names:
            raise RecipeError(f"{source}: key 'tasks': {out} holds a run of {progress['tasks']}, not {names}; "
                              "choose another output_dir")
    tokenizer = load_tokenizer(progress["initial_model"], model_args)

    main_process = training_args.process_index == 0

    from accelerate import PartialState

    def accuracies(model) -> list[float]:  # every task of the sequence, each at its own difficulty
        return [evaluate(model, tokenizer, [t["task"]], args.eval_n, difficulty=t["difficulty"],
                         system_prompt=args.system_prompt, max_new_tokens=training_args.max_completion_length,
                         state=PartialState())[f"accuracy/{t['task']}"] for t in tasks]

    if progress["initial"] is None:
        progress["initial"] = accuracies(load_model(progress["initial_model"], model_args, training_args))
        if main_process:
            atomic_write_json(progress_path, progress)
    for i, task in enumerate(tasks):
        if i < len(progress["done"]):
            continue
        # The snapshot: the policy as it was when this task began, frozen (an immutable saved directory).
        snapshot = progress["done"][-1]["model"] if progress["done"] else progress["initial_model"]
        task_args = copy.deepcopy(training_args)
        task_args.output_dir, task_args.max_steps = str(out / f"task{i + 1}-{task['task']}"), task["max_steps"]
        logger.info("task %d/%d: %s, anchored to %s", i + 1, len(tasks), task["task"], snapshot)
        model = load_model(snapshot, model_args, task_args)
        anchor = load_model(snapshot, model_args, task_args) if task_args.c_kr > 0 else None
        train = task_dataset(task["task"], task["n_train"], task["difficulty"], task_args.seed, args.system_prompt)
        # A reward-model path is loaded by TRL as AutoModelForSequenceClassification (num_labels=1).
        reward = verifier_reward if task["reward"] == "verifier" else task["reward"]
        trainer = CPPOTrainer(model=model, reward_funcs=reward, args=task_args, train_dataset=train,
                              processing_class=tokenizer, anchor_model=anchor)
        was_done = read_stage_result(task_args.output_dir) is not None
        metrics = train_and_save(trainer, f"cppo/{task['task']}", end=False)  # more tasks and evaluations follow
        if was_done:  # trained before an interruption, not yet recorded: its saved model is the result
            model = load_model(task_args.output_dir, model_args, task_args)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
        row = accuracies(model)
        logger.info("after task %d (%s): %s", i + 1, task["task"], dict(zip(names, row)))
        progress["done"].append({"task": task["task"], "model": task_args.output_dir, "accuracy": row,
                                 "train_loss": metrics.get("train_loss")})
        if main_process:
            atomic_write_json(progress_path, progress)
        del trainer, model, anchor

    matrix = [d["accuracy"] for d in progress["done"]]
    metrics = transfer_metrics(matrix)
    labels = task_labels(tasks)
    metrics.update({f"accuracy/{n}": v for n, v in zip(labels, matrix[-1])})
    report = {"tasks": names, "method": {"c_kr": training_args.c_kr, "weighting": training_args.weighting,
                                         "k": training_args.k, "lb": training_args.lb, "ub": training_args.ub},
              "initial": progress["initial"], "matrix": matrix, "metrics": metrics,
              "rows": "matrix[j][i] = held-out accuracy on task i after training task j"}
    if main_process:
        atomic_write_json(out / "forgetting.json", report)
        plot_matrix(out / "forgetting.png", labels, progress["initial"], matrix,
                    f"c_KR={training_args.c_kr}, weighting={training_args.weighting}")
        write_stage_result(out, "cppo", metrics, {"model": progress["done"][-1]["model"],
                                                  "forgetting": str(out / "forgetting.json")})
    PartialState().wait_for_everyone()  # every rank done before any tears its process group down
    PartialState().destroy_process_group()  # what trainer.end() does, once after the last task
    return metrics


if __name__ == "__main__":
    cli(main)

"""EvoPrompt (Guo et al., ICLR 2024): evolve the task model's system prompt; no gradients, so API-only
models work too.

    python -m pipeline.evoprompt --config recipes/tiny/evoprompt.yaml [--algorithm de]

Fitness is the task model's score on a dev split with the prompt as its system message. GA: roulette-wheel
parents, one operator call per child (crossover then mutation), the top N of parents + children survive.
DE: per member, two random donors and the current best, one call, the child replaces the member only if
better. The operator is an LLM (any generation-stage teacher) or, offline, the lexical phrase-bank operator;
the run says which. The best evolved prompt and the best initial prompt are then scored once on the held-out
test split, which the search never saw. Outputs in `output_dir`: best_prompt.txt (the prompt, for the next
stage: `--system_prompt "$(cat .../best_prompt.txt)"`), best_prompt.json, history.json (every prompt, its
parents, its score; also the resume state, written after every generation), fitness.png, and the caches
that make a killed run resume without redoing work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import statistics
import time
from pathlib import Path
from typing import Literal

from pipeline.config import RecipeError, cli, load_yaml, parse
from pipeline.evo.operators import LexicalOperator, LLMOperator, load_phrase_bank
from pipeline.evo.search import (Candidate, LocalTaskModel, Scorer, de_generation, ga_generation, prompt_id)
from pipeline.generation.teachers import RequestCache, make_teacher
from pipeline.io import atomic_write_json, atomic_write_text, read_jsonl, write_stage_result
from pipeline.tasks import Example, get_task, make_split

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvoPromptArguments:
    output_dir: str = dataclasses.field(metadata={"help": "Where best_prompt.txt, history.json, fitness.png go."})
    algorithm: Literal["ga", "de"] = "ga"
    population_size: int = dataclasses.field(default=10, metadata={"help": "Paper default 10."})
    generations: int = dataclasses.field(default=10, metadata={"help": "Paper default 10."})
    operator: dict = dataclasses.field(
        default_factory=lambda: {"type": "lexical", "phrase_bank": "data/evoprompt/phrases.yaml"},
        metadata={"help": "{type: lexical, phrase_bank, mutation_rate} or a teacher mapping {type: openai|"
                  "transformers, ...} (temperature defaults to the paper's 0.5)."})
    initial_prompts: str = dataclasses.field(
        default="data/evoprompt/initial_prompts.yaml",
        metadata={"help": "YAML {prompts: [...]}: the best N by dev score start the search; paraphrases fill up."})
    task_model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "Local task model (greedy). Or set task_model_endpoint."})
    task_model_endpoint: dict | None = dataclasses.field(
        default=None, metadata={"help": "Task model behind an OpenAI-compatible endpoint: {type: openai, base_url, "
                                "model, api_key_env, temperature: 0, ...}."})
    batch_size: int = 64
    max_new_tokens: int = 64
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add", "copy", "reverse", "sort", "kv_lookup",
                                                                  "multihop"])
    n_dev: int = dataclasses.field(default=10, metadata={"help": "Dev examples per task (fitness)."})
    n_test: int = dataclasses.field(default=50, metadata={"help": "Held-out test examples per task (final report)."})
    screen_every: int = dataclasses.field(
        default=1, metadata={"help": "Racing: a child is first scored on every k-th dev example; only one that comes "
                             "within screen_margin of the population's worst is scored on the rest (1 = off)."})
    screen_margin: float = 0.05
    difficulty: int = 1
    data_seed: int = dataclasses.field(default=0, metadata={"help": "Which dev examples are drawn."})
    dev_file: str | None = dataclasses.field(
        default=None, metadata={"help": "jsonl {question, answer, task?}: dev set instead of the task world."})
    test_file: str | None = dataclasses.field(default=None, metadata={"help": "jsonl test set (with dev_file)."})
    metric: Literal["verifier", "exact_match", "rouge_l"] = "verifier"
    max_prompt_chars: int = dataclasses.field(default=1000, metadata={"help": "Longer operator outputs are rejected."})
    seed: int = 0
    stage: str = "evoprompt"

    def __post_init__(self):
        if self.population_size < 3 or self.generations < 0:
            raise ValueError("key 'population_size' must be >= 3 (DE needs two donors besides the member) and "
                             "'generations' >= 0")
        if (self.task_model_name_or_path is None) == (self.task_model_endpoint is None):
            raise ValueError("set exactly one of 'task_model_name_or_path' and 'task_model_endpoint'")
        if (self.dev_file is None) != (self.test_file is None):
            raise ValueError("keys 'dev_file' and 'test_file' go together")
        if self.dev_file is None:
            for t in self.tasks:
                try:
                    get_task(t)
                except KeyError as e:
                    raise ValueError(f"key 'tasks': {e.args[0]}") from None
        if not 0 <= self.screen_margin <= 1:
            raise ValueError("key 'screen_margin' must be in [0, 1]")
        if min(self.n_dev, self.n_test, self.difficulty, self.batch_size, self.max_new_tokens, self.screen_every) < 1:
            raise ValueError("keys 'n_dev', 'n_test', 'difficulty', 'batch_size', 'max_new_tokens', 'screen_every' "
                             "must be >= 1")


def make_operator(spec: dict, args: EvoPromptArguments, cache_path: Path, source: str):
    where = f"{source}: operator"
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: must be a mapping with a 'type'")
    if spec.get("type") == "lexical":
        for k in spec:
            if k not in ("type", "phrase_bank", "mutation_rate"):
                raise RecipeError(f"{where}: unknown key '{k}' for operator type 'lexical' (valid: phrase_bank, "
                                  "mutation_rate)")
        if "phrase_bank" not in spec:
            raise RecipeError(f"{where}: type 'lexical' needs 'phrase_bank'")
        rate = spec.get("mutation_rate", 0.3)
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 0.5:
            raise RecipeError(f"{where}: key 'mutation_rate' must be a number in [0, 0.5]")
        return LexicalOperator(load_phrase_bank(spec["phrase_bank"]), args.seed, float(rate))
    if spec.get("type") == "oracle":
        raise RecipeError(f"{where}: the oracle teacher only answers task-world queries; use lexical, openai or "
                          "transformers")
    teacher = make_teacher({"temperature": 0.5, **spec}, where)  # the paper's operator temperature
    return LLMOperator(teacher, RequestCache(cache_path), args.seed, args.max_prompt_chars)


def load_prompts(path: str) -> list[str]:
    prompts = load_yaml(path).get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise RecipeError(f"{path}: key 'prompts' must be a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise RecipeError(f"{path}: prompts[{i}] must be a non-empty string")
    return list(dict.fromkeys(" ".join(p.split()) for p in prompts))


def load_examples(path: str, metric: str) -> list[Example]:
    out = []
    for n, row in read_jsonl(path, "dataset"):
        if not isinstance(row.get("question"), str) or row.get("answer") is None:
            raise RecipeError(f"{path}: line {n}: needs a string 'question' and an 'answer'")
        if metric == "verifier":
            try:
                get_task(str(row.get("task")))
            except KeyError as e:
                raise RecipeError(f"{path}: line {n}: metric 'verifier' needs a task-world 'task': {e.args[0]}") from None
        out.append(Example(row.get("task") or "", row["question"], str(row["answer"])))
    if not out:
        raise RecipeError(f"{path}: no rows")
    return out


def load_data(args: EvoPromptArguments) -> tuple[list[Example], list[Example]]:
    if args.dev_file:
        dev, test = load_examples(args.dev_file, args.metric), load_examples(args.test_file, args.metric)
        shared = {e.question for e in dev} & {e.question for e in test}
        if shared:
            raise RecipeError(f"{args.test_file}: {len(shared)} questions also in {args.dev_file}; the test split "
                              "must be held out")
        return dev, test
    dev = [e for t in args.tasks for e in make_split(get_task(t), "dev", args.n_dev, args.data_seed, args.difficulty)]
    test = [e for t in args.tasks for e in make_split(get_task(t), "test", args.n_test, 0, args.difficulty)]
    return dev, test


def fingerprint(args: EvoPromptArguments) -> str:
    """What the search depends on: a resumed run with a different recipe would mix two searches."""
    fields = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "stage", "batch_size", "n_test")}
    files = [args.initial_prompts, args.operator.get("phrase_bank")] if isinstance(args.operator, dict) else []
    blob = json.dumps(fields, sort_keys=True, default=str) + "".join(
        Path(f).read_text() for f in files if f and Path(f).is_file())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plot(generations: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [g["generation"] for g in generations]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [g["best"] for g in generations], marker="o", label="best")
    ax.plot(x, [g["mean"] for g in generations], marker=".", label="mean")
    ax.set(xlabel="generation", ylabel="dev fitness", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def initial_population(args, prompts: list[str], operator, score) -> tuple[list[Candidate], list[Candidate]]:
    """The best `population_size` given prompts by dev score; paraphrases of the best ones fill the rest.
    Returns (population, every prompt scored on the way)."""
    cands = [Candidate(p, s, 0, "initial") for p, s in zip(prompts, score(prompts))]
    population = sorted(cands, key=lambda c: -c.score)[:args.population_size]
    scored = list(cands)
    for attempt in range(5):
        missing = args.population_size - len(population)
        if missing <= 0:
            break
        sources = [population[i % len(population)] for i in range(missing)]
        texts = operator.paraphrase([c.prompt for c in sources], -1 - attempt)
        new = [(t, c) for t, c in zip(texts, sources) if t and t not in {p.prompt for p in population}]
        new = list({t: (t, c) for t, c in new}.values())
        for (t, c), s in zip(new, score([t for t, _ in new])):
            population.append(Candidate(t, s, 0, "paraphrase", [c.id]))
            scored.append(population[-1])
    if len(population) < args.population_size:
        raise RecipeError(f"{args.initial_prompts}: only {len(population)} distinct initial prompts after "
                          f"paraphrasing; give more prompts or lower 'population_size'")
    return population, scored


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([EvoPromptArguments], argv, prog="python -m pipeline.evoprompt")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # Operator, task model, data.
    prompts = load_prompts(args.initial_prompts)
    operator = make_operator(args.operator, args, out / "operator_cache.jsonl", source)
    if args.task_model_name_or_path:
        from pipeline.modeling import check_model_path

        check_model_path(args.task_model_name_or_path, source, "task_model_name_or_path")
        task_model = LocalTaskModel(args.task_model_name_or_path, args.batch_size, args.max_new_tokens)
    else:
        task_model = make_teacher(args.task_model_endpoint, f"{source}: task_model_endpoint")
    dev, test = load_data(args)
    scorer = Scorer(task_model, RequestCache(out / "score_cache.jsonl"), args.metric)

    def dev_score(texts: list[str]) -> list[float]:
        return scorer.scores(texts, dev) if texts else []

    screened_out: set[str] = set()

    def raced_score(floor: float):
        """Children's dev fitness with racing: a child scored on the screen (every k-th dev example) more than
        screen_margin below the population's worst keeps that partial score, which ranks it below every member,
        so it cannot survive (GA) or replace (DE); the others are scored on all of dev (the screen's replies are
        cached). Most children of a small model are clearly worse; they now cost a fraction of the dev set."""
        def score(texts: list[str]) -> list[float]:
            if args.screen_every == 1 or not texts:
                return dev_score(texts)
            partial = scorer.scores(texts, dev[::args.screen_every])
            out = [p if p < floor - args.screen_margin else None for p in partial]
            screened_out.update(t for t, p in zip(texts, out) if p is not None)
            full = iter(dev_score([t for t, p in zip(texts, out) if p is None]))
            return [p if p is not None else next(full) for p in out]
        return score

    # Resume: history.json is the state after the last finished generation.
    fp, history_path = fingerprint(args), out / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else None
    if history and history["fingerprint"] != fp:
        raise RecipeError(f"{history_path}: made by a different recipe (search settings or prompt files changed); "
                          "use a new output_dir or delete it")
    if history:
        population = [Candidate(**c) for c in history["population"]]
        logger.info("resuming after generation %d", history["generations"][-1]["generation"])
    else:
        population, scored = initial_population(args, prompts, operator, dev_score)
        history = {"fingerprint": fp, "operator": operator.name, "algorithm": args.algorithm,
                   "candidates": [dataclasses.asdict(c) for c in scored], "generations": []}

    def checkpoint(generation: int) -> None:
        scores = [c.score for c in population]
        best = max(population, key=lambda c: c.score)
        history["generations"].append({"generation": generation, "best": best.score, "mean": sum(scores) / len(scores),
                                       "best_id": best.id, "population": [c.id for c in population]})
        history["population"] = [dataclasses.asdict(c) for c in population]
        history["malformed_operator_replies"] = history.get("malformed_operator_replies", 0) + operator.malformed
        operator.malformed = 0
        atomic_write_json(history_path, history)
        logger.info("generation %d: best %.3f mean %.3f  %r", generation, best.score, sum(scores) / len(scores),
                    best.prompt[:100])

    if not history["generations"]:
        checkpoint(0)
    step = ga_generation if args.algorithm == "ga" else de_generation
    for generation in range(history["generations"][-1]["generation"] + 1, args.generations + 1):
        population, children = step(population, operator, raced_score(min(c.score for c in population)), generation,
                                    random.Random(f"{args.seed}/{args.algorithm}/{generation}"))
        history["candidates"] += [{**dataclasses.asdict(c), "screened_out": c.prompt in screened_out} for c in children]
        checkpoint(generation)

    # Final report on the held-out test split only: the best evolved prompt vs the best initial one.
    initial = [c for c in history["candidates"] if c["generation"] == 0]
    best_initial = max(initial, key=lambda c: c["score"])["prompt"]
    best = max(population, key=lambda c: c.score)
    evolved_values, initial_values = scorer.per_example([best.prompt, best_initial], test)
    test_scores = {best.prompt: statistics.fmean(evolved_values), best_initial: statistics.fmean(initial_values)}
    # Both prompts answer the same test questions: the gain's standard error is the paired one.
    diffs = [a - b for a, b in zip(evolved_values, initial_values)]
    gain_se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    name = "accuracy" if args.metric == "verifier" else args.metric
    metrics = {"operator": operator.name, "algorithm": args.algorithm,
               f"{name}/test_best_evolved": test_scores[best.prompt],
               f"{name}/test_best_initial": test_scores[best_initial],
               f"{name}/test_gain": statistics.fmean(diffs), f"{name}/test_gain_se": gain_se,
               "dev_fitness/best_evolved": best.score, "dev_fitness/best_initial": max(c["score"] for c in initial),
               "generations": args.generations, "prompts_scored": len(history["candidates"]),
               "prompts_screened_out": sum(bool(c.get("screened_out")) for c in history["candidates"]),
               "malformed_operator_replies": history["malformed_operator_replies"],
               "score_cache_hits": scorer.hits, "score_cache_misses": scorer.misses,
               "seconds": round(time.perf_counter() - start, 1)}
    logger.info("test: best evolved %.3f vs best initial %.3f, gain %+.3f ± %.3f (paired SE; operator: %s)",
                test_scores[best.prompt], test_scores[best_initial], statistics.fmean(diffs), gain_se, operator.name)

    atomic_write_text(out / "best_prompt.txt", best.prompt + "\n")
    atomic_write_json(out / "best_prompt.json", {
        "prompt": best.prompt, "id": prompt_id(best.prompt), "dev_fitness": best.score,
        "test_score": test_scores[best.prompt], "best_initial_prompt": best_initial,
        "best_initial_test_score": test_scores[best_initial], "metric": args.metric, "n_dev": len(dev),
        "n_test": len(test), "operator": operator.name, "algorithm": args.algorithm})
    plot(history["generations"], out / "fitness.png", f"EvoPrompt {args.algorithm.upper()} ({operator.name.split(' ')[0]})")
    write_stage_result(out, args.stage, metrics, {"best_prompt": str(out / "best_prompt.txt"),
                                                  "history": str(history_path), "plot": str(out / "fitness.png")})
    return metrics


if __name__ == "__main__":
    cli(main)

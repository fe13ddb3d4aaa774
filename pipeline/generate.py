"""Orca-style synthetic data: queries + system prompts -> teacher replies -> SFT rows and DPO pairs.

    python -m pipeline.generate --config recipes/tiny/generate.yaml [--styles '[concise]']

Queries come from the task world (`tasks`, `n_per_task`) and/or a jsonl file (`queries_file`, rows with
`question` and optional `task`/`answer`). Each gets a system prompt from the library that fits its task
and the recipe's `styles`; every teacher answers it `n_samples` times. Replies are scored by the task
verifier or an LLM judge. SFT keeps the best reply that passes `sft_min_score`; DPO pairs the best with
a worse one (Zephyr: a random worse one; or the worst). Queries are deduplicated and decontaminated
before any request is sent. Every finished request is in `<output_dir>/cache.jsonl`, so a killed run
resumes where it stopped and produces the same rows as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pipeline.config import RecipeError, cli, parse
from pipeline.generation.hygiene import binarize, contaminated, cut_at_first_difference, dedup
from pipeline.generation.prompts import STYLES, load_library
from pipeline.generation.teachers import (RequestCache, Request, judge_messages, make_teacher, parse_rating,
                                          request_key, run_requests)
from pipeline.io import atomic_write_text, read_jsonl, write_stage_result
from pipeline.tasks import TASKS, Example, get_task, make_split, split_of

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerateArguments:
    output_dir: str = dataclasses.field(metadata={"help": "Writes sft.jsonl, dpo.jsonl, corpus.txt, cache.jsonl here."})
    tasks: list[str] = dataclasses.field(default_factory=list, metadata={"help": "Task-world tasks to draw queries from."})
    n_per_task: int = dataclasses.field(default=200, metadata={"help": "Queries per task (train split)."})
    task_counts: dict[str, int] = dataclasses.field(
        default_factory=dict, metadata={"help": "Per-task query counts that override n_per_task, e.g. {passkey: 500}."})
    difficulty: int = 1
    task_difficulty: dict[str, int | list[int]] = dataclasses.field(
        default_factory=dict,
        metadata={"help": "Per-task difficulty that overrides 'difficulty'; a list splits the task's count evenly "
                  "across its levels, e.g. {passkey: [1, 2]} (passkey: 48 and 96 filler words)."})
    queries_file: str | None = dataclasses.field(
        default=None, metadata={"help": "jsonl of {question, task?, answer?, id?}: queries besides the task world."})
    system_prompts: str = "data/system_prompts.yaml"
    styles: list[str] = dataclasses.field(
        default_factory=lambda: list(STYLES),
        metadata={"help": "Which system-prompt styles to use: steps, explain, concise. [concise] = answer-only data."})
    system_prompt_ids: list[str] = dataclasses.field(default_factory=list, metadata={"help": "Restrict to these ids."})
    prompt_erasure: bool = dataclasses.field(
        default=False, metadata={"help": "Orca 2: generate with the specific system prompt, train with the generic one."})
    erased_system_prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "Under prompt_erasure, the system message rows get (default: the library's "
                                "generic one); '' = none, which is how task-world evaluation prompts a model."})
    teachers: list[dict] = dataclasses.field(
        default_factory=lambda: [{"type": "oracle"}],
        metadata={"help": "Each {type: oracle|openai|transformers, ...}; see pipeline/generation/teachers.py."})
    n_samples: int = dataclasses.field(default=4, metadata={"help": "Completions per query per teacher."})
    scoring: Literal["verifier", "judge"] = "verifier"
    judge: dict | None = dataclasses.field(default=None, metadata={"help": "A teacher mapping used as the judge."})
    sft_min_score: float | None = dataclasses.field(
        default=None, metadata={"help": "SFT keeps a query's best reply only at or above this (verifier: 1, judge: 7)."})
    binarize: Literal["zephyr", "best_vs_worst"] = "zephyr"
    cut_rejected: bool = dataclasses.field(
        default=False,
        metadata={"help": "Cut each DPO rejected reply right after its first character that differs from the chosen "
                  "reply (a step-level pair): the preference then falls on the mistake, not on the correct work "
                  "that follows from it. For verifier-scored worked solutions in one canonical format (free-form "
                  "replies differ from the first word on). The whole reply is kept in column 'rejected_full'."})
    dedup_threshold: float = dataclasses.field(
        default=0.85, metadata={"help": "Jaccard (word 3-grams) above which queries are near-duplicates; > 1 = off."})
    decontaminate_against: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "jsonl eval sets (question/prompt/messages) to remove from the queries."})
    save_datasets: bool = dataclasses.field(default=True, metadata={"help": "Also Dataset.save_to_disk sft/ and dpo/."})
    write_corpus: bool = dataclasses.field(default=True, metadata={"help": "Write corpus.txt (tokenizer training text)."})
    seed: int = 0

    def __post_init__(self):
        for t in self.tasks:
            try:
                get_task(t)
            except KeyError as e:
                raise ValueError(f"key 'tasks': {e.args[0]}") from None
        bad = [s for s in self.styles if s not in STYLES]
        if bad or not self.styles:
            raise ValueError(f"key 'styles' must be a non-empty list of {', '.join(STYLES)}, got {self.styles}")
        unknown = sorted(set(self.task_counts) - set(self.tasks))
        if unknown or any(not isinstance(v, int) or v < 1 for v in self.task_counts.values()):
            raise ValueError(f"key 'task_counts' must map tasks of 'tasks' to counts >= 1, got {self.task_counts}")
        levels = {t: v if isinstance(v, list) else [v] for t, v in self.task_difficulty.items()}
        bad_level = lambda d: not isinstance(d, int) or isinstance(d, bool) or d < 1  # noqa: E731
        if set(levels) - set(self.tasks) or any(not v or any(map(bad_level, v)) for v in levels.values()):
            raise ValueError("key 'task_difficulty' must map tasks of 'tasks' to a level >= 1 or a non-empty list of "
                             f"them, got {self.task_difficulty}")
        self.task_difficulty = levels
        if not self.tasks and not self.queries_file:
            raise ValueError("no queries: set 'tasks' or 'queries_file'")
        if self.n_samples < 1 or not self.teachers:
            raise ValueError("key 'n_samples' must be >= 1 and 'teachers' non-empty")
        if self.scoring == "judge" and not self.judge:
            raise ValueError("key 'scoring: judge' needs a 'judge' teacher mapping")


@dataclasses.dataclass
class Query:
    id: str
    question: str
    example: Example | None  # a task-world example: answer known, verifiable


def load_queries(args: GenerateArguments) -> list[Query]:
    queries = []
    for t in args.tasks:
        n, levels = args.task_counts.get(t, args.n_per_task), args.task_difficulty.get(t, [args.difficulty])
        for i, level in enumerate(levels):  # the first levels take the remainder
            queries += [Query(e.id, e.question, e)
                        for e in make_split(get_task(t), "train", n // len(levels) + (i < n % len(levels)), args.seed,
                                            level)]
    seen = {q.id for q in queries}
    if args.queries_file:
        path = Path(args.queries_file)
        for n, row in read_jsonl(path, "key 'queries_file'"):
            if not isinstance(row.get("question"), str):
                raise RecipeError(f"{path}: line {n}: needs a string 'question'")
            example = None
            if row.get("task") is not None:
                if row["task"] not in TASKS or row.get("answer") is None:
                    raise RecipeError(f"{path}: line {n}: 'task' must be one of {', '.join(TASKS)} and come with 'answer'")
                example = Example(row["task"], row["question"], str(row["answer"]), tuple(row.get("steps") or ()))
            qid = str(row.get("id") or (example.id if example else Example("", row["question"], "").id))
            # Without an explicit id, a repeated question is a duplicate query (dropped by dedup below).
            if row.get("id") is not None and qid in seen:
                raise RecipeError(f"{path}: line {n}: duplicate id '{qid}'")
            seen.add(qid)
            queries.append(Query(qid, row["question"], example))
    return queries


def eval_texts(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        for n, row in read_jsonl(p, "key 'decontaminate_against'"):
            msgs = row.get("messages") or row.get("prompt")
            if isinstance(row.get("question"), str):
                texts.append(row["question"])
            elif isinstance(msgs, list):
                texts.extend(m["content"] for m in msgs if m.get("role") == "user")
            elif isinstance(msgs, str):
                texts.append(msgs)
            else:
                raise RecipeError(f"{p}: line {n}: needs 'question', 'prompt' or 'messages'")
    return texts


def clean_queries(queries: list[Query], args: GenerateArguments) -> tuple[list[Query], dict]:
    """Drop exact/near duplicate queries, and queries that belong to an eval set."""
    keep, n_exact, n_near = dedup([q.question for q in queries], args.dedup_threshold)
    queries = [queries[i] for i in keep]
    # Task-world eval splits are fixed by content hash: a query from them is contaminated by definition.
    held_out = [q.example is not None and split_of(q.example.id) != "train" for q in queries]
    against = eval_texts(args.decontaminate_against)
    listed = ([False] * len(queries) if not against
              else contaminated([q.question for q in queries], against, min(args.dedup_threshold, 1.0)))
    clean = [q for q, a, b in zip(queries, held_out, listed) if not (a or b)]
    stats = {"queries_exact_duplicates": n_exact, "queries_near_duplicates": n_near,
             "queries_contaminated": len(queries) - len(clean)}
    return clean, stats


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([GenerateArguments], argv, prog="python -m pipeline.generate")
    start = time.perf_counter()
    library = load_library(args.system_prompts)
    teachers = [make_teacher(spec, f"{source}: teachers[{i}]") for i, spec in enumerate(args.teachers)]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise RecipeError(f"{source}: key 'teachers': names must be unique, got {names}")
    judge = make_teacher(args.judge, f"{source}: judge") if args.scoring == "judge" else None
    min_score = args.sft_min_score if args.sft_min_score is not None else (1.0 if args.scoring == "verifier" else 7.0)
    out = Path(args.output_dir)

    # Data: queries, cleaned before any request is spent on them; one system prompt each.
    queries, stats = clean_queries(load_queries(args), args)
    if args.scoring == "verifier" and any(q.example is None for q in queries):
        raise RecipeError(f"{source}: key 'scoring: verifier' needs task/answer on every query; use 'scoring: judge'")
    prompts = {q.id: library.choose(random.Random(f"{args.seed}/{q.id}"), q.example.task if q.example else None,
                                    args.styles, args.system_prompt_ids) for q in queries}

    # Work: every teacher answers every query n_samples times; then scores.
    cache = RequestCache(out / "cache.jsonl")
    try:
        candidates: dict[str, list[tuple[str, Request]]] = {q.id: [] for q in queries}
        for teacher in teachers:
            reqs = []
            for q in queries:
                sp = prompts[q.id]
                messages = ({"role": "system", "content": sp.text}, {"role": "user", "content": q.question})
                for k in range(args.n_samples):
                    r = Request(request_key(teacher.identity, messages, k, args.seed), messages, k, args.seed,
                                q.example, sp.style)
                    reqs.append(r)
                    candidates[q.id].append((teacher.name, r))
            run_requests(teacher, reqs, cache, desc=f"generate[{teacher.name}]")
        replies = cache.replies
        scores = score(queries, candidates, replies, judge, cache, args)
    finally:
        cache.close()
    # A reply cut at the token limit is not a complete sample: it never becomes an SFT row or a DPO side.
    n_truncated = 0
    for q in queries:
        for i, (_, r) in enumerate(candidates[q.id]):
            if r.key in cache.truncated:
                scores[q.id][i] = None
                n_truncated += 1
    n_identical = warn_identical_samples(queries, candidates, replies, teachers, args.n_samples)

    sft, dpo = [], []
    for q in queries:
        sp, cands = prompts[q.id], candidates[q.id]
        system = (library.generic if args.erased_system_prompt is None else args.erased_system_prompt) \
            if args.prompt_erasure else sp.text
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q.question}]
        s = scores[q.id]
        meta = {"id": q.id, "task": q.example.task if q.example else None, "system_prompt_id": sp.id, "seed": args.seed}
        best = max(range(len(cands)), key=lambda i: (s[i] if s[i] is not None else float("-inf"), -i))
        if s[best] is not None and s[best] >= min_score:
            name, r = cands[best]
            sft.append({"messages": prompt + [{"role": "assistant", "content": replies[r.key]}], **meta,
                        "teacher": name, "sample": r.sample, "score": s[best]})
        pair = binarize(s, args.binarize, random.Random(f"{args.seed}/{q.id}/pair"))
        if pair is not None:
            (cn, cr), (rn, rr) = cands[pair[0]], cands[pair[1]]
            chosen, rejected = replies[cr.key], replies[rr.key]
            full = {"rejected_full": rejected} if args.cut_rejected else {}
            if args.cut_rejected:
                rejected = cut_at_first_difference(chosen, rejected)
            dpo.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], **meta,
                        "chosen_teacher": cn, "rejected_teacher": rn,
                        "score_chosen": s[pair[0]], "score_rejected": s[pair[1]], **full})

    # Save: jsonl (what the SFT/DPO recipes read) and datasets on disk, each written atomically.
    artifacts = {"sft": str(out / "sft.jsonl"), "dpo": str(out / "dpo.jsonl")}
    for name, rows in (("sft", sft), ("dpo", dpo)):
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if args.save_datasets:
            save_dataset(rows, out / name)
    if args.write_corpus:
        atomic_write_text(out / "corpus.txt", corpus(sft, dpo, library))
        artifacts["corpus"] = str(out / "corpus.txt")
    n_scored = sum(s is not None for v in scores.values() for s in v)
    n_correct = sum(s is not None and s >= min_score for v in scores.values() for s in v)
    if n_truncated:
        logger.warning("generate: %d of %d replies were cut at the token limit (finish_reason 'length') and left "
                       "out of the SFT/DPO rows; raise the teacher's max_tokens", n_truncated,
                       sum(len(c) for c in candidates.values()))
    metrics = {"queries": len(queries), **stats, "completions": n_scored, "completions_truncated": n_truncated,
               "queries_identical_samples": n_identical, "sft_rows": len(sft), "dpo_pairs": len(dpo),
               "completion_pass_rate": round(n_correct / max(n_scored, 1), 4),
               "seconds": round(time.perf_counter() - start, 2)}
    logger.info("generate: %s", metrics)
    write_stage_result(out, "generate", metrics, artifacts)
    return metrics


def score(queries, candidates, replies, judge, cache, args) -> dict[str, list[float | None]]:
    """Per query, one score per candidate: 1/0 from the task verifier, or a judge's 1-10 rating (None if unparsable)."""
    if judge is None:
        return {q.id: [float(get_task(q.example.task).verify(q.example, replies[r.key])) for _, r in candidates[q.id]]
                for q in queries}
    reqs = {}
    for q in queries:
        for _, r in candidates[q.id]:
            msgs = judge_messages(r.messages, replies[r.key])
            reqs[r.key] = Request(request_key(judge.identity, msgs, 0, args.seed), msgs, 0, args.seed)
    ratings = run_requests(judge, list(reqs.values()), cache, desc=f"judge[{judge.name}]")
    out = {q.id: [parse_rating(ratings[reqs[r.key].key]) for _, r in candidates[q.id]] for q in queries}
    unusable = sum(x is None for v in out.values() for x in v)
    if unusable * 2 > len(reqs):
        logger.warning("judge '%s': %d of %d replies have no usable 'Rating: <1-10>' line; those candidates are "
                       "unscored (check the judge model and its max_tokens)", judge.name, unusable, len(reqs))
    return out


def warn_identical_samples(queries, candidates, replies, teachers, n_samples: int) -> int:
    """Queries for which some teacher gave n_samples identical replies (a server that decodes greedily, e.g.
    `transformers serve` with a model whose generation config has do_sample false): they give no DPO pair. Only
    endpoints asked to sample are counted: the oracle is deterministic by design, and a local model samples
    whenever its temperature is > 0 (identical samples there are its confidence, not a server setting)."""
    endpoints = [t for t in teachers if getattr(t, "base_url", None) and getattr(t, "temperature", 0) > 0]
    if n_samples < 2 or not endpoints:
        return 0
    n = 0
    for q in queries:
        for t in endpoints:
            texts = [replies[r.key] for name, r in candidates[q.id] if name == t.name]
            if len(set(texts)) == 1:
                n += 1
                break
    if n:
        logger.warning("generate: for %d of %d queries all %d samples of a teacher are identical: the endpoint "
                       "does not sample (temperature ignored, or a greedy generation config), so they give no "
                       "DPO pairs", n, len(queries), n_samples)
    return n


def save_dataset(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        Dataset.from_list(rows).save_to_disk(str(tmp / "ds"))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp / "ds", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus(sft: list[dict], dpo: list[dict], library) -> str:
    """All the text the tiny tokenizer should know: system prompts, questions and replies."""
    lines = [library.generic] + [p.text for p in library.prompts]
    for row in sft:
        lines += [m["content"] for m in row["messages"] if m["role"] != "system"]
    for row in dpo:
        lines += [row["chosen"][0]["content"], row["rejected"][0]["content"]]
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"


if __name__ == "__main__":
    cli(main)

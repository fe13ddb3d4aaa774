"""EvoPrompt's search: fitness (a cached scorer), selection, and one GA or DE generation.

A population is a list of `Candidate`s. Every candidate the search ever made (kept or not) goes to the
run's history with its parents and score, so a run can be audited prompt by prompt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from typing import Callable

from pipeline.generation.teachers import Request, RequestCache, request_key, run_requests
from pipeline.tasks import Example, extract_answer, get_task, normalize, to_prompt


@dataclasses.dataclass
class Candidate:
    prompt: str
    score: float
    generation: int
    origin: str  # initial, paraphrase, ga, de
    parents: list[str] = dataclasses.field(default_factory=list)  # parent ids

    @property
    def id(self) -> str:
        return prompt_id(self.prompt)


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Fitness
# ---------------------------------------------------------------------------------------------


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    a, b = reply.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def metric_value(metric: str, example: Example, reply: str) -> float:
    if metric == "verifier":
        return float(get_task(example.task).verify(example, reply))
    if metric == "exact_match":  # the `Answer:` line if there is one, else the whole reply
        got = extract_answer(reply)
        return float(normalize(got if got is not None else reply) == normalize(example.answer))
    if metric == "rouge_l":
        return rouge_l(reply, example.answer)
    raise ValueError(f"unknown metric {metric!r}")


class LocalTaskModel:
    """A local transformers model, loaded once, answering like a teacher (greedy, batched)."""

    def __init__(self, path: str, batch_size: int = 64, max_new_tokens: int = 64):
        from pipeline.evaluate import load_for_generation

        self.model, self.tokenizer = load_for_generation(path)
        self.identity = f"local:{path}:greedy:{max_new_tokens}"
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    async def complete(self, requests: list[Request], done) -> None:
        from pipeline.evaluate import generate_replies

        # Big chunks keep generate's batches full; replies are cached chunk by chunk.
        step = self.batch_size * 4
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            for r, text in zip(chunk, generate_replies(self.model, self.tokenizer, [list(r.messages) for r in chunk],
                                                       self.batch_size, self.max_new_tokens)):
                done(r, text, False)
            await asyncio.sleep(0)


class Scorer:
    """Fitness of a system prompt = mean metric of the task model's replies over `examples` (its own dev
    or test set). Replies are cached per (task model, prompt, example): a prompt seen again, or a run
    resumed after a kill, costs no generation."""

    def __init__(self, task_model, cache: RequestCache, metric: str = "verifier"):
        self.task_model, self.cache, self.metric = task_model, cache, metric
        self.hits = self.misses = 0

    def _request(self, prompt: str, example: Example) -> Request:
        messages = tuple(to_prompt(example, prompt))
        return Request(request_key(self.task_model.identity, messages, 0, 0), messages, 0, 0, example)

    def replies(self, prompts: list[str], examples: list[Example]) -> dict[tuple[str, str], str]:
        reqs = {(p, e.id): self._request(p, e) for p in dict.fromkeys(prompts) for e in examples}
        cached = sum(self.cache.get(r.key) is not None for r in reqs.values())
        self.hits, self.misses = self.hits + cached, self.misses + len(reqs) - cached
        got = run_requests(self.task_model, list(reqs.values()), self.cache, desc="score")
        return {k: got[r.key] for k, r in reqs.items()}

    def per_example(self, prompts: list[str], examples: list[Example]) -> list[list[float]]:
        """Each prompt's metric on each example, in the examples' order (paired statistics need them)."""
        replies = self.replies(prompts, examples)
        return [[metric_value(self.metric, e, replies[(p, e.id)]) for e in examples] for p in prompts]

    def scores(self, prompts: list[str], examples: list[Example]) -> list[float]:
        return [sum(v) / len(v) for v in self.per_example(prompts, examples)]


# ---------------------------------------------------------------------------------------------
# Selection and one generation
# ---------------------------------------------------------------------------------------------


def roulette_probabilities(scores: list[float]) -> list[float]:
    """p_i = s_i / sum(s): fitter prompts are picked more often; uniform if every score is 0."""
    if any(s < 0 for s in scores):
        raise ValueError("roulette-wheel selection needs non-negative scores")
    total = sum(scores)
    return [s / total for s in scores] if total > 0 else [1 / len(scores)] * len(scores)


def roulette_pair(scores: list[float], rng: random.Random) -> tuple[int, int]:
    """Two distinct parents, each drawn with probability proportional to its score (the second among the rest)."""
    first = rng.choices(range(len(scores)), weights=roulette_probabilities(scores))[0]
    rest = [i for i in range(len(scores)) if i != first]
    second = rng.choices(rest, weights=roulette_probabilities([scores[i] for i in rest]))[0]
    return first, second


def ga_keep(population: list[Candidate], children: list[Candidate], size: int) -> list[Candidate]:
    """The top `size` of parents + children by score; a child that repeats a prompt already in the pool is
    dropped, and ties keep the earlier one (parents first)."""
    pool, seen = [], set()
    for c in population + children:
        if c.prompt not in seen:
            seen.add(c.prompt)
            pool.append(c)
    return sorted(pool, key=lambda c: -c.score)[:size]  # sorted() is stable


def de_replace(member: Candidate, child: Candidate | None, population: list[Candidate]) -> Candidate:
    """The child takes the member's place only if it scores strictly higher and is not already in the population."""
    if child is None or child.score <= member.score or any(c.prompt == child.prompt for c in population):
        return member
    return child


Score = Callable[[list[str]], list[float]]


def ga_generation(population: list[Candidate], operator, score: Score, generation: int,
                  rng: random.Random) -> tuple[list[Candidate], list[Candidate]]:
    """One GA generation: N roulette-wheel pairs -> N children (one operator call each) -> top N survive.
    Returns (new population, all scored children)."""
    scores = [c.score for c in population]
    pairs = [roulette_pair(scores, rng) for _ in population]
    texts = operator.ga([(population[a].prompt, population[b].prompt) for a, b in pairs], generation)
    made = [(t, pair) for t, pair in zip(texts, pairs) if t]
    fitness = score([t for t, _ in made])
    children = [Candidate(t, s, generation, "ga", [population[a].id, population[b].id])
                for (t, (a, b)), s in zip(made, fitness)]
    return ga_keep(population, children, len(population)), children


def de_generation(population: list[Candidate], operator, score: Score, generation: int,
                  rng: random.Random) -> tuple[list[Candidate], list[Candidate]]:
    """One DE generation: for each member, two random other members as donors and the current best ->
    one child (one operator call); the member is replaced only by a better child."""
    best = max(population, key=lambda c: c.score)
    jobs, donors = [], []
    for i, member in enumerate(population):
        d1, d2 = rng.sample([j for j in range(len(population)) if j != i], 2)
        donors.append((d1, d2))
        jobs.append((member.prompt, population[d1].prompt, population[d2].prompt, best.prompt))
    texts = operator.de(jobs, generation)
    fitness = iter(score([t for t in texts if t]))
    children: list[Candidate | None] = []
    for i, t in enumerate(texts):
        d1, d2 = donors[i]
        parents = [population[i].id, population[d1].id, population[d2].id, best.id]
        children.append(Candidate(t, next(fitness), generation, "de", parents) if t else None)
    new = list(population)
    for i, child in enumerate(children):  # checked against `new`: two equal children cannot both get in
        new[i] = de_replace(population[i], child, new)
    return new, [c for c in children if c is not None]

"""The contract every task of the tiny task world follows.

A task samples `Example`s (question, canonical answer, worked steps) at a difficulty level and verifies
a model's free-text completion exactly. Completions end with a line `Answer: <final answer>`, whatever
the explanation style before it, so one verifier serves terse and explained answers alike.

Splits are decided by a hash of the example's content, not by the sampling seed, so train, dev and
test can never share an example (decontamination by construction), whichever seeds drew them.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import random
import re
from typing import Literal

Split = Literal["train", "dev", "test"]
ANSWER_PREFIX = "Answer:"
_ANSWER_RE = re.compile(r"Answer:\s*(.*)")


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    question: str
    answer: str
    steps: tuple[str, ...] = ()
    difficulty: int = 1

    @property
    def id(self) -> str:
        return hashlib.sha1(f"{self.task}\x00{self.question}".encode()).hexdigest()[:16]

    def to_row(self) -> dict:
        return {"task": self.task, "id": self.id, "question": self.question, "answer": self.answer,
                "steps": list(self.steps), "difficulty": self.difficulty}

    @classmethod
    def from_row(cls, row: dict) -> "Example":
        return cls(task=row["task"], question=row["question"], answer=str(row["answer"]),
                   steps=tuple(row.get("steps") or ()), difficulty=int(row.get("difficulty", 1)))


def extract_answer(completion: str) -> str | None:
    """The text after the last `Answer:` (first line of it), or None if the completion has none."""
    found = _ANSWER_RE.findall(completion or "")
    return found[-1].strip() if found else None


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def split_of(example_id: str) -> Split:
    """80/10/10 train/dev/test, fixed by the example's content hash."""
    bucket = int(example_id[:8], 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


class Task(abc.ABC):
    name: str
    description: str

    @abc.abstractmethod
    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        """Sample one example at `difficulty` (1 = easiest)."""

    def verify(self, example: Example, completion: str) -> bool:
        got = extract_answer(completion)
        return got is not None and normalize(got) == normalize(example.answer)


def make_split(task: Task, split: Split, n: int, seed: int = 0, difficulty: int = 1,
               max_tries: int | None = None) -> list[Example]:
    """`n` distinct examples of `task` that belong to `split` (deterministic for a given seed)."""
    rng = random.Random(f"{task.name}/{split}/{seed}/{difficulty}")
    out: dict[str, Example] = {}
    tries, limit = 0, max_tries or 200 * n + 1000
    while len(out) < n:
        if tries >= limit:
            raise ValueError(f"task '{task.name}': only {len(out)} distinct {split} examples found at "
                             f"difficulty {difficulty} (asked for {n}); raise the difficulty or lower n")
        tries += 1
        ex = task.generate(rng, difficulty)
        if split_of(ex.id) == split:
            out.setdefault(ex.id, ex)
    return list(out.values())

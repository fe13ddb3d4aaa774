"""Symbol-string tasks: copy, reverse, and sort a short list of numbers.

Symbols are space-separated so the byte-level BPE keeps one token per symbol; a model then only has
to learn where to attend, not how to split merged tokens.
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Example, Task, extract_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _items(text: str) -> list[str]:
    return text.replace(",", " ").split()


class _ListTask(Task):
    """Answers are lists; `3, 5, 8` and `3 5 8` are the same answer."""

    def verify(self, example: Example, completion: str) -> bool:
        got = extract_answer(completion)
        return got is not None and [s.lower() for s in _items(got.rstrip("."))] == _items(example.answer.lower())


class Copy(_ListTask):
    """`Copy: k d q` -> `Answer: k d q`. Difficulty d: d+2 letters (d=1: 3 letters, 17576 questions)."""

    name = "copy"
    description = "copy a short string of letters"

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        s = [rng.choice(LETTERS) for _ in range(difficulty + 2)]
        steps = tuple(f"{i + 1}: {c}" for i, c in enumerate(s))
        return Example(self.name, "Copy: " + " ".join(s), " ".join(s), steps, difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        s = example.answer.split()
        i = rng.randrange(len(s))
        s[i] = rng.choice([c for c in LETTERS if c != s[i]])  # one symbol miscopied
        return Example(self.name, example.question, " ".join(s), tuple(f"{i + 1}: {c}" for i, c in enumerate(s)),
                       example.difficulty)


class Reverse(_ListTask):
    """`Reverse: k d q` -> `Answer: q d k`. Difficulty d: d+2 letters."""

    name = "reverse"
    description = "reverse a short string of letters"

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        s = [rng.choice(LETTERS) for _ in range(difficulty + 2)]
        r = s[::-1]
        steps = tuple(f"{len(s) - i}: {c}" for i, c in enumerate(r))  # read from the last position back
        return Example(self.name, "Reverse: " + " ".join(s), " ".join(r), steps, difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        s = example.answer.split()
        if s[::-1] != s and rng.random() < 0.5:
            s = s[::-1]  # the string copied instead of reversed
        else:
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
            if s == example.answer.split():
                s[i] = rng.choice([c for c in LETTERS if c != s[i]])
        n = len(s)
        return Example(self.name, example.question, " ".join(s), tuple(f"{n - i}: {c}" for i, c in enumerate(s)),
                       example.difficulty)


class Sort(_ListTask):
    """`Sort: 7 2 9 4` -> `Answer: 2 4 7 9`. Difficulty d: d+3 numbers below 10**d (d=1: four digits, 10000 lists)."""

    name = "sort"
    description = "sort a short list of numbers ascending"

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        xs = [rng.randrange(10 ** difficulty) for _ in range(difficulty + 3)]
        ys = sorted(xs)
        steps = tuple(f"{'smallest' if i == 0 else 'next'} {y}" for i, y in enumerate(ys))
        return Example(self.name, "Sort: " + " ".join(map(str, xs)), " ".join(map(str, ys)), steps, difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        ys = [int(t) for t in example.answer.split()]
        i = rng.randrange(len(ys) - 1)
        if ys[i] != ys[i + 1]:
            ys[i], ys[i + 1] = ys[i + 1], ys[i]  # two neighbours left unsorted
        else:
            ys[i] = (ys[i] + 1) % (10 ** example.difficulty)  # a miscopied number
        steps = tuple(f"{'smallest' if i == 0 else 'next'} {y}" for i, y in enumerate(ys))
        return Example(self.name, example.question, " ".join(map(str, ys)), steps, example.difficulty)

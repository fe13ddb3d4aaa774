"""Short-context lookups: one key among a few (kv_lookup), and following a chain of keys (multihop).

Long-context (haystack) variants live in needle.py.
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Example, Task

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class KVLookup(Task):
    """`b=4 q=7 h=1. What is q?` -> `q=7` / `Answer: 7`. Difficulty d: d+2 pairs with distinct keys."""

    name = "kv_lookup"
    description = "find the value of a key in a short list of key=value pairs"

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        keys = rng.sample(LETTERS, difficulty + 2)
        values = [rng.randrange(10) for _ in keys]
        i = rng.randrange(len(keys))
        facts = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return Example(self.name, f"{facts}. What is {keys[i]}?", str(values[i]), (f"{keys[i]}={values[i]}",),
                       difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        facts = example.question.split(". What is ")[0].split()
        key = example.question.rsplit(" ", 1)[1].rstrip("?")
        others = [f for f in facts if not f.startswith(key + "=") and f.split("=")[1] != example.answer]
        fact = rng.choice(others) if others else f"{key}={(int(example.answer) + 1) % 10}"
        answer = fact.split("=")[1]  # a neighbour's value: the typical retrieval slip
        return Example(self.name, example.question, answer, (f"{key}={answer}",), example.difficulty)


class MultiHop(Task):
    """`a>m m>5 q>z z>8. Follow a twice.` -> `a>m` / `m>5` / `Answer: 5`.

    Every key points to a letter or (at the end of a chain) a digit. Difficulty d: d+1 hops on the asked
    chain, plus a distractor chain of the same length; facts are shuffled.
    """

    name = "multihop"
    description = "follow a chain of key>value links for a given number of hops"
    HOPS = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        hops = difficulty + 1
        letters = rng.sample(LETTERS, 2 * hops)
        chain, distractor = letters[:hops], letters[hops:]
        end, other_end = rng.sample(range(10), 2)
        facts = []
        for ch, last in ((chain, end), (distractor, other_end)):
            for i, k in enumerate(ch):
                facts.append(f"{k}>{ch[i + 1] if i + 1 < len(ch) else last}")
        steps = tuple(facts[:hops])
        rng.shuffle(facts)
        question = f"{' '.join(facts)}. Follow {chain[0]} {self.HOPS.get(hops, f'{hops} times')}."
        return Example(self.name, question, str(end), steps, difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        facts = dict(f.split(">") for f in example.question.split(". Follow ")[0].split())
        if rng.random() < 0.5:
            # stopped one hop early: answers with the intermediate letter
            return Example(self.name, example.question, example.steps[-2].split(">")[1], example.steps[:-1],
                           example.difficulty)
        # followed the distractor chain's end instead
        wrong_end = next(v for v in facts.values() if v.isdigit() and v != example.answer)
        steps = example.steps[:-1] + (example.steps[-1].split(">")[0] + ">" + wrong_end,)
        return Example(self.name, example.question, wrong_end, steps, example.difficulty)

"""Needle-in-a-haystack tasks: `passkey` and `kv_haystack`.

The haystack is lowercase filler words with no digits, so the digits of a passkey / value occur in the
context only inside the needle (an exact copy target: what Wu et al.'s retrieval score looks for).
Length (filler words) and needle depth (0 = start, 1 = end) are explicit arguments of `make`, so the NIAH
grid and the length-robustness sweep control them; `generate(rng, difficulty)` doubles the length with
each difficulty level and draws the depth at random.

    passkey:      "... The passkey is 48213. Remember it. ... What is the passkey?"  -> Answer: 48213
    kv_haystack:  "... The code for bazo is 4821. ... The code for kime is 9302. ..."
                  "What is the code for kime?"                                      -> Answer: 9302
"""

from __future__ import annotations

import dataclasses
import re
import random

from pipeline.tasks.base import ANSWER_PREFIX, Example, Task

# Filler vocabulary: letters only, no word shared with keys (keys are consonant-vowel pairs not listed here).
FILLER_WORDS = tuple(
    "the grass is green and sky blue sun warm day night river tree hill road rain wind cloud stone "
    "field house bird song slow fast calm far near old new small big red soft long over under light "
    "dark water snow leaf path".split())
_CONS, _VOWELS = "bdgklmnprstvz", "aeiou"


def filler(rng: random.Random, n_words: int, pool: int = 0) -> list[str]:
    """About `n_words` words as sentences of 4-9 words, each ending with '.'. With `pool` > 0 the sentences
    are drawn from `pool` fixed ones (a repetitive haystack, like the classic "The grass is green. The sky
    is blue." passkey filler)."""
    def sentence():
        return " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(4, 9))) + "."
    fixed = [sentence() for _ in range(pool)]
    sentences, left = [], n_words
    while left > 0:
        sentences.append(rng.choice(fixed) if pool else sentence())
        left -= sentences[-1].count(" ") + 1
    return sentences


def insert_at_depth(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Insert each (depth, text) needle between sentences at fraction `depth` of the haystack."""
    out = list(sentences)
    for depth, text in sorted(needles, key=lambda x: -x[0]):  # deepest first keeps earlier indices valid
        out.insert(round(min(max(depth, 0.0), 1.0) * len(sentences)), text)
    return " ".join(out)


def digits(rng: random.Random, n: int) -> str:
    """`n` distinct digits (n <= 10): each digit occurs once in the needle, so every copy step has exactly
    one source position (the first digit follows the only standalone space token, the rest follow the
    digit before them)."""
    if not 1 <= n <= 10:
        raise ValueError(f"a key has 1-10 distinct digits, got {n}")
    return "".join(rng.sample("0123456789", n))


def haystack_words(difficulty: int) -> int:
    """Filler words at a difficulty: 48, 96, 192, ... (about 1.3 tokens per word with the tiny tokenizer)."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    return 48 * 2 ** (difficulty - 1)


@dataclasses.dataclass
class Passkey(Task):
    name: str = "passkey"
    description: str = "Find a numeric passkey hidden in long filler text."
    key_digits: int = 5
    filler_pool: int = 0

    def make(self, rng: random.Random, n_words: int, depth: float, key: str | None = None) -> Example:
        key = key or digits(rng, self.key_digits)
        needle = f"The passkey is {key}. Remember it."
        text = insert_at_depth(filler(rng, n_words, self.filler_pool), [(depth, needle)])
        question = f"{text}\nWhat is the passkey?"
        return Example(task=self.name, question=question, answer=key,
                       steps=(f"The context says: {needle}",), difficulty=max(1, (n_words // 48).bit_length()))

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        return self.make(rng, haystack_words(difficulty), rng.random())

    def wrong(self, example: Example, rng: random.Random) -> Example:
        """A misremembered passkey: one digit changed (DPO's rejected answers)."""
        i = rng.randrange(len(example.answer))
        digit = rng.choice([d for d in "0123456789" if d != example.answer[i]])
        return dataclasses.replace(example, answer=example.answer[:i] + digit + example.answer[i + 1:])


@dataclasses.dataclass
class KVHaystack(Task):
    name: str = "kv_haystack"
    description: str = "Several key -> code facts hidden in filler text; return the code of the asked key."
    n_pairs: int = 4
    value_digits: int = 4
    filler_pool: int = 0

    def make(self, rng: random.Random, n_words: int, depth: float | None = None) -> Example:
        """`depth` places the asked pair; the distractor pairs go to random depths."""
        keys: list[str] = []
        while len(keys) < self.n_pairs:
            k = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(2))
            if k not in keys and k not in FILLER_WORDS:
                keys.append(k)
        values = [digits(rng, self.value_digits) for _ in keys]
        asked = rng.randrange(len(keys))
        depths = [rng.random() for _ in keys]
        if depth is not None:
            depths[asked] = depth
        facts = [f"The code for {k} is {v}." for k, v in zip(keys, values)]
        text = insert_at_depth(filler(rng, n_words, self.filler_pool), list(zip(depths, facts)))
        question = f"{text}\nWhat is the code for {keys[asked]}?"
        return Example(task=self.name, question=question, answer=values[asked],
                       steps=(f"The context says: {facts[asked]}",), difficulty=max(1, (n_words // 48).bit_length()))

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        return self.make(rng, haystack_words(difficulty), rng.random())

    def wrong(self, example: Example, rng: random.Random) -> Example:
        """Another key's code: the typical retrieval slip (DPO's rejected answers)."""
        codes = [c for c in re.findall(r"The code for \w+ is (\d+)\.", example.question) if c != example.answer]
        return dataclasses.replace(example, answer=rng.choice(codes) if codes else example.answer[::-1] + "0")


def prompt_of(example: Example) -> str:
    """What the model sees; it must continue with ' <answer>' (the completion is verified as
    `Answer:` + continuation)."""
    return f"{example.question}\n{ANSWER_PREFIX}"


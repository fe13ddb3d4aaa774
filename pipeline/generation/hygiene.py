"""Data hygiene: exact and near-duplicate removal (MinHash + LSH, pure python), decontamination against
eval sets, and binarization of scored completions into preference pairs."""

from __future__ import annotations

import hashlib
import random
import re

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_PRIME = (1 << 61) - 1


def normalize_text(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower()))


def shingles(text: str, n: int = 3) -> set[str]:
    """Word (and punctuation) n-grams of the normalized text; a text shorter than n is one shingle."""
    words = normalize_text(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHashIndex:
    """Find texts whose shingle sets have Jaccard similarity >= `threshold` with a query text.

    LSH over `bands` x `rows` MinHash values only proposes candidates; each is confirmed with the exact
    Jaccard of the shingle sets, so the index never reports a pair below the threshold. With 16 bands of 4
    rows a pair at Jaccard 0.8 is proposed with probability 1 - (1 - 0.8**4)**16 > 0.9999.
    """

    def __init__(self, threshold: float = 0.85, bands: int = 16, rows: int = 4, ngram: int = 3, seed: int = 0):
        self.threshold, self.bands, self.rows, self.ngram = threshold, bands, rows, ngram
        rng = random.Random(seed)
        self._perms = [(rng.randrange(1, _PRIME), rng.randrange(_PRIME)) for _ in range(bands * rows)]
        self._buckets: list[dict[tuple, list[int]]] = [{} for _ in range(bands)]
        self._sets: list[set[str]] = []

    def _signature(self, sh: set[str]) -> list[int]:
        hashes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in sh]
        return [min((a * h + b) % _PRIME for h in hashes) for a, b in self._perms]

    def _bands(self, sig: list[int]):
        for i in range(self.bands):
            yield i, tuple(sig[i * self.rows:(i + 1) * self.rows])

    def _prepare(self, text: str) -> tuple[set[str], list[int]]:
        sh = shingles(text, self.ngram)
        return sh, self._signature(sh)

    def _match(self, sh: set[str], sig: list[int]) -> int | None:
        seen: set[int] = set()
        for i, band in self._bands(sig):
            for j in self._buckets[i].get(band, ()):
                if j not in seen:
                    seen.add(j)
                    if jaccard(sh, self._sets[j]) >= self.threshold:
                        return j
        return None

    def _add(self, sh: set[str], sig: list[int]) -> int:
        idx = len(self._sets)
        self._sets.append(sh)
        for i, band in self._bands(sig):
            self._buckets[i].setdefault(band, []).append(idx)
        return idx

    def query(self, text: str) -> int | None:
        """Index of the first stored text at or above the threshold, or None."""
        return self._match(*self._prepare(text))

    def add(self, text: str) -> int:
        return self._add(*self._prepare(text))

    def add_unless_near(self, text: str) -> int | None:
        """`query`, then `add` if nothing matched, hashing the text once (the signature is most of the cost)."""
        sh, sig = self._prepare(text)
        match = self._match(sh, sig)
        if match is None:
            self._add(sh, sig)
        return match


def dedup(texts: list[str], threshold: float = 0.85) -> tuple[list[int], int, int]:
    """Indices of the texts to keep (first of each group), and how many were exact / near duplicates.
    A threshold above 1 turns near-duplicate removal off."""
    keep, exact, near = [], 0, 0
    seen: set[str] = set()
    index = MinHashIndex(threshold) if threshold <= 1 else None
    for i, text in enumerate(texts):
        norm = normalize_text(text)
        if norm in seen:
            exact += 1
            continue
        seen.add(norm)
        if index is not None and index.add_unless_near(text) is not None:
            near += 1
            continue
        keep.append(i)
    return keep, exact, near


def contaminated(texts: list[str], eval_texts: list[str], threshold: float = 0.85) -> list[bool]:
    """Which of `texts` match an eval text exactly (normalized) or at Jaccard >= threshold."""
    exact = {normalize_text(t) for t in eval_texts}
    index = MinHashIndex(threshold)
    for t in eval_texts:
        index.add(t)
    return [normalize_text(t) in exact or index.query(t) is not None for t in texts]


def binarize(scores: list[float | None], mode: str, rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected) indices from scored candidates, or None if no pair has a strict preference.

    zephyr: chosen = the best (first on ties), rejected = a random one of those scored strictly lower;
    best_vs_worst: rejected = the lowest scored."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(s for s, _ in scored)
    chosen = next(i for s, i in scored if s == best)
    lower = [(s, i) for s, i in scored if s < best]
    if not lower:
        return None
    if mode == "best_vs_worst":
        worst = min(s for s, _ in lower)
        return chosen, next(i for s, i in lower if s == worst)
    return chosen, rng.choice(lower)[1]


def cut_at_first_difference(chosen: str, rejected: str) -> str:
    """`rejected` up to and including its first character that differs from `chosen` (all of it if it is a
    prefix of `chosen` or equal to it). On worked solutions in one canonical format that character is the
    mistake; what follows it is mostly correct work from a wrong value (the carry that was dropped, copied
    on), which a preference loss on the whole reply would push down too."""
    i = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    return rejected[:i + 1]

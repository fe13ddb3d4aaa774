"""EvoPrompt's variation operators: an LLM that follows the GA/DE templates, or a lexical one (no LLM).

Both take a whole generation's worth of jobs at once and return one child prompt per job, or None where
the operator produced nothing usable (a malformed LLM reply); the search then simply has one child fewer.
Randomness is keyed by (seed, generation, job index), so a resumed run asks for exactly the same children.

The templates follow Guo et al. (ICLR 2024): one call per child, a worked demonstration first, the final
prompt wrapped in <prompt></prompt> tags.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

from pipeline.config import RecipeError, load_yaml
from pipeline.generation.teachers import Request, RequestCache, request_key, run_requests

GA_TEMPLATE = """Follow the two steps below to write a better prompt.
1. Cross over the following two prompts into one new prompt:
Prompt 1: Rewrite the sentence so that it is shorter.
Prompt 2: Summarise the text in a single line and keep the key facts.
2. Mutate the new prompt from step 1 and give the final prompt between <prompt> and </prompt>.

1. Crossover prompt: Rewrite the text as a single short line that keeps the key facts.
2. <prompt>Condense the text into one brief line, keeping every key fact.</prompt>

Follow the two steps below to write a better prompt.
1. Cross over the following two prompts into one new prompt:
Prompt 1: {prompt1}
Prompt 2: {prompt2}
2. Mutate the new prompt from step 1 and give the final prompt between <prompt> and </prompt>.
"""

DE_TEMPLATE = """Follow the four steps below to write a better prompt.
1. Find the parts where Prompt 1 and Prompt 2 differ:
Prompt 1: Classify the review as positive or negative.
Prompt 2: Decide whether the movie review expresses a positive or a negative opinion.
2. Randomly mutate only those different parts.
3. Merge the mutated parts into Prompt 3, replacing the matching parts of it:
Prompt 3: Read the review and say if its sentiment is positive or negative.
4. Cross over the result of step 3 with the basic prompt below and give the final prompt between <prompt> and </prompt>:
Basic prompt: Tell me whether this text is positive or negative.

1. Different parts: "Classify the review" vs "Decide whether the movie review expresses"; "as" vs "a ... opinion".
2. Mutated parts: "Judge whether the film review conveys"; "a favourable or unfavourable view".
3. Merged prompt: Judge whether the film review conveys a favourable or unfavourable view, and say if its sentiment is positive or negative.
4. <prompt>Judge whether the review conveys a favourable or unfavourable view and answer positive or negative.</prompt>

Follow the four steps below to write a better prompt.
1. Find the parts where Prompt 1 and Prompt 2 differ:
Prompt 1: {donor1}
Prompt 2: {donor2}
2. Randomly mutate only those different parts.
3. Merge the mutated parts into Prompt 3, replacing the matching parts of it:
Prompt 3: {best}
4. Cross over the result of step 3 with the basic prompt below and give the final prompt between <prompt> and </prompt>:
Basic prompt: {member}
"""

PARAPHRASE_TEMPLATE = """Write a variation of the following instruction that keeps its meaning. Give only the new \
instruction, between <prompt> and </prompt>.
Instruction: {prompt}
"""

_TAG_RE = re.compile(r"<prompt>(.*?)</prompt>", re.S | re.I)

logger = logging.getLogger(__name__)


def fill(template: str, **fields: str) -> str:
    """The template with its {placeholders} filled; a prompt's own braces are left alone."""
    out = template
    for name, value in fields.items():
        if "{" + name + "}" not in out:
            raise KeyError(f"template has no placeholder {{{name}}}")
        out = out.replace("{" + name + "}", value)
    left = re.findall(r"\{(prompt1|prompt2|donor1|donor2|best|member|prompt)\}", out)
    if left:
        raise KeyError(f"template placeholder {{{left[0]}}} was not filled")
    return out


def parse_reply(text: str | None, max_chars: int = 1000) -> str | None:
    """The prompt in the reply's last <prompt>...</prompt>, whitespace-normalised; None if the reply has no
    closed tag pair, the prompt is empty, still holds a tag or a template placeholder, or is too long."""
    found = _TAG_RE.findall(text or "")
    if not found:
        return None
    prompt = " ".join(found[-1].split())
    if not prompt or len(prompt) > max_chars or "<prompt>" in prompt.lower() or "</prompt>" in prompt.lower():
        return None
    if re.search(r"\{(prompt1|prompt2|donor1|donor2|best|member|prompt)\}", prompt):
        return None
    return prompt


class LLMOperator:
    """Any generation-stage teacher (OpenAI-compatible endpoint, local transformers model) as the operator.
    Every reply is cached by request key, so a killed run re-asks nothing it already has."""

    def __init__(self, teacher, cache: RequestCache, seed: int, max_chars: int = 1000):
        self.teacher, self.cache, self.seed, self.max_chars = teacher, cache, seed, max_chars
        self.name = f"llm ({teacher.identity})"
        self.malformed = 0

    def _ask(self, texts: list[str], generation: int, what: str) -> list[str | None]:
        reqs = []
        for j, text in enumerate(texts):
            messages = ({"role": "user", "content": text},)
            # `sample` = job index: two jobs with the same parents still get two different children.
            reqs.append(Request(request_key(self.teacher.identity, messages, j, self.seed * 1000 + generation),
                                messages, j, self.seed * 1000 + generation))
        replies = run_requests(self.teacher, reqs, self.cache, desc=f"operator[{what} gen {generation}]")
        children = [parse_reply(replies[r.key], self.max_chars) for r in reqs]
        bad = sum(c is None for c in children)
        self.malformed += bad
        if bad * 2 > len(children):
            logger.warning("operator %s, generation %d: %d of %d replies are unusable (no <prompt>...</prompt>); "
                           "their parents are kept", what, generation, bad, len(children))
        return children

    def ga(self, pairs: list[tuple[str, str]], generation: int) -> list[str | None]:
        return self._ask([fill(GA_TEMPLATE, prompt1=a, prompt2=b) for a, b in pairs], generation, "ga")

    def de(self, jobs: list[tuple[str, str, str, str]], generation: int) -> list[str | None]:
        """jobs: (member, donor1, donor2, best)."""
        return self._ask([fill(DE_TEMPLATE, donor1=d1, donor2=d2, best=b, member=m) for m, d1, d2, b in jobs],
                         generation, "de")

    def paraphrase(self, prompts: list[str], generation: int) -> list[str | None]:
        return self._ask([fill(PARAPHRASE_TEMPLATE, prompt=p) for p in prompts], generation, "paraphrase")


# ---------------------------------------------------------------------------------------------
# Lexical operator: phrase-level crossover and mutation from a phrase bank (no LLM)
# ---------------------------------------------------------------------------------------------


def phrases(prompt: str) -> list[str]:
    """A prompt's sentences (the units the lexical operator cuts, swaps and mutates)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", prompt.strip()) if s.strip()]


def join(parts: list[str]) -> str:
    seen, out = set(), []
    for p in parts:  # a phrase twice says nothing new
        if p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return " ".join(out)


def load_phrase_bank(path: str | Path) -> list[str]:
    data = load_yaml(path)
    bank = data.get("phrases")
    if not isinstance(bank, list) or not bank or not all(isinstance(p, str) and p.strip() for p in bank):
        raise RecipeError(f"{path}: key 'phrases' must be a non-empty list of strings")
    return [" ".join(p.split()) for p in bank]


class LexicalOperator:
    """GA: one-point crossover of the parents' sentence lists, then mutation (replace, insert or delete a
    sentence, new sentences drawn from the bank). DE: the sentences in which the donors differ are mutated
    with bank phrases, merged into the best prompt, and the result is crossed over with the member."""

    def __init__(self, bank: list[str], seed: int, mutation_rate: float = 0.3, max_phrases: int = 6):
        self.bank, self.seed, self.rate, self.max_phrases = bank, seed, mutation_rate, max_phrases
        self.name = "lexical"
        self.malformed = 0

    def _rng(self, what: str, generation: int, j: int) -> random.Random:
        return random.Random(f"{self.seed}/{what}/{generation}/{j}")

    def _crossover(self, a: list[str], b: list[str], rng: random.Random) -> list[str]:
        """One-point crossover at one cut for both parents: a's sentences before it, b's from it on, so a child
        is about as long as its parents. Cutting each parent at its own point made every child of two
        one-sentence prompts the two joined, and prompts only grew, away from what the task model reads well
        (docs/evoprompt.md)."""
        cut = rng.randint(0, max(len(a), len(b)))
        return a[:cut] + b[cut:] or list(a)

    def _mutate(self, parts: list[str], rng: random.Random) -> list[str]:
        parts = list(parts)
        for i in range(len(parts)):
            if rng.random() < self.rate:
                parts[i] = rng.choice(self.bank)
        r = rng.random()
        if r < self.rate:
            parts.insert(rng.randint(0, len(parts)), rng.choice(self.bank))
        elif r < 2 * self.rate and len(parts) > 1:
            parts.pop(rng.randrange(len(parts)))
        return parts[:self.max_phrases]

    def ga(self, pairs: list[tuple[str, str]], generation: int) -> list[str | None]:
        out = []
        for j, (a, b) in enumerate(pairs):
            rng = self._rng("ga", generation, j)
            for _ in range(10):  # a child equal to a parent is a wasted evaluation: draw again
                child = join(self._mutate(self._crossover(phrases(a), phrases(b), rng), rng))
                if child not in (join(phrases(a)), join(phrases(b))):
                    break
            out.append(child)
        return out

    def de(self, jobs: list[tuple[str, str, str, str]], generation: int) -> list[str | None]:
        out = []
        for j, (member, d1, d2, best) in enumerate(jobs):
            rng = self._rng("de", generation, j)
            p1, p2 = phrases(d1), phrases(d2)
            diff = [p for p in p1 if p not in p2] + [p for p in p2 if p not in p1]
            mutated = [rng.choice(self.bank) if rng.random() < 0.5 else p for p in diff]
            merged = phrases(best)
            for p in mutated:  # each different part either replaces a part of the best or joins it
                if rng.random() < 0.5:
                    merged[rng.randrange(len(merged))] = p
                else:
                    merged.insert(rng.randint(0, len(merged)), p)
            out.append(join(self._crossover(merged, phrases(member), rng)[:self.max_phrases]))
        return out

    def paraphrase(self, prompts: list[str], generation: int) -> list[str | None]:
        return [join(self._mutate(phrases(p), self._rng("para", generation, j))) for j, p in enumerate(prompts)]

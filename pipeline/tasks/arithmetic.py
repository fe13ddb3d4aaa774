"""Multi-digit addition with worked steps (one line per column, with the carry)."""

from __future__ import annotations

import random

from pipeline.tasks.base import Example, Task


def _column_steps(a: int, b: int, skip_carry: bool = False) -> tuple[tuple[str, ...], str]:
    """Schoolbook addition right to left. `skip_carry` forgets every carry (a plausible wrong answer)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        new_carry = 0 if skip_carry else total // 10
        steps.append(f"{terms}={total}, write {total % 10}" + (f" carry {new_carry}" if new_carry else ""))
        digits.append(str(total % 10))
        carry = new_carry
    if carry:
        steps.append(f"write carry {carry}")
        digits.append(str(carry))
    return tuple(steps), "".join(reversed(digits)).lstrip("0") or "0"


class Addition(Task):
    """`Add 47 + 38.` -> `7+8=15, write 5 carry 1` / `4+3+1=8, write 8` / `Answer: 85`.

    Difficulty d: both operands have d+1 digits (d=1: two-digit numbers, 8100 distinct questions).
    """

    name = "add"
    description = "add two numbers column by column, carrying into the next column"

    def generate(self, rng: random.Random, difficulty: int = 1) -> Example:
        lo, hi = 10 ** difficulty, 10 ** (difficulty + 1) - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        steps, answer = _column_steps(a, b)
        return Example(self.name, f"Add {a} + {b}.", answer, steps, difficulty)

    def wrong(self, example: Example, rng: random.Random) -> Example:
        """A plausible mistake: the carries forgotten, or (if there were none) an off-by-one digit."""
        a, b = (int(t) for t in example.question[4:-1].split(" + "))
        steps, answer = _column_steps(a, b, skip_carry=True)
        if answer == example.answer:
            answer, steps = str(int(example.answer) + rng.choice([-10, -1, 1, 10])), example.steps  # careless copy
        return Example(self.name, example.question, answer, steps, example.difficulty)

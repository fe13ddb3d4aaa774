"""The tiny task world: procedural tasks with exact verifiers (see base.py for the contract).

`TASKS` is plain data (name -> instance). `verifier_reward` is a TRL reward function (GRPO passes the
dataset's `task` and `answer` columns as keyword lists), and `to_prompt` turns an example into the
conversational messages every stage feeds the chat template.
"""

from __future__ import annotations

from pipeline.tasks.arithmetic import Addition
from pipeline.tasks.base import ANSWER_PREFIX, Example, Task, extract_answer, make_split, normalize, split_of
from pipeline.tasks.lookup import KVLookup, MultiHop
from pipeline.tasks.needle import KVHaystack, Passkey
from pipeline.tasks.symbols import Copy, Reverse, Sort

TASKS: dict[str, Task] = {t.name: t for t in (Addition(), Copy(), Reverse(), Sort(), KVLookup(), MultiHop(),
                                               Passkey(), KVHaystack())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}' (valid: {', '.join(TASKS)})")
    return TASKS[name]


def to_prompt(example: Example, system_prompt: str | None = None) -> list[dict]:
    """Conversational messages for `example`: an optional system message, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": example.question}]


def completion_text(completion) -> str:
    """A completion as text: TRL passes a string, or (conversational) a list of {"role", "content"} dicts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    replies = [m for m in completion if m.get("role", "assistant") == "assistant"]
    return str(replies[-1].get("content", "")) if replies else ""


def verifier_reward(completions, task, answer, question=None, **kwargs) -> list[float]:
    """1.0 where the completion's `Answer:` matches the example's answer under the task's verifier, else 0.0."""
    questions = question if question is not None else [""] * len(completions)
    return [float(get_task(t).verify(Example(task=t, question=q, answer=str(a)), completion_text(c)))
            for c, t, a, q in zip(completions, task, answer, questions, strict=True)]


__all__ = ["ANSWER_PREFIX", "TASKS", "Example", "Task", "completion_text", "extract_answer", "get_task",
           "make_split", "normalize", "split_of", "to_prompt", "verifier_reward"]

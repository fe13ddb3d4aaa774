"""The tiny task world: procedural tasks with exact verifiers (see base.py for the contract)."""

from pipeline.tasks.base import ANSWER_PREFIX, Example, Task, extract_answer, make_split, normalize, split_of

__all__ = ["ANSWER_PREFIX", "Example", "Task", "extract_answer", "make_split", "normalize", "split_of"]

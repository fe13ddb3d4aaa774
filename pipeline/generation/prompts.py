"""The Orca-style system-prompt library (data/system_prompts.yaml): loading, checking, per-task selection."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from pipeline.config import RecipeError, load_yaml

STYLES = ("steps", "explain", "concise")


@dataclasses.dataclass(frozen=True)
class SystemPrompt:
    id: str
    text: str
    style: str
    tasks: tuple[str, ...] = ("any",)

    def fits(self, task: str | None) -> bool:
        return "any" in self.tasks or task in self.tasks


@dataclasses.dataclass(frozen=True)
class PromptLibrary:
    generic: str
    prompts: tuple[SystemPrompt, ...]

    def by_id(self, prompt_id: str) -> SystemPrompt:
        for p in self.prompts:
            if p.id == prompt_id:
                return p
        raise KeyError(prompt_id)

    def choose(self, rng: random.Random, task: str | None, styles: list[str], ids: list[str] | None = None) -> SystemPrompt:
        """A random prompt among those that fit `task`, have one of `styles` and (if given) are in `ids`."""
        pool = [p for p in self.prompts if p.fits(task) and p.style in styles and (not ids or p.id in ids)]
        if not pool:
            raise RecipeError(f"no system prompt fits task '{task}' with styles {styles}"
                              + (f" and ids {ids}" if ids else ""))
        return rng.choice(pool)


def load_library(path: str | Path) -> PromptLibrary:
    """Parse and check the library; a bad entry is a one-line error naming the file and the entry."""
    data = load_yaml(path)
    if not isinstance(data.get("generic"), str) or not isinstance(data.get("prompts"), list):
        raise RecipeError(f"{path}: needs 'generic' (a string) and 'prompts' (a list)")
    seen, prompts = set(), []
    for i, item in enumerate(data["prompts"]):
        where = f"{path}: prompts[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: must be a mapping with id, style, tasks, text")
        unknown = set(item) - {"id", "style", "tasks", "text"}
        if unknown:
            raise RecipeError(f"{where}: unknown key '{sorted(unknown)[0]}' (valid: id, style, tasks, text)")
        if not isinstance(item.get("id"), str) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise RecipeError(f"{where}: 'id' and 'text' must be non-empty strings")
        if item["id"] in seen:
            raise RecipeError(f"{where}: duplicate id '{item['id']}'")
        if item.get("style") not in STYLES:
            raise RecipeError(f"{where} ({item['id']}): key 'style' must be one of {', '.join(STYLES)}")
        tasks = item.get("tasks", ["any"])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise RecipeError(f"{where} ({item['id']}): key 'tasks' must be a list of task names or 'any'")
        seen.add(item["id"])
        prompts.append(SystemPrompt(item["id"], item["text"].strip(), item["style"], tuple(tasks)))
    return PromptLibrary(data["generic"], tuple(prompts))

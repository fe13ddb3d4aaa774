"""Valid ranges of recipe values, checked once at parse time (after type coercion), from one table.

`parse` calls `check_value(owner, key, value, where)` for every key a recipe or command line sets; the teacher
factory calls `check_teacher_spec` for the keys of a teacher mapping. A value out of range raises RecipeError:

    error: r.yaml: key 'beta' must be > 0, got -1.0

Ranges live in `RANGES` (key -> rules). A rule may be limited to the classes it belongs to (by class name in
the owner's MRO), because a few keys mean different things in different stages: `beta` is DPO's KL strength
(> 0) and GRPO's KL coefficient (>= 0, 0 = no reference model). Cross-key rules are in `CROSS_RULES`.
Values are shown through `shown()`, which never echoes something that looks like a secret.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

from pipeline.config import RecipeError


@dataclasses.dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo excluded
    hi_open: bool = False  # hi excluded
    also: tuple = ()  # extra valid values outside the interval (e.g. -1 = "unset")
    only: tuple[str, ...] = ()  # class names the rule applies to (empty: every owner)

    def ok(self, v) -> bool:
        if v in self.also:
            return True
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def text(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        if lo and hi:
            body = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        else:
            body = lo or hi or "any"
        if self.also:
            body += " or " + " or ".join(repr(a) for a in self.also)
        return body


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POS = Range(0, lo_open=True)  # > 0
NONNEG = Range(0)  # >= 0
ONE = Range(1)  # >= 1 (counts)
UNIT = Range(0, 1)  # [0, 1]
PROB_OPEN = Range(0, 1, hi_open=True)  # [0, 1)

# key -> rules (first rule whose `only` matches the owner applies). Keys of TRL's configs (SFTConfig, DPOConfig,
# GRPOConfig, ModelConfig, ScriptArguments) and of ours (every stage's dataclass, teacher mappings).
RANGES: dict[str, tuple[Range, ...]] = {
    # transformers TrainingArguments, as the stages use them
    "learning_rate": (POS,),
    "num_train_epochs": (NONNEG,),  # 0 only with max_steps (CROSS_RULES)
    "max_steps": (Range(1, also=(-1,)),),
    "per_device_train_batch_size": (ONE,),
    "per_device_eval_batch_size": (ONE,),
    "gradient_accumulation_steps": (ONE,),
    "eval_accumulation_steps": (ONE,),
    "warmup_steps": (NONNEG,),
    "warmup_ratio": (UNIT,),
    "weight_decay": (NONNEG,),
    "adam_beta1": (PROB_OPEN,),
    "adam_beta2": (PROB_OPEN,),
    "adam_epsilon": (POS,),
    "max_grad_norm": (NONNEG,),
    "label_smoothing_factor": (PROB_OPEN,),
    "logging_steps": (POS,),
    "save_steps": (POS,),
    "eval_steps": (POS,),
    "save_total_limit": (ONE,),
    "seed": (NONNEG,),
    "data_seed": (NONNEG,),
    "dataloader_num_workers": (NONNEG,),
    "dataset_num_proc": (ONE,),
    "neftune_noise_alpha": (POS,),
    # TRL SFT / DPO
    "max_length": (ONE,),
    "max_prompt_length": (ONE,),
    "precompute_ref_batch_size": (ONE,),
    "beta": (Range(0, lo_open=True, only=("DPOConfig",)), Range(0, only=("GRPOConfig",))),
    "label_smoothing": (Range(0, 0.5, hi_open=True),),
    "rpo_alpha": (NONNEG,),
    "ref_model_mixup_alpha": (UNIT,),
    "ref_model_sync_steps": (ONE,),
    # TRL GRPO (CPPO)
    "num_generations": (Range(2),),
    "max_completion_length": (ONE,),
    "generation_batch_size": (ONE,),
    "steps_per_generation": (ONE,),
    "temperature": (Range(0, lo_open=True, only=("GRPOConfig",)), NONNEG),  # teachers: 0 = greedy
    "top_p": (Range(0, 1, lo_open=True),),
    "num_iterations": (ONE,),
    "epsilon": (NONNEG,),
    # ours: CPPO
    "c_kr": (NONNEG,),
    "k": (NONNEG,),
    "lb": (Range(0, 1, lo_open=True),),
    "ub": (Range(1),),
    "n_train": (ONE,),
    "eval_n": (ONE,),
    # TRL ModelConfig (LoRA)
    "lora_r": (ONE,),
    "lora_alpha": (POS,),
    "lora_dropout": (PROB_OPEN,),
    # ours: data and evaluation
    "eval_split_size": (POS,),
    "max_train_samples": (ONE,),
    "eval_examples": (ONE,),
    "fraction": (Range(0, 1, lo_open=True),),  # datasets[i].fraction: a share of the mixture
    # ours: long context (tiled_mlp_tile_tokens, loss_vocab_chunk, sequence_parallel_size) are checked by
    # LongContextArguments.__post_init__ (pipeline/longctx), which parse reports the same way
    # ours: generation, evaluation, EvoPrompt, tiny model, NIAH
    "n_per_task": (ONE,),
    "difficulty": (ONE,),
    "n_samples": (ONE,),
    "dedup_threshold": (POS,),
    "n": (ONE,),
    "batch_size": (ONE,),
    "max_new_tokens": (ONE,),
    "population_size": (Range(3),),
    "generations": (NONNEG,),
    "n_dev": (ONE,),
    "n_test": (ONE,),
    "max_prompt_chars": (ONE,),
    "hidden_size": (ONE,),
    "num_hidden_layers": (ONE,),
    "num_attention_heads": (ONE,),
    "num_key_value_heads": (ONE,),
    "intermediate_size": (ONE,),
    "vocab_size": (ONE,),
    "max_position_embeddings": (ONE,),
    "rope_theta": (POS,),
    "sliding_window": (ONE,),
    "full_heads": (NONNEG,),
    "full_fraction": (UNIT,),
    "sink": (NONNEG,),
    "window": (ONE,),
    "key_digits": (Range(1, 10),),
    "n_per_cell": (ONE,),
    # teachers (pipeline/generation/teachers.py)
    "concurrency": (ONE,),
    "max_retries": (NONNEG,),
    "timeout_s": (POS,),
    "requests_per_second": (POS,),
    "backoff_s": (NONNEG,),
    "max_backoff_s": (NONNEG,),
    "max_tokens": (ONE,),
    "wrong_rate": (UNIT,),
}


def _rule(owner: type | str | None, key: str) -> Range | None:
    names = {c.__name__ for c in owner.__mro__} if isinstance(owner, type) else {owner} if owner else set()
    for rule in RANGES.get(key, ()):
        if not rule.only or names & set(rule.only):
            return rule
    return None


def check_value(owner, key: str, value: Any, where: str, label: str | None = None) -> None:
    """Raise RecipeError if `value` (already of the field's type) is outside the key's valid range.
    Lists are checked element by element; None, strings and booleans have no range."""
    rule = _rule(owner, key)
    if rule is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not rule.ok(v):
            raise RecipeError(f"{where}: key '{label or key}' must be {rule.text()}, got {shown(v)}")


# Cross-key rules on the parsed values (key -> value, defaults included): (keys, predicate, message).
CROSS_RULES: list[tuple[tuple[str, ...], Callable[[dict], bool], str]] = [
    (("num_train_epochs", "max_steps"), lambda v: v["num_train_epochs"] > 0 or v["max_steps"] > 0,
     "key 'num_train_epochs' must be > 0 unless 'max_steps' is set (> 0): zero epochs trains nothing"),
]


def check_cross(values: dict, where: str) -> None:
    for keys, ok, message in CROSS_RULES:
        if all(k in values for k in keys) and not ok(values):
            raise RecipeError(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------
# Secrets are never echoed
# ---------------------------------------------------------------------------------------------

_SECRET_PREFIX = re.compile(r"^(sk-|sk_|rk_|pk_|ghp_|gho_|ghs_|github_pat_|hf_|xox[abpr]-|AKIA|AIza|glpat-|Bearer\s)")
_TOKENISH = re.compile(r"^[A-Za-z0-9_\-+/=.]{24,}$")
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def looks_secret(value: Any) -> bool:
    """A string that looks like an API key or token (a known prefix, a long token-like string with letters
    and digits, or the value of an environment variable whose name says key/token/secret)."""
    if not isinstance(value, str) or len(value) < 8:
        return False
    s = value.strip()
    if _SECRET_PREFIX.match(s):
        return True
    if (_TOKENISH.match(s) and re.search(r"\d", s) and re.search(r"[A-Za-z]", s) and "/" not in s and "." not in s
            and not re.fullmatch(r"[A-Z0-9_]+", s)):  # an ALL_CAPS_NAME is an environment variable's name
        return True
    return any(v == s for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8)


def shown(value: Any) -> str:
    """`repr(value)` for an error message, with anything secret-looking replaced."""
    if looks_secret(value):
        return "<a value that looks like a secret, not shown>"
    if isinstance(value, (list, tuple)) and any(looks_secret(v) for v in value):
        return "<a list holding a value that looks like a secret, not shown>"
    if isinstance(value, dict) and any(looks_secret(v) for v in value.values()):
        return "<a mapping holding a value that looks like a secret, not shown>"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------
# Teacher mappings (generation, judge, EvoPrompt operator / task model)
# ---------------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_teacher_spec(cls: type, spec: dict, where: str) -> dict:
    """The teacher mapping's values checked against `cls`'s field types and the range table; returns the
    keyword arguments for `cls` (numbers written as strings converted). `api_key_env` must name an environment
    variable that is set; a key pasted there (or anywhere) is never echoed."""
    import typing

    from pipeline.config import _Mismatch, _type_name, coerce

    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in spec.items():
        if k == "type" or k not in hints:
            continue
        try:
            v = coerce(hints[k], v)
        except _Mismatch:
            raise RecipeError(f"{where}: key '{k}' must be {_type_name(hints[k])}, got {shown(v)}") from None
        check_value(cls, k, v, where)
        out[k] = v
    if isinstance(out.get("model_name_or_path"), str):  # a local-model teacher: a model, checked before loading
        from pipeline.modeling import check_model_path

        check_model_path(out["model_name_or_path"], where)
    env = out.get("api_key_env")
    if env is not None:
        if looks_secret(env) or not _ENV_NAME.match(env):
            raise RecipeError(f"{where}: key 'api_key_env' must be the NAME of an environment variable (letters, "
                              "digits, _) that holds the key, never the key itself (the value given is not shown)")
        if not os.environ.get(env):
            raise RecipeError(f"{where}: key 'api_key_env': environment variable {env} is not set")
    return out


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def check_output_dir(path: str, where: str, key: str = "output_dir") -> None:
    """`path` is (or can be created as) a directory this process can write, checked before any work: the
    nearest existing ancestor is a directory and a file can be created in it. Nothing is created here."""
    import tempfile
    from pathlib import Path

    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise RecipeError(f"{where}: key '{key}': {path} is a file, not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"{where}: key '{key}': cannot create {path}: {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".write-check-"):
            pass
    except OSError as e:
        raise RecipeError(f"{where}: key '{key}': {path} is not writable ({probe}: {e.strerror})") from None


# key -> path check, applied by `parse` to keys a recipe sets
PATH_CHECKS: dict[str, Callable[[str, str, str], None]] = {"output_dir": check_output_dir}


def check_path(key: str, value: Any, where: str) -> None:
    if key in PATH_CHECKS and isinstance(value, str) and value:
        PATH_CHECKS[key](value, where, key)

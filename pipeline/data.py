"""Training data: local files (jsonl / json / parquet / csv / save_to_disk dirs) or hub ids, mixed and checked.

Rows are validated before training so a malformed file fails with one line naming the file, the row and
the column, instead of a traceback from inside a collator halfway through an epoch.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

import datasets
import pyarrow.compute as pc

from pipeline.config import DataArguments, RecipeError
from pipeline.io import looks_local

logger = logging.getLogger(__name__)

Stage = Literal["sft", "dpo"]
# TRL's standard and conversational formats each stage accepts.
FORMATS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "dpo": [("chosen", "rejected")],
}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_ROLES = {"system", "user", "assistant", "tool"}
MAX_CHECKED_ROWS = 20_000


def _load_one(path: str, *, name=None, split=None, data_dir=None, data_files=None, where: str = "") -> datasets.Dataset:
    p = Path(path)
    split = split or "train"
    if p.is_file():
        builder = _FILE_BUILDERS.get(p.suffix)
        if builder is None:
            raise RecipeError(f"{where}: {path}: unsupported file type '{p.suffix}' (use {', '.join(_FILE_BUILDERS)})")
        try:
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # datasets wraps JSON/parquet parse errors in several exception types
            raise RecipeError(f"{where}: {path}: cannot read ({type(e).__name__}: {_first_line(e)})") from None
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RecipeError(f"{where}: {path}: no split '{split}' (has {', '.join(ds)})")
            ds = ds[split]
        return ds
    if not p.exists() and looks_local(path):
        raise RecipeError(f"{where}: dataset {path} not found")
    try:  # a hub id, or a folder of data files
        return datasets.load_dataset(path, name=name, split=split, data_dir=data_dir, data_files=data_files)
    except Exception as e:
        raise RecipeError(f"{where}: dataset {path}: cannot load ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else "no message"


def _mixture_entry(cfg: dict, where: str):
    """A `datasets:` entry as TRL's DatasetConfig. A local file becomes its builder plus `data_files`, a
    `save_to_disk` directory the `arrow` builder over its shards; a missing local path is a one-line error."""
    from trl.scripts.utils import DatasetConfig

    path, p = cfg["path"], Path(cfg["path"])
    keep = {"columns": cfg.get("columns"), "fraction": cfg.get("fraction")}
    if p.is_file():
        builder = _FILE_BUILDERS.get(p.suffix)
        if builder is None:
            raise RecipeError(f"{where}: {path}: unsupported file type '{p.suffix}' (use {', '.join(_FILE_BUILDERS)})")
        return DatasetConfig(path=builder, data_files=str(p), split="train", **keep)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        split = cfg.get("split") or "train"
        shards = p / split if (p / "dataset_dict.json").is_file() else p
        if not shards.is_dir():
            raise RecipeError(f"{where}: {path}: no split '{split}'")
        return DatasetConfig(path="arrow", data_files=sorted(str(f) for f in shards.glob("*.arrow")), split="train",
                             **keep)
    if not p.exists() and looks_local(path):
        raise RecipeError(f"{where}: dataset {path} not found")
    return DatasetConfig(path=path, name=cfg.get("name"), data_dir=cfg.get("data_dir"),
                         data_files=cfg.get("data_files"), split=cfg.get("split") or "train", **keep)


def _load_mixture(entries: list[dict], source: str) -> datasets.Dataset:
    """The `datasets:` mixture through `trl.get_dataset` (loading, `columns`, `fraction` shares that oversample
    no dataset, concatenation), with local files and one-line errors."""
    from trl import DatasetMixtureConfig, get_dataset

    configs = []
    for i, cfg in enumerate(entries):
        configs.append(_mixture_entry(cfg, f"{source}: datasets[{i}]"))
    try:
        return get_dataset(DatasetMixtureConfig(datasets=configs))["train"]
    except Exception as e:  # datasets raises many types; a missing column is a ValueError from select_columns
        first = str(e).splitlines()[0] if str(e) else ""
        raise RecipeError(f"{source}: key 'datasets': cannot build the mixture ({type(e).__name__}: {first})") from None


def check_columns(ds: datasets.Dataset, stage: Stage, what: str) -> None:
    cols = set(ds.column_names)
    if not any(set(fmt) <= cols for fmt in FORMATS[stage]):
        wanted = " | ".join("+".join(f) for f in FORMATS[stage])
        raise RecipeError(f"{what}: columns {sorted(cols)} do not fit the {stage} stage (needs {wanted})")
    for i, row in enumerate(ds.select(range(min(len(ds), MAX_CHECKED_ROWS))), 1):  # rows count from 1
        problem = row_problem(row, stage)
        if problem:
            raise RecipeError(f"{what}: row {i}: {problem}")


_TEXT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected", "text")
_TRAINED_COLUMNS = ("messages", "completion", "chosen", "rejected", "text")  # an empty answer here trains nothing


def row_problem(row: dict, stage: Stage) -> str | None:
    """What is wrong with one training row for `stage`, or None."""
    fmt = next((f for f in FORMATS[stage] if all(row.get(c) is not None for c in f)), None)
    if fmt is None:
        wanted = " | ".join("+".join(f) for f in FORMATS[stage])
        present = sorted(k for k, v in row.items() if v is not None)
        return f"columns {present} do not fit the {stage} stage (needs {wanted})"
    for col in _TEXT_COLUMNS:
        if col in row and (row[col] is not None or col in fmt):
            problem = _column_problem(col, row[col])
            if problem:
                return f"column '{col}' {problem}"
    return None


def _column_problem(col: str, value) -> str | None:
    if value is None:
        return "is empty (null)"
    if isinstance(value, str):
        if col == "messages":
            return "must be a list of {role, content} messages, got a string"
        return "is empty" if not value.strip() else None
    if isinstance(value, list):
        if not value:
            return "is an empty list"
        for n, turn in enumerate(value, 1):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                return f"message {n} must be a {{role, content}} mapping"
            if turn["role"] not in _ROLES:
                return f"has an unknown role '{turn['role']}'"
            if not isinstance(turn["content"], str):
                got = "null" if turn["content"] is None else type(turn["content"]).__name__
                return f"message {n} ({turn['role']}): 'content' must be a string, got {got}"
            if turn["role"] == "assistant" and col in _TRAINED_COLUMNS and not turn["content"].strip():
                return f"message {n} (assistant) is empty: nothing to train on"
        if col == "messages" and not any(t["role"] == "assistant" for t in value):
            return "has no assistant message: nothing to train on"
        return None
    return f"has type {type(value).__name__} (expected text or messages)"


MAX_SCANNED_LINES = 200_000


def check_data_files(args: DataArguments, stage: Stage, source: str) -> None:
    """Check the local JSON Lines / JSON training files before anything is loaded: readable UTF-8, one JSON
    object per line, rows of a format the stage takes. Errors name the file and the 1-based line."""
    paths = [(f"{source}: key 'dataset_name'", args.dataset_name)] if args.dataset_name else []
    paths += [(f"{source}: datasets[{i}]", cfg["path"]) for i, cfg in enumerate(args.datasets)]
    for where, path in paths:
        p = Path(path)
        if p.is_file() and p.suffix not in _FILE_BUILDERS:
            raise RecipeError(f"{where}: {path}: unsupported file type '{p.suffix}' (use {', '.join(_FILE_BUILDERS)})")
        if p.is_file() and p.suffix in (".jsonl", ".json"):
            try:
                _check_json_file(p, stage)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
        elif not p.exists() and p.suffix in _FILE_BUILDERS:
            raise RecipeError(f"{where}: dataset {path} not found")


def _check_json_file(path: Path, stage: Stage) -> None:
    import json

    from pipeline.config import read_text

    if path.suffix == ".json":
        text = read_text(path, "data file")
        if not text.strip():
            raise RecipeError(f"{path}: the file is empty (no rows)")
        if text.lstrip()[:1] not in "[{":
            return _check_json_lines(path, stage)  # JSON Lines with a .json name
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(data, list):
            if not data:
                raise RecipeError(f"{path}: the file is empty (no rows)")
            for n, row in enumerate(data[:MAX_CHECKED_ROWS], 1):
                problem = row_problem(row, stage) if isinstance(row, dict) else "is not a JSON object"
                if problem:
                    raise RecipeError(f"{path}: row {n}: {problem}")
        return None
    return _check_json_lines(path, stage)


def _check_json_lines(path: Path, stage: Stage) -> None:
    """One JSON object per line, streamed: the first MAX_SCANNED_LINES lines parsed, MAX_CHECKED_ROWS rows checked."""
    from pipeline.io import read_jsonl

    rows = 0
    for n, row in read_jsonl(path, max_lines=MAX_SCANNED_LINES):
        rows += 1
        if rows <= MAX_CHECKED_ROWS:
            problem = row_problem(row, stage)
            if problem:
                raise RecipeError(f"{path}: line {n}: {problem}")
    if rows == 0:
        raise RecipeError(f"{path}: the file is empty (no rows)")


def load_train_data(args: DataArguments, stage: Stage, source: str, seed: int = 0):
    """(train, eval or None) for a stage, from `dataset_name` or the `datasets` mixture."""
    parts: list[datasets.Dataset] = []
    eval_ds = None
    if args.dataset_name:
        where = f"{source}: key 'dataset_name'"
        parts.append(_load_one(args.dataset_name, name=args.dataset_config, split=args.dataset_train_split, where=where))
        if args.eval_split_size is None and not Path(args.dataset_name).is_file():
            try:
                eval_ds = _load_one(args.dataset_name, name=args.dataset_config, split=args.dataset_test_split,
                                    where=where)
            except RecipeError:
                eval_ds = None  # no test split: fine, evaluation is optional
    if args.datasets:
        parts.append(_load_mixture(args.datasets, source))

    for i, ds in enumerate(parts):
        check_columns(ds, stage, f"{source}: dataset {i} ({len(ds)} rows)")
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1 or len(args.datasets) > 1:
        train = train.shuffle(seed=seed)
    if args.eval_split_size is not None:
        size = int(args.eval_split_size) if args.eval_split_size >= 1 else args.eval_split_size
        if isinstance(size, int) and size >= len(train):
            raise RecipeError(f"{source}: key 'eval_split_size' ({size} rows held out) leaves no training rows: the "
                              f"data has {len(train)}")
        split = train.train_test_split(test_size=size, seed=seed)
        train, eval_ds = split["train"], split["test"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if len(train) == 0:
        raise RecipeError(f"{source}: the training data is empty")
    logger.info("%s data: %d train rows%s", stage, len(train), f", {len(eval_ds)} eval rows" if eval_ds else "")
    return train, eval_ds


def token_lengths(dataset: datasets.Dataset) -> list[int]:
    """Each row's `input_ids` length, read in Arrow: no row's ids become Python lists (a real recipe's data has
    millions of tokens)."""
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def length_bucketed_order(lengths: list[int], edges: list[int], batch_size: int, seed: int) -> list[int]:
    """Row order for a sequential sampler: rows shuffled, cut into batches of `batch_size` inside their length bucket
    (`edges` in tokens), the batches shuffled, each bucket's remainder at the end. A batch pads only to lengths of
    its bucket, and batches still come in random order: transformers' `group_by_length` sorts every 50 batches by
    length, which on a task mixture orders the tasks (a tiny SFT: add 0.07 against 0.82; docs/BENCHMARKS.md)."""
    rng = random.Random(seed)
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        buckets.setdefault(bisect.bisect_left(edges, n), []).append(i)  # a row of `edge` tokens goes below it
    batches, rest = [], []
    for b in sorted(buckets):
        rows = buckets[b]
        rng.shuffle(rows)
        full = len(rows) - len(rows) % batch_size
        batches += [rows[i:i + batch_size] for i in range(0, full, batch_size)]
        rest += rows[full:]
    rng.shuffle(batches)
    # A short batch in the middle would shift every later batch off its bucket: the remainders go last.
    return [i for batch in batches for i in batch] + rest


def batch_by_length(trainer, edges: list[int], source: str) -> None:
    """Reorder the trainer's tokenized training rows by `length_bucketed_order` and have it read them in that order
    (`train_sampling_strategy: sequential`, which Trainer._get_train_sampler reads; pinned by
    tests/test_length_buckets.py). Every process computes the same order; a resumed run skips the batches it already
    took, as with any sampler."""
    args, train = trainer.args, trainer.train_dataset
    if "input_ids" not in train.column_names:
        raise RecipeError(f"{source}: key 'length_buckets' needs tokenized rows (input_ids): not for this dataset's "
                          "format")
    lengths = token_lengths(train)
    order = length_bucketed_order(lengths, edges, args.per_device_train_batch_size, args.seed)
    trainer.train_dataset = train.select(order)
    args.train_sampling_strategy = "sequential"
    sizes = Counter(bisect.bisect_left(edges, n) for n in lengths)
    logger.info("length buckets %s: %s rows", edges, [sizes[b] for b in range(len(edges) + 1)])


def report_truncation(trainer, rows: int, source: str) -> None:
    """Warn when the tokenized training rows reach `max_length` (TRL keeps their first `max_length` tokens, so a
    conversation loses the end of its last reply) or were dropped (TRL drops rows left with no loss token)."""
    args, train = trainer.args, trainer.train_dataset
    limit = getattr(args, "max_length", None)
    if (limit is None or "input_ids" not in train.column_names or getattr(args, "packing", False)
            or not trainer.is_world_process_zero()):
        return
    cut = sum(n >= limit for n in token_lengths(train))
    dropped = rows - len(train)
    if cut or dropped:
        logger.warning("%s: %d of %d training rows reach max_length %d (cut at the end: a reply loses its last tokens)"
                       "%s", source, cut, rows, limit,
                       f"; {dropped} rows had no loss token left and were dropped" if dropped > 0 else "")

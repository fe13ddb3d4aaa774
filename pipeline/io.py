"""Atomic file writes, the stage-result contract the staged runner reads, and two small helpers every
stage shares: which names are local paths, and model fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

STAGE_RESULT = "stage_result.json"
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".yaml", ".yml", ".safetensors"}


def looks_local(name: str) -> bool:
    """Whether `name` (a model or dataset) is meant as a local path rather than a hub id ("name" or
    "org/name"), so that a missing one is a one-line error instead of a hub lookup."""
    first = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in _LOCAL_SUFFIXES
            or ("/" in name and (first == "outputs" or Path(first).is_dir())))


def model_fingerprint(model, embeddings_only: bool = False) -> str:
    """sha256 that tells two models apart, computed on CPU (any device, any dtype of the same weights).

    Default: every parameter's name, shape and a strided sample of its values. `embeddings_only`: the config's
    shape and a slice of the input embedding rounded to bfloat16, which bitsandbytes never quantizes and LoRA
    on linear layers never touches, so a 4-bit load (or a bf16 one) of a checkpoint matches its fp32 self."""
    import torch

    if embeddings_only:
        c = model.config
        shape = [c.model_type, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size,
                 getattr(c, "max_position_embeddings", None)]
        h = hashlib.sha256(json.dumps(shape).encode())
        emb = model.get_input_embeddings().weight.detach()
        h.update(emb[:16, :64].to("cpu", torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().float().flatten()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should read like any other file
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_stage_result(output_dir: str | os.PathLike, stage: str, metrics: dict, artifacts: dict | None = None) -> Path:
    """Mark a stage complete. The runner skips stages whose result exists and shows `metrics` in its report.

    `metrics`: flat name -> number/string (e.g. {"train_loss": 1.2, "accuracy/add": 0.4});
    `artifacts`: name -> path (e.g. {"model": "outputs/tiny/sft"}).
    """
    path = Path(output_dir) / STAGE_RESULT
    atomic_write_json(path, {"stage": stage, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "metrics": metrics, "artifacts": artifacts or {"output_dir": str(output_dir)}})
    return path


def read_stage_result(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / STAGE_RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: str | os.PathLike, what: str = "file", max_lines: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-empty line of a JSONL file (the first `max_lines` lines if given), streamed.
    A missing or unreadable file, bytes that are not UTF-8, or a line that is not a JSON object raise a RecipeError
    naming the file and the 1-based line."""
    from pipeline.config import RecipeError

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what}: {path} not found")
    try:
        fh = path.open("rb")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        for n, raw in enumerate(fh, 1):
            if max_lines is not None and n > max_lines:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecipeError(f"{path}: line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row

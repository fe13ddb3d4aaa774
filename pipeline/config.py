"""Strict recipe parsing: a YAML file plus command-line overrides into dataclasses (TRL's and ours).

Why not `trl.TrlParser` (read in trl 1.16, scripts/utils.py): it sets YAML values as argparse defaults.
That converts a string such as `learning_rate: 1e-5` and rejects an unknown key, but a value that is not a
string is never checked (`learning_rate: [1]` or `max_steps: 1.5` reach the config as they are), a bad string
exits through argparse's usage message without naming the file, there are no "did you mean" hints, and
list/dict fields (teachers, dataset mixtures) pass unchecked. Here every key must belong to one of the
stage's dataclasses, every value must fit its field's type, and cross-field rules run before anything
heavy is loaded. A violation raises `RecipeError`, which
`cli()` prints as one line naming the file, the key and the nearest valid key, then exits with 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from trl import ModelConfig, ScriptArguments


class RecipeError(Exception):
    """A bad recipe or command line. The message is one line and names the file and the key."""


class RunError(RuntimeError):
    """A stage that cannot go on for a reason outside the recipe (e.g. an unreachable teacher endpoint)."""


# ---------------------------------------------------------------------------------------------
# Arguments shared by the training stages (TRL's classes extended, not forked)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelArguments(ModelConfig):
    tiny_model: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Tiny-model spec YAML (see recipes/tiny/model.yaml). If model_name_or_path does not "
                  "exist, the tiny model is built from this spec (once) and used instead. Offline smoke tests."},
    )
    ref_model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "DPO: a separate reference model. Default: the policy's initial weights (with LoRA: "
                  "the base with adapters disabled)."},
    )
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata={"help": "Run code shipped with a hub model. Off unless the recipe asks."}
    )
    preserve_super_weights: bool = dataclasses.field(
        default=False, metadata={"help": "QLoRA: hold the model's super weights out of 4/8-bit quantization and add "
                                 "them back exactly (pipeline.quant). Needs load_in_4bit or load_in_8bit."})
    super_weight_registry: str | None = dataclasses.field(
        default=None, metadata={"help": "Registry from `python -m pipeline.quant.detect`. Default: detect on the "
                                "full-precision model and write <output_dir>/super_weights.json."})


@dataclasses.dataclass
class DataArguments(ScriptArguments):
    """TRL's script arguments (dataset_name, splits, ...) plus a strict local/hub mixture."""

    datasets: list[dict] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Mixture: a list of {path, name, split, data_files, columns, fraction}. `path` is a hub "
                  "id, a .jsonl/.json/.parquet file, or a directory written by Dataset.save_to_disk."},
    )
    eval_split_size: float | None = dataclasses.field(
        default=None, metadata={"help": "Hold out this fraction (or count, if >= 1) of train rows for evaluation."}
    )
    max_train_samples: int | None = dataclasses.field(
        default=None, metadata={"help": "Keep only the first N training rows (smoke tests)."}
    )
    length_buckets: list[int] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Token-length edges, e.g. [256] (rows of <= 256 tokens, and longer ones): each training "
                  "batch holds rows of one bucket only (rows shuffled, batched within their bucket, batches "
                  "shuffled), so a few long rows no longer pad most batches to their length. Replaces the sampler "
                  "(train_sampling_strategy: sequential over that order); every epoch repeats it."})
    eval_tasks: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Task-world tasks to score after training (held-out test split, greedy); the accuracy "
                  "joins the stage's metrics and the staged report."},
    )
    eval_examples: int = dataclasses.field(default=50, metadata={"help": "Held-out examples per eval task."})
    eval_system_prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "System message of the eval_tasks prompts (a model trained with system "
                                "prompts is scored under the one it is deployed with)."})
    accelerate_config: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The accelerate config this recipe is meant to be launched with; cross-checked "
                  "(e.g. QLoRA with ZeRO-3 is rejected) and printed by --dry_run."},
    )
    dry_run: bool = dataclasses.field(
        default=False, metadata={"help": "Parse and check the recipe, print the plan, and exit without training."}
    )


DATASET_KEYS = ("path", "name", "split", "data_dir", "data_files", "columns", "fraction")


# ---------------------------------------------------------------------------------------------
# Type checking of values
# ---------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    pass


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        return " | ".join(_type_name(a) for a in args if not (enums and a is str))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in tp)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any) -> Any:
    """Return `value` checked (and, for numbers written as strings, converted) against type `tp`."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string must still name a member
            if any(value in {e.value for e in en} for en in enums):
                return value
            raise _Mismatch
        for arg in args:  # an exact type match wins over a conversion (e.g. dict | str)
            if arg is not type(None) and isinstance(arg, type) and not typing.get_args(arg) and _exact(arg, value):
                return value
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `lora_target_modules: all-linear` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        inner = args[0] if args else Any
        return [coerce(inner, v) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if value in {e.value for e in tp}:
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, (dict, tp)):
            return value
        raise _Mismatch
    return value  # a type we do not model (callables, objects): let the dataclass decide


def _exact(tp: type, value: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _fields(dataclass_types) -> dict[str, tuple[type, Any, dataclasses.Field]]:
    out: dict[str, tuple[type, Any, dataclasses.Field]] = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                out.setdefault(f.name, (cls, hints.get(f.name, Any), f))
    return out


def _nearest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# Keys that were retired, with what replaces them.
RETIRED = {"shard_optimizer_state": "optimizer-state sharding is DeepSpeed's ZeRO-1 now: launch with "
                                    "accelerate_configs/zero1.yaml (sequence_parallel_size runs under it)"}

# Keys whose accepted type is wider than the field's annotation: TrainingArguments types
# `resume_from_checkpoint` as str, but Trainer.train takes True (= the last checkpoint in output_dir).
TYPE_OVERRIDES: dict[str, Any] = {"resume_from_checkpoint": bool | str | None}


def _check_value(fields, key: str, value: Any, where: str, cli_raw: str | None = None) -> Any:
    from pipeline.validation import check_path, check_value, shown

    if key not in fields:
        if key in RETIRED:
            raise RecipeError(f"{where}: key '{key}' was retired: {RETIRED[key]}")
        raise RecipeError(f"{where}: unknown key '{key}'{_nearest(key, fields)}")
    owner, tp, _ = fields[key]
    tp = TYPE_OVERRIDES.get(key, tp)
    try:
        value = coerce(tp, value)
    except _Mismatch:
        if cli_raw is None:
            raise RecipeError(f"{where}: key '{key}' must be {_type_name(tp)}, got {shown(value)}") from None
        try:  # `--run_name 007` should stay the string '007'
            value = coerce(tp, cli_raw)
        except _Mismatch:
            raise RecipeError(f"{where}: option --{key} must be {_type_name(tp)}, got {shown(cli_raw)}") from None
    check_value(owner, key, value, where)
    check_path(key, value, where)
    if key == "datasets":
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "path" not in item:
                raise RecipeError(f"{where}: datasets[{i}] must be a mapping with a 'path'")
            for k in item:
                if k not in DATASET_KEYS:
                    raise RecipeError(f"{where}: unknown key 'datasets[{i}].{k}'{_nearest(k, DATASET_KEYS)}")
            if item.get("fraction") is not None:
                try:
                    item["fraction"] = coerce(float, item["fraction"])
                except _Mismatch:
                    raise RecipeError(f"{where}: key 'datasets[{i}].fraction' must be float, "
                                      f"got {shown(item['fraction'])}") from None
                check_value(None, "fraction", item["fraction"], where, label=f"datasets[{i}].fraction")
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise RecipeError(f"{self.name}: line {key_node.start_mark.line + 1}: key '{key}' given twice "
                                      f"(first on line {seen[key] + 1}); the recipe must say it once")
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def read_text(path: Path, what: str = "file") -> str:
    """A file's text; a file that is not UTF-8 is a one-line error naming the line of the first bad byte."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    text = read_text(path, "recipe file")
    try:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def _is_list_field(fields, key: str) -> bool:
    tp = fields[key][1] if key in fields else None
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(typing.get_origin(t) in (list, tuple) for t in options)


def _split_cli(argv: list[str], fields) -> list[tuple[str, Any, str | None]]:
    """`--key value`, `--key=value`, `--key v1 v2` (lists) and bare `--flag` (booleans) into (key, parsed, raw)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise RecipeError(f"command line: unexpected argument '{tok}' (options look like --key value)")
        key, eq, raw = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = argv[i + 1 : j]
            if not values:
                raw = "true"  # bare flag
            elif len(values) > 1 and _is_list_field(fields, key):
                out.append((key, [_yaml_scalar(v) for v in values], None))
                i = j
                continue
            elif len(values) > 1:
                raise RecipeError(f"command line: option --{key} takes one value, got {' '.join(values)}")
            else:
                raw = values[0]
            i = j - 1
        i += 1
        out.append((key, _yaml_scalar(raw), raw))
    return out


def _yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def print_help(prog: str, dataclass_types) -> None:
    print(f"usage: {prog} --config RECIPE.yaml [--key value ...]\n")
    print("Every key below can be set in the recipe or overridden on the command line.")
    for cls in dataclass_types:
        print(f"\n{cls.__name__}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                "[]" if f.default_factory is not dataclasses.MISSING else "required")
            helptext = " ".join(str(f.metadata.get("help", "")).split())[:110]
            print(f"  --{f.name} ({_type_name(hints.get(f.name, Any))}, default {default}) {helptext}")


def parse(dataclass_types, argv: list[str] | None = None, prog: str = "pipeline"):
    """Parse `--config FILE` plus overrides into one instance per dataclass type (in order).

    Returns (instances, values, source): `values` are the keys the user set explicitly, which lets
    stages tell "left at default" from "asked for".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help(prog, dataclass_types)
        raise SystemExit(0)
    fields = _fields(dataclass_types)
    source = "command line"
    values: dict[str, Any] = {}
    argv = [part for a in argv for part in (["--config", a[9:]] if a.startswith("--config=") else [a])]
    if argv.count("--config") > 1:
        raise RecipeError("command line: --config must be given once, as '--config RECIPE.yaml' "
                          "(override single keys with --key value)")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("command line: --config needs a recipe path")
        source = argv[i + 1]
        del argv[i : i + 2]
        for key, value in load_yaml(source).items():
            values[key] = _check_value(fields, str(key), value, source)
    for key, parsed, raw in _split_cli(argv, fields):
        values[key] = _check_value(fields, key, parsed, f"{source} (command line)", cli_raw=raw)

    # TRL defaults to bf16=True, which TrainingArguments rejects on a machine without bf16 support; and
    # without CUDA, transformers joins a multi-process launch (DDP/DeepSpeed over gloo) only with use_cpu.
    if "bf16" in fields and "bf16" not in values and not values.get("fp16"):
        values["bf16"] = _bf16_available()
    if "use_cpu" in fields and "use_cpu" not in values and not _cuda_available():
        values["use_cpu"] = True

    instances = []
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in values.items() if k in names}
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecipeError(f"{source}: missing required key '{missing[0]}'")
        try:
            instances.append(cls(**kwargs))
        except (ValueError, TypeError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"{source}: {first}") from None
    from pipeline.validation import check_cross

    check_cross({k: getattr(inst, k) for inst in instances for k in vars(inst)}, source)
    return tuple(instances), values, source


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# ---------------------------------------------------------------------------------------------
# Cross-field rules shared by the training stages
# ---------------------------------------------------------------------------------------------


def zero_stage(training_args, data_args) -> int | None:
    """The DeepSpeed ZeRO stage this run will use: from the trainer's `deepspeed` config, the environment
    `accelerate launch` sets, or the recipe's `accelerate_config`."""
    ds = getattr(training_args, "deepspeed", None)
    if isinstance(ds, str) and ds:
        try:
            ds = json.loads(Path(ds).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"deepspeed: cannot read DeepSpeed config {ds}: {e}") from None
    if isinstance(ds, dict):
        stage = ds.get("zero_optimization", {}).get("stage")
        if stage is not None:
            return int(stage)
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    if getattr(data_args, "accelerate_config", None):
        cfg = load_yaml(data_args.accelerate_config)
        stage = (cfg.get("deepspeed_config") or {}).get("zero_stage")
        return int(stage) if stage is not None else None
    return None


def check_training(model_args: ModelArguments, training_args, data_args: DataArguments, source: str) -> None:
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and not model_args.use_peft:
        key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        raise RecipeError(f"{source}: key '{key}' needs 'use_peft: true' (a quantized base cannot be fully "
                          "fine-tuned; train LoRA adapters on it, i.e. QLoRA)")
    if model_args.preserve_super_weights and not quantized:
        raise RecipeError(f"{source}: key 'preserve_super_weights' needs 'load_in_4bit: true' or 'load_in_8bit: true'")
    if model_args.super_weight_registry and not Path(model_args.super_weight_registry).is_file():
        raise RecipeError(f"{source}: key 'super_weight_registry': file {model_args.super_weight_registry} not found")
    if data_args.accelerate_config and not Path(data_args.accelerate_config).is_file():
        raise RecipeError(f"{source}: key 'accelerate_config': file {data_args.accelerate_config} not found")
    stage = zero_stage(training_args, data_args)
    if quantized and stage == 3:
        raise RecipeError(f"{source}: key 'load_in_4bit'/'load_in_8bit' (QLoRA) does not work with DeepSpeed "
                          "ZeRO-3: use ZeRO-2 (accelerate_configs/zero2.yaml) or DDP")
    if model_args.ref_model_name_or_path and model_args.use_peft:
        raise RecipeError(f"{source}: key 'ref_model_name_or_path' with 'use_peft: true': the reference is the "
                          "base with adapters disabled; drop one of them")
    edges = data_args.length_buckets
    if edges and (any(e < 1 for e in edges) or edges != sorted(set(edges))):
        raise RecipeError(f"{source}: key 'length_buckets' must be increasing token lengths >= 1, got {edges}")
    if edges and (getattr(training_args, "packing", False) or getattr(training_args, "padding_free", False)):
        raise RecipeError(f"{source}: key 'length_buckets' batches padded rows by length: packed or padding-free rows "
                          "have no padding to save")
    if edges and getattr(training_args, "train_sampling_strategy", "random") != "random":
        raise RecipeError(f"{source}: key 'length_buckets' sets the batch order itself: drop "
                          f"'train_sampling_strategy: {training_args.train_sampling_strategy}'")
    if data_args.eval_tasks:
        from pipeline.tasks import TASKS

        for task in data_args.eval_tasks:
            if task not in TASKS:
                raise RecipeError(f"{source}: key 'eval_tasks': unknown task '{task}' (valid: {', '.join(TASKS)})")
    if not data_args.dataset_name and not data_args.datasets:
        raise RecipeError(f"{source}: no training data: set 'dataset_name' or 'datasets'")


# Exit code of a teacher request that still failed after its retries (the input may be fine: rerun to resume).
EXIT_TEACHER = 3


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's `main`, turning a RecipeError into one line on stderr and exit code 2, a teacher that failed after
    its retries (an unreachable endpoint, a server error) into one line and exit code 3, another RunError into one line
    and exit code 1."""
    try:
        main(argv)
    except RecipeError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        teachers = sys.modules.get("pipeline.generation.teachers")
        teacher_error = getattr(teachers, "TeacherError", None)
        raise SystemExit(EXIT_TEACHER if teacher_error is not None and isinstance(e, teacher_error) else 1) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

"""The README's promise, tried as a new user would: a bad recipe, value, file, row, model path, output dir or
teacher exits 2 with exactly one `error:` line naming the file / key / row, no traceback, nothing marked
complete, and fast: before any model, tokenizer or dataset is loaded (the loaders are replaced by tripwires).

Most cases run in-process through `pipeline.config.cli` (the same path `python -m pipeline.<stage>` takes);
a handful run the real CLI in a subprocess. The per-case time limit is generous for shared CPUs; the battery's
total is printed by `test_battery_is_fast`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import cli
from tests.conftest import ROOT

SECRET = "sk-proj-Zq81xLm3Vb7Rt5Yw2Kd9Hs4Fg6Jc0Pn"
TIMES: dict[str, float] = {}
LIMIT_S = 10.0  # per case; they take well under a second each when the machine is not shared


class LoadedTooEarly(BaseException):
    """Raised by the tripwires: a case that should fail before loading reached a loader."""


@pytest.fixture
def tripwires(monkeypatch):
    import datasets
    import transformers

    def trip(*a, **k):
        raise LoadedTooEarly(f"a loader ran before the bad input was reported: {a[:1]}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", trip)
    monkeypatch.setattr(datasets, "load_dataset", trip)
    monkeypatch.setattr(datasets, "load_from_disk", trip)


class Ctx:
    """Paths and writers for one case."""

    def __init__(self, tmp: Path, model: Path, sft: Path, dpo: Path):
        self.tmp, self.model, self.sft, self.dpo, self.out = tmp, model, sft, dpo, tmp / "out"

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def rows(self, name: str, rows: list) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def recipe(self, text: str | bytes, name: str = "r.yaml") -> str:
        return self.file(name, text)

    # base command lines per stage
    def sft_args(self, *extra, data=None):
        return ["--model_name_or_path", str(self.model), "--dataset_name", str(data or self.sft), "--output_dir",
                str(self.out), "--max_steps", "2", "--report_to", "none", *extra]

    def dpo_args(self, *extra, data=None):
        return ["--model_name_or_path", str(self.model), "--dataset_name", str(data or self.dpo), "--output_dir",
                str(self.out), "--max_steps", "2", "--report_to", "none", *extra]

    def gen_args(self, *extra):
        return ["--output_dir", str(self.out), "--tasks", "add", "--n_per_task", "2", "--n_samples", "1", *extra]

    def eval_args(self, *extra):
        return ["--model_name_or_path", str(self.model), "--output_dir", str(self.out), "--tasks", "add", "--n", "2",
                *extra]

    def cppo_args(self, *extra):
        return ["--model_name_or_path", str(self.model), "--output_dir", str(self.out), "--tasks",
                "[{task: add, max_steps: 1}]", "--report_to", "none", *extra]

    def evo_args(self, *extra):
        return ["--output_dir", str(self.out), "--task_model_name_or_path", str(self.model), *extra]

    def not_a_model(self) -> str:
        (self.tmp / "empty_dir").mkdir(exist_ok=True)
        return str(self.tmp / "empty_dir")

    def model_without_tokenizer(self) -> str:
        import shutil

        d = self.tmp / "no_tok"
        d.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(self.model / f, d / f)
        return str(d)

    def broken_config(self) -> str:
        d = Path(self.model_without_tokenizer())
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_text((self.model / f).read_text())
        (d / "config.json").write_text('{"model_type": "llama",')
        return str(d)

    def checkpoint(self, keys: dict, step: int = 2) -> None:
        ckpt = self.out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 4}))
        (self.out / "recipe_fingerprint.json").write_text(json.dumps({"stage": "sft", "keys": keys}))

    def pipeline(self, stage_recipe: str, module: str = "pipeline.sft", extra: dict | None = None,
                 text: str | None = None) -> str:
        data = {"output_dir": str(self.tmp / "run"), "stages": [
            {"name": "tiny", "module": "pipeline.tiny", "config": self.recipe(f"output_dir: {self.tmp / 'base'}\n",
                                                                                "tiny.yaml")},
            {"name": "train", "module": module, "config": stage_recipe, **(extra or {})}]}
        return self.recipe(text if text is not None else yaml.safe_dump(data), "pipeline.yaml")


def _fraction_recipe(c: Ctx, fraction) -> list[str]:
    r = c.recipe(f"datasets:\n  - {{path: {c.sft}, fraction: {fraction}}}\n  - {{path: {c.sft}, fraction: 0.5}}\n")
    return ["--config", r, *c.sft_args()[2:]]


def _data(c: Ctx, name: str, content) -> list[str]:
    path = c.rows(name, content) if isinstance(content, list) else c.file(name, content)
    return c.sft_args(data=path)


USER = {"role": "user", "content": "What is 1+1?"}
ANSWER = {"role": "assistant", "content": "Answer: 2"}

# (id, stage module, argv from a Ctx, substrings the one error line must contain)
CASES: list[tuple[str, str, object, list[str]]] = [
    # --- values: ours and TRL's, at parse time -------------------------------------------------------------
    ("sft-negative-lr", "sft", lambda c: c.sft_args("--learning_rate", "-1"), ["key 'learning_rate'", "> 0", "-1"]),
    ("sft-batch-0", "sft", lambda c: c.sft_args("--per_device_train_batch_size", "0"),
     ["key 'per_device_train_batch_size'", ">= 1", "got 0"]),
    ("sft-grad-accum-0", "sft", lambda c: c.sft_args("--gradient_accumulation_steps", "0"),
     ["key 'gradient_accumulation_steps'", ">= 1"]),
    ("sft-lora-r-0", "sft", lambda c: c.sft_args("--use_peft", "true", "--lora_r", "0"), ["key 'lora_r'", ">= 1"]),
    ("sft-lora-alpha-0", "sft", lambda c: c.sft_args("--use_peft", "true", "--lora_alpha", "0"), ["key 'lora_alpha'"]),
    ("sft-lora-dropout-1", "sft", lambda c: c.sft_args("--lora_dropout", "1.0"), ["key 'lora_dropout'", "[0, 1)"]),
    ("sft-max-length-0", "sft", lambda c: c.sft_args("--max_length", "0"), ["key 'max_length'", ">= 1"]),
    ("sft-zero-epochs", "sft", lambda c: c.sft_args("--max_steps", "-1", "--num_train_epochs", "0"),
     ["key 'num_train_epochs'", "max_steps"]),
    ("sft-max-steps-0", "sft", lambda c: c.sft_args("--max_steps", "0"), ["key 'max_steps'", ">= 1 or -1"]),
    ("sft-warmup-negative", "sft", lambda c: c.sft_args("--warmup_steps", "-1"), ["key 'warmup_steps'", ">= 0"]),
    ("sft-weight-decay-negative", "sft", lambda c: c.sft_args("--weight_decay", "-0.1"), ["key 'weight_decay'"]),
    ("sft-adam-beta2-1.5", "sft", lambda c: c.sft_args("--adam_beta2", "1.5"), ["key 'adam_beta2'", "[0, 1)"]),
    ("sft-logging-steps-0", "sft", lambda c: c.sft_args("--logging_steps", "0"), ["key 'logging_steps'", "> 0"]),
    ("sft-save-steps-negative", "sft", lambda c: c.sft_args("--save_steps", "-5"), ["key 'save_steps'"]),
    ("sft-save-total-limit-0", "sft", lambda c: c.sft_args("--save_total_limit", "0"), ["key 'save_total_limit'"]),
    ("sft-seed-negative", "sft", lambda c: c.sft_args("--seed", "-1"), ["key 'seed'", ">= 0"]),
    ("sft-max-grad-norm-negative", "sft", lambda c: c.sft_args("--max_grad_norm", "-1"), ["key 'max_grad_norm'"]),
    ("sft-eval-split-0", "sft", lambda c: c.sft_args("--eval_split_size", "0"), ["key 'eval_split_size'"]),
    ("sft-max-train-samples-0", "sft", lambda c: c.sft_args("--max_train_samples", "0"), ["key 'max_train_samples'"]),
    ("sft-tile-tokens-0", "sft", lambda c: c.sft_args("--tiled_mlp_tile_tokens", "0"),
     ["key 'tiled_mlp_tile_tokens'"]),
    ("sft-sp-size-0", "sft", lambda c: c.sft_args("--sequence_parallel_size", "0"), ["key 'sequence_parallel_size'"]),
    ("sft-retired-shard-optimizer-state", "sft", lambda c: c.sft_args("--shard_optimizer_state", "true"),
     ["key 'shard_optimizer_state' was retired", "accelerate_configs/zero1.yaml"]),
    ("sft-bucket-view-under-zero3", "sft", lambda c: c.sft_args("--gradient_as_bucket_view", "true",
                                                                 "--accelerate_config", str(ROOT / "accelerate_configs/zero3.yaml")),
     ["key 'gradient_as_bucket_view' is for DDP", "ZeRO-3"]),
    ("sft-nan-lr", "sft", lambda c: c.sft_args("--learning_rate", "nan"), ["key 'learning_rate'", "nan"]),
    ("sft-negative-fraction", "sft", lambda c: _fraction_recipe(c, -0.5),
     ["r.yaml", "key 'datasets[0].fraction'", "(0, 1]", "-0.5"]),
    ("sft-fraction-not-a-number", "sft", lambda c: _fraction_recipe(c, "half"),
     ["key 'datasets[0].fraction' must be float", "'half'"]),
    ("dpo-negative-beta", "dpo", lambda c: c.dpo_args("--beta", "-1"), ["key 'beta'", "> 0", "-1"]),
    ("dpo-beta-0", "dpo", lambda c: c.dpo_args("--beta", "0"), ["key 'beta'", "> 0"]),
    ("dpo-label-smoothing", "dpo", lambda c: c.dpo_args("--label_smoothing", "0.7"), ["key 'label_smoothing'"]),
    ("dpo-max-length-0", "dpo", lambda c: c.dpo_args("--max_length", "0"), ["key 'max_length'"]),
    ("dpo-ref-batch-0", "dpo", lambda c: c.dpo_args("--precompute_ref_batch_size", "0"),
     ["key 'precompute_ref_batch_size'"]),
    ("value-in-recipe-file", "sft", lambda c: ["--config", c.recipe("learning_rate: -3e-4\n"), *c.sft_args()],
     ["r.yaml", "key 'learning_rate'", "-0.0003"]),
    # --- recipes -------------------------------------------------------------------------------------------
    ("recipe-not-utf8", "sft", lambda c: ["--config", c.recipe(b"max_steps: 2\nrun_name: caf\xe9\n"), *c.sft_args()],
     ["r.yaml", "line 2", "not UTF-8"]),
    ("recipe-key-twice", "sft",
     lambda c: ["--config", c.recipe("learning_rate: 1e-3\nmax_steps: 2\nlearning_rate: 1e-4\n"), *c.sft_args()],
     ["r.yaml", "line 3", "key 'learning_rate' given twice", "line 1"]),
    ("config-twice", "sft", lambda c: ["--config", c.recipe("max_steps: 2\n"), "--config", c.recipe("", "b.yaml"),
                                       *c.sft_args()], ["--config must be given once"]),
    ("config-twice-with-equals", "sft", lambda c: ["--config=" + c.recipe("max_steps: 2\n"), "--config",
                                                   c.recipe("", "b.yaml"), *c.sft_args()],
     ["--config must be given once"]),
    ("config-equals-form-is-read", "sft", lambda c: ["--config=" + c.recipe("learning_rate: -1\n"), *c.sft_args()],
     ["r.yaml", "key 'learning_rate'"]),
    ("recipe-unknown-key", "sft", lambda c: ["--config", c.recipe("lerning_rate: 1e-3\n"), *c.sft_args()],
     ["r.yaml", "unknown key 'lerning_rate'", "did you mean 'learning_rate'"]),
    ("recipe-wrong-type", "sft", lambda c: ["--config", c.recipe("num_train_epochs: two\n"), *c.sft_args()],
     ["r.yaml", "key 'num_train_epochs' must be float"]),
    ("recipe-invalid-yaml", "sft", lambda c: ["--config", c.recipe("a: 1\nb: [unclosed\n"), *c.sft_args()],
     ["r.yaml", "invalid YAML"]),
    ("recipe-missing", "sft", lambda c: ["--config", str(c.tmp / "nope.yaml")], ["nope.yaml", "recipe file not found"]),
    ("recipe-is-a-directory", "sft", lambda c: ["--config", str(c.tmp)], ["is a directory"]),
    ("resume-bad-path", "sft", lambda c: c.sft_args("--resume_from_checkpoint", str(c.tmp / "nowhere")),
     ["key 'resume_from_checkpoint'", "nowhere", "not a complete checkpoint"]),
    ("resume-true-no-checkpoint", "sft", lambda c: c.sft_args("--resume_from_checkpoint", "true"),
     ["key 'resume_from_checkpoint: true'", "no complete checkpoint"]),
    # --- data files (1-based lines) ------------------------------------------------------------------------
    ("data-empty-file", "sft", lambda c: _data(c, "d.jsonl", ""), ["d.jsonl", "empty"]),
    ("data-bad-json-line", "sft", lambda c: _data(c, "d.jsonl", json.dumps({"messages": [USER, ANSWER]}) + "\n"
                                                   + json.dumps({"messages": [USER, ANSWER]}) + "\n{\"messages\": [\n"),
     ["d.jsonl", "line 3", "invalid JSON"]),
    ("data-not-utf8", "sft", lambda c: _data(c, "d.jsonl", (json.dumps({"messages": [USER, ANSWER]}) + "\n").encode()
                                              + b'{"text": "caf\xe9"}\n'), ["d.jsonl", "line 2", "not UTF-8"]),
    ("data-content-null", "sft", lambda c: _data(c, "d.jsonl", [{"messages": [{"role": "user", "content": None},
                                                                             ANSWER]}]),
     ["d.jsonl", "line 1", "'content' must be a string, got null"]),
    ("data-messages-string", "sft", lambda c: _data(c, "d.jsonl", [{"messages": "hello"}]),
     ["d.jsonl", "line 1", "column 'messages' must be a list"]),
    ("data-empty-assistant", "sft", lambda c: _data(c, "d.jsonl", [{"messages": [USER, ANSWER]},
                                                                    {"messages": [USER, {"role": "assistant",
                                                                                         "content": " "}]}]),
     ["d.jsonl", "line 2", "(assistant) is empty"]),
    ("data-no-assistant", "sft", lambda c: _data(c, "d.jsonl", [{"messages": [USER]}]),
     ["d.jsonl", "line 1", "no assistant message"]),
    ("data-unknown-role", "sft", lambda c: _data(c, "d.jsonl", [{"messages": [USER, ANSWER]},
                                                                 {"messages": [{"role": "bot", "content": "x"}]}]),
     ["d.jsonl", "line 2", "unknown role 'bot'"]),
    ("data-wrong-columns", "sft", lambda c: _data(c, "d.jsonl", [{"question": "q", "answer": "a"}]),
     ["d.jsonl", "line 1", "do not fit the sft stage"]),
    ("data-line-not-object", "sft", lambda c: _data(c, "d.jsonl", "[1, 2]\n"), ["d.jsonl", "line 1", "JSON object"]),
    ("data-blank-lines-counted", "sft", lambda c: _data(c, "d.jsonl", "\n\n" + json.dumps({"messages": []}) + "\n"),
     ["d.jsonl", "line 3", "empty list"]),
    ("data-missing-file", "sft", lambda c: c.sft_args(data=c.tmp / "missing.jsonl"),
     ["key 'dataset_name'", "missing.jsonl not found"]),
    ("data-unsupported-type", "sft", lambda c: _data(c, "d.txt", "hello\n"), ["d.txt", "unsupported file type"]),
    ("data-json-array-invalid", "sft", lambda c: _data(c, "d.json", '[{"text": "a"},\n {"text": }]'),
     ["d.json", "line 2", "invalid JSON"]),
    ("data-mixture-row", "sft", lambda c: ["--config", c.recipe(
        f"datasets:\n  - {{path: {c.sft}}}\n  - {{path: {c.rows('m.jsonl', [{'text': ''}])}}}\n"),
        *c.sft_args()[2:]], ["datasets[1]", "m.jsonl", "line 1", "column 'text' is empty"]),
    ("dpo-sft-rows", "dpo", lambda c: c.dpo_args(data=c.sft), ["sft.jsonl", "line 1", "do not fit the dpo stage"]),
    ("dpo-empty-chosen", "dpo", lambda c: c.dpo_args(data=c.rows("p.jsonl", [
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": [ANSWER]}])),
     ["p.jsonl", "line 1", "column 'chosen'", "(assistant) is empty"]),
    ("dpo-empty-file", "dpo", lambda c: c.dpo_args(data=c.file("p.jsonl", "\n\n")), ["p.jsonl", "empty"]),
    # --- models --------------------------------------------------------------------------------------------
    ("model-dir-not-a-model", "sft", lambda c: ["--model_name_or_path", c.not_a_model(), *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "empty_dir", "is not a model directory", "config.json"]),
    ("model-is-a-file", "sft", lambda c: ["--model_name_or_path", str(c.sft), *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "is a file, not a model directory"]),
    ("model-uncached-hub-id", "sft", lambda c: ["--model_name_or_path", "nobody-xyz/no-such-model", *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "nobody-xyz/no-such-model", "not in the hub cache"]),
    ("model-no-tokenizer", "sft", lambda c: ["--model_name_or_path", c.model_without_tokenizer(), *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "no tokenizer files"]),
    ("model-config-not-json", "sft", lambda c: ["--model_name_or_path", c.broken_config(), *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "config.json is not valid JSON"]),
    ("model-missing", "sft", lambda c: ["--model_name_or_path", str(c.tmp / "gone"), *c.sft_args()[2:]],
     ["key 'model_name_or_path'", "gone not found"]),
    ("model-missing-tiny-spec", "sft", lambda c: ["--model_name_or_path", str(c.tmp / "gone"), "--tiny_model",
                                                  str(c.tmp / "spec.yaml"), *c.sft_args()[2:]],
     ["key 'tiny_model'", "spec.yaml not found"]),
    ("dpo-ref-not-a-model", "dpo", lambda c: c.dpo_args("--ref_model_name_or_path", c.not_a_model()),
     ["key 'ref_model_name_or_path'", "is not a model directory"]),
    # --- output dirs ---------------------------------------------------------------------------------------
    ("output-dir-is-a-file", "sft", lambda c: [*c.sft_args(), "--output_dir", c.file("f.txt", "x")],
     ["key 'output_dir'", "f.txt is a file"]),
    ("output-dir-under-a-file", "sft", lambda c: [*c.sft_args(), "--output_dir", c.file("g.txt", "x") + "/sub"],
     ["key 'output_dir'", "g.txt is a file"]),
    ("output-dir-read-only", "sft", lambda c: [*c.sft_args(), "--output_dir", "/proc/pipeline-test-out"],
     ["key 'output_dir'", "/proc/pipeline-test-out is not writable"]),
    # --- resume: a checkpoint or a finished run of another recipe ------------------------------------------
    ("resume-other-recipe", "sft", lambda c: (c.checkpoint({"learning_rate": 0.1, "max_steps": 2}), c.sft_args())[1],
     ["key 'output_dir'", "checkpoint-2 was made by a different recipe", "learning_rate"]),
    ("finished-other-recipe", "sft", lambda c: (
        c.checkpoint({"max_steps": 9}), (c.out / "stage_result.json").write_text('{"metrics": {}}'), c.sft_args())[2],
     ["holds a finished run of a different recipe", "max_steps: 9 -> 2"]),
    # --- generation and teachers ---------------------------------------------------------------------------
    ("gen-n-per-task-0", "generate", lambda c: c.gen_args("--n_per_task", "0"), ["key 'n_per_task'", ">= 1"]),
    ("gen-n-samples-0", "generate", lambda c: c.gen_args("--n_samples", "0"), ["key 'n_samples'"]),
    ("gen-difficulty-0", "generate", lambda c: c.gen_args("--difficulty", "0"), ["key 'difficulty'"]),
    ("gen-output-dir-file", "generate", lambda c: [*c.gen_args(), "--output_dir", c.file("f.txt", "x")],
     ["key 'output_dir'", "is a file"]),
    ("teacher-concurrency-many", "generate", lambda c: c.gen_args(
        "--teachers", "[{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, concurrency: many}]"),
     ["teachers[0]", "key 'concurrency' must be int", "'many'"]),
    ("teacher-timeout-negative", "generate", lambda c: c.gen_args(
        "--teachers", "[{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, timeout_s: -1}]"),
     ["teachers[0]", "key 'timeout_s' must be > 0"]),
    ("teacher-wrong-rate-2", "generate", lambda c: c.gen_args("--teachers", "[{type: oracle, wrong_rate: 2}]"),
     ["teachers[0]", "key 'wrong_rate' must be in [0, 1]"]),
    ("teacher-secret-in-api-key-env", "generate", lambda c: c.gen_args(
        "--teachers", f"[{{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: {SECRET}}}]"),
     ["teachers[0]", "key 'api_key_env' must be the NAME of an environment variable"]),
    ("teacher-secret-in-wrong-key", "generate", lambda c: c.gen_args(
        "--teachers", f"[{{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: {SECRET}}}]"),
     ["teachers[0]", "key 'max_retries' must be int", "not shown"]),
    ("teacher-api-key-env-unset", "generate", lambda c: c.gen_args(
        "--teachers", "[{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: NOT_SET_KEY_ENV}]"),
     ["teachers[0]", "NOT_SET_KEY_ENV", "is not set"]),
    ("teacher-local-not-a-model", "generate", lambda c: c.gen_args(
        "--teachers", f"[{{type: transformers, model_name_or_path: {c.not_a_model()}}}]"),
     ["teachers[0]", "key 'model_name_or_path'", "is not a model directory"]),
    ("judge-bad-type", "generate", lambda c: c.gen_args(
        "--scoring", "judge", "--judge", "{type: openai, base_url: 'http://x/v1', model: m, temperature: hot}"),
     ["judge", "key 'temperature' must be float"]),
    ("gen-queries-not-utf8", "generate", lambda c: ["--output_dir", str(c.out), "--queries_file",
                                                    c.file("q.jsonl", b'{"question": "a?"}\n{"question": "\xff"}\n'),
                                                    "--scoring", "judge", "--judge", "{type: oracle}"],
     ["q.jsonl", "line 2", "not UTF-8"]),
    ("gen-queries-bad-json", "generate", lambda c: ["--output_dir", str(c.out), "--queries_file",
                                                    c.file("q.jsonl", '{"question": "a?"}\n{"question": \n'),
                                                    "--scoring", "judge", "--judge", "{type: oracle}"],
     ["q.jsonl", "line 2", "invalid JSON"]),
    # --- evaluation, CPPO, EvoPrompt, tiny ------------------------------------------------------------------
    ("eval-not-a-model", "evaluate", lambda c: ["--model_name_or_path", c.not_a_model(), *c.eval_args()[2:]],
     ["key 'model_name_or_path'", "is not a model directory"]),
    ("eval-output-dir-file", "evaluate", lambda c: [*c.eval_args(), "--output_dir", c.file("f.txt", "x")],
     ["key 'output_dir'", "is a file"]),
    ("eval-n-0", "evaluate", lambda c: c.eval_args("--n", "0"), ["key 'n' must be >= 1"]),
    ("eval-batch-0", "evaluate", lambda c: c.eval_args("--batch_size", "0"), ["key 'batch_size'"]),
    ("cppo-num-generations-1", "cppo", lambda c: c.cppo_args("--num_generations", "1"), ["key 'num_generations'"]),
    ("cppo-negative-beta", "cppo", lambda c: c.cppo_args("--beta", "-1"), ["key 'beta' must be >= 0"]),
    ("cppo-c-kr-negative", "cppo", lambda c: c.cppo_args("--c_kr", "-0.1"), ["key 'c_kr'"]),
    ("cppo-task-steps-0", "cppo", lambda c: [*c.cppo_args(), "--tasks", "[{task: add, max_steps: 0}]"],
     ["tasks[0].max_steps"]),
    ("cppo-not-a-model", "cppo", lambda c: ["--model_name_or_path", c.not_a_model(), *c.cppo_args()[2:]],
     ["key 'model_name_or_path'", "is not a model directory"]),
    ("evo-population-2", "evoprompt", lambda c: c.evo_args("--population_size", "2"), ["key 'population_size'"]),
    ("evo-not-a-model", "evoprompt", lambda c: ["--output_dir", str(c.out), "--task_model_name_or_path",
                                                c.not_a_model()], ["key 'task_model_name_or_path'", "not a model"]),
    ("tiny-hidden-0", "tiny", lambda c: ["--output_dir", str(c.out), "--hidden_size", "0"], ["key 'hidden_size'"]),
    # --- the staged runner: every stage checked before the first runs --------------------------------------
    ("run-missing-module", "run", lambda c: ["--config", c.pipeline(c.recipe("output_dir: o\n", "s.yaml"),
                                                                    module="pipeline.nosuch")],
     ["pipeline.yaml", "stages[1] (train)", "no module named 'pipeline.nosuch'"]),
    ("run-bad-stage-value", "run", lambda c: ["--config", c.pipeline(c.recipe(
        f"model_name_or_path: {c.model}\ndataset_name: {c.dpo}\noutput_dir: {c.out}\nbeta: -1\n", "s.yaml"),
        module="pipeline.dpo")], ["stage 'train'", "s.yaml", "key 'beta' must be > 0"]),
    ("run-bad-stage-arg", "run", lambda c: ["--config", c.pipeline(c.recipe(
        f"model_name_or_path: {c.model}\ndataset_name: {c.sft}\noutput_dir: {c.out}\n", "s.yaml"),
        extra={"args": {"learning_rate": -1}})], ["stage 'train'", "key 'learning_rate'"]),
    ("run-missing-accelerate-config", "run", lambda c: ["--config", c.pipeline(
        c.recipe(f"output_dir: {c.out}\n", "s.yaml"), extra={"launcher": "accelerate",
                                                            "accelerate_config": str(c.tmp / "acc.yaml")})],
     ["stages[1] (train)", "key 'accelerate_config'", "acc.yaml not found"]),
    ("run-key-twice", "run", lambda c: ["--config", c.pipeline("", text="name: a\nname: b\n")],
     ["pipeline.yaml", "line 2", "key 'name' given twice"]),
    ("run-missing-stage-config", "run", lambda c: ["--config", c.pipeline(str(c.tmp / "none.yaml"))],
     ["stages[1].config", "none.yaml not found"]),
]

_MAINS = {}


def _main(stage: str):
    if stage not in _MAINS:
        import importlib

        _MAINS[stage] = importlib.import_module(f"pipeline.{stage}").main
    return _MAINS[stage]


def _results(tmp: Path) -> set[Path]:
    return set(tmp.rglob("stage_result.json"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, tiny_model_dir, sft_jsonl, dpo_jsonl, tripwires, capsys, monkeypatch):
    name, stage, argv_of, must = case
    monkeypatch.chdir(ROOT)  # the stages' default files (data/system_prompts.yaml, ...) are relative to it
    ctx = Ctx(tmp_path, Path(tiny_model_dir), Path(sft_jsonl), Path(dpo_jsonl))
    argv = argv_of(ctx)
    before = _results(tmp_path)
    main = _main(stage)
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli(main, argv)
    TIMES[name] = seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for part in must:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert SECRET not in err
    assert _results(tmp_path) == before, "a stage was marked complete"
    assert not (ctx.out / "sft.jsonl").exists()  # generation wrote no data
    assert seconds < LIMIT_S, f"{name} took {seconds:.1f} s to fail"


def test_battery_is_fast():
    """Runs after the cases (file order): their count and total time."""
    if len(TIMES) < len(CASES):
        pytest.skip("run with the whole battery")
    total = sum(TIMES.values())
    slowest = max(TIMES, key=TIMES.get)
    print(f"\n{len(TIMES)} bad-input cases in {total:.2f} s (slowest: {slowest}, {TIMES[slowest]:.2f} s)")
    assert len(CASES) >= 60


# --- the real CLI path, in subprocesses ---------------------------------------------------------------------

def _cli(*argv, env=None):
    import os

    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc, errors


def test_cli_sft_bad_value(tmp_path, tiny_model_dir, sft_jsonl):
    ctx = Ctx(tmp_path, tiny_model_dir, sft_jsonl, sft_jsonl)
    proc, errors = _cli("pipeline.sft", *ctx.sft_args("--lora_r", "0", "--use_peft", "true"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == ["error: command line (command line): key 'lora_r' must be >= 1, got 0"]
    assert not (ctx.out / "stage_result.json").exists()


def test_cli_dpo_empty_data(tmp_path, tiny_model_dir, dpo_jsonl):
    ctx = Ctx(tmp_path, tiny_model_dir, dpo_jsonl, dpo_jsonl)
    empty = ctx.file("e.jsonl", "")
    proc, errors = _cli("pipeline.dpo", *ctx.dpo_args(data=empty))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == [f"error: command line: key 'dataset_name': {empty}: the file is empty (no rows)"]


def test_cli_generate_never_echoes_a_secret(tmp_path):
    ctx = Ctx(tmp_path, tmp_path, tmp_path, tmp_path)
    recipe = ctx.recipe(yaml.safe_dump({"output_dir": str(ctx.out), "tasks": ["add"], "teachers": [
        {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": SECRET}]}))
    proc, errors = _cli("pipeline.generate", "--config", recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1
    assert SECRET not in proc.stderr + proc.stdout and "api_key_env" in errors[0]


def test_cli_runner_checks_every_stage_first(tmp_path, tiny_model_dir, sft_jsonl):
    ctx = Ctx(tmp_path, tiny_model_dir, sft_jsonl, sft_jsonl)
    bad = ctx.recipe(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {sft_jsonl}\noutput_dir: {ctx.out}\n"
                     "gradient_accumulation_steps: 0\n", "s.yaml")
    proc, errors = _cli("pipeline.run", "--config", ctx.pipeline(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == [f"error: stage 'train': {bad}: key 'gradient_accumulation_steps' must be >= 1, got 0"]
    assert not (tmp_path / "base").exists()  # the first stage never ran


def test_cli_evaluate_output_dir_before_work(tmp_path, tiny_model_dir):
    ctx = Ctx(tmp_path, tiny_model_dir, tmp_path, tmp_path)
    blocker = ctx.file("blocker", "x")
    start = time.perf_counter()
    proc, errors = _cli("pipeline.evaluate", *ctx.eval_args("--output_dir", blocker + "/eval"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "key 'output_dir'" in errors[0] and "blocker is a file" in errors[0]
    assert "accuracy" not in proc.stdout + proc.stderr  # failed before scoring anything
    print(f"evaluate failed on its output dir after {time.perf_counter() - start:.1f} s (process start included)")


def test_teacher_that_fails_after_its_retries_is_one_line(tmp_path, capsys):
    """A transient failure that exhausted its retries: one line, exit 3 (not 2: the input may be fine), nothing
    complete."""
    from pipeline import generate

    ctx = Ctx(tmp_path, tmp_path, tmp_path, tmp_path)
    argv = ctx.gen_args("--teachers", "[{type: openai, base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: 0}]")
    with pytest.raises(SystemExit) as exit_:
        cli(generate.main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 3 and "Traceback" not in err
    assert len(errors) == 1 and "teacher 'openai'" in errors[0] and "failed after 1 attempts" in errors[0]
    assert not (ctx.out / "stage_result.json").exists() and not (ctx.out / "sft.jsonl").exists()


def test_long_env_var_names_are_names_not_secrets(monkeypatch):
    from pipeline.generation.teachers import make_teacher
    from pipeline.validation import looks_secret

    monkeypatch.setenv("OPENAI_API_KEY_FOR_THE_PROD_CLUSTER_2026", "value-of-the-key-1234567890")
    teacher = make_teacher({"type": "openai", "base_url": "http://x/v1", "model": "m",
                            "api_key_env": "OPENAI_API_KEY_FOR_THE_PROD_CLUSTER_2026"}, "r.yaml: teachers[0]")
    assert teacher.api_key_env == "OPENAI_API_KEY_FOR_THE_PROD_CLUSTER_2026"
    assert looks_secret("value-of-the-key-1234567890") and looks_secret(SECRET)
    assert not looks_secret("outputs/tiny/sft") and not looks_secret("meta-llama/Llama-3.1-8B")

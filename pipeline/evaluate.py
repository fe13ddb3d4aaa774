"""Held-out accuracy on the tiny task world: batched greedy generation, scored by the task verifiers.

Other stages call `evaluate(model, tokenizer, ["add", "sort"], n=50)` at their end; as a stage:

    python -m pipeline.evaluate --config recipes/tiny/eval.yaml [--model_name_or_path outputs/tiny/sft]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline.config import cli, parse
from pipeline.io import atomic_write_json, write_stage_result
from pipeline.tasks import Example, Task, get_task, make_split, to_prompt

logger = logging.getLogger(__name__)


def load_for_generation(path: str):
    """(model, tokenizer) for decoding: on the GPU when there is one, in the checkpoint's own dtype there
    (bf16 stays bf16), fp32 on CPU; in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.kv.streaming_heads import use_declared_attention

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if cuda else torch.float32)
    use_declared_attention(model)  # a model trained with streaming heads runs with them
    return model.to("cuda" if cuda else "cpu").eval(), AutoTokenizer.from_pretrained(path)


def generate_replies(model, tokenizer, conversations: list[list[dict]], batch_size: int = 64,
                     max_new_tokens: int = 128, **generate_kwargs) -> list[str]:
    """Replies to chat `conversations` (greedy unless `generate_kwargs` say otherwise), batched with left
    padding, returned in the input order."""
    import torch

    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    # Similar lengths in one batch waste less compute on padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, **{"do_sample": False, **generate_kwargs}, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                replies[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def score(model, tokenizer, examples: list[Example], system_prompt: str | None = None, batch_size: int = 64,
          max_new_tokens: int = 128) -> list[dict]:
    """One row per example: the question, the model's reply, the reference answer and whether it verified."""
    replies = generate_replies(model, tokenizer, [to_prompt(e, system_prompt) for e in examples],
                               batch_size, max_new_tokens)
    return [{"task": e.task, "id": e.id, "question": e.question, "answer": e.answer, "reply": r,
             "correct": get_task(e.task).verify(e, r)} for e, r in zip(examples, replies)]


def accuracy(rows: list[dict]) -> dict[str, float]:
    """`accuracy/<task>` for each task in `rows`, and `accuracy/mean` over tasks (not over rows)."""
    per_task: dict[str, list[bool]] = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(r["correct"])
    metrics = {f"accuracy/{t}": sum(v) / len(v) for t, v in per_task.items()}
    metrics["accuracy/mean"] = sum(metrics.values()) / len(metrics) if metrics else 0.0
    return metrics


def held_out(tasks: list[str | Task], n: int, split: str = "test", difficulty: int = 1, seed: int = 0) -> list[Example]:
    return [e for t in tasks for e in make_split(get_task(t) if isinstance(t, str) else t, split, n, seed, difficulty)]


def evaluate(model, tokenizer, tasks: list[str | Task], n: int, split: str = "test", difficulty: int = 1,
             system_prompt: str | None = None, batch_size: int = 64, max_new_tokens: int = 128,
             seed: int = 0, state=None) -> dict[str, float]:
    """Accuracy of greedy replies on `n` held-out examples per task: {"accuracy/add": .., "accuracy/mean": ..}.

    With `state` (an accelerate `Accelerator` or `PartialState`) of several processes, each process decodes
    its share of the examples (`split_between_processes`) and the rows are gathered (`gather_object`), so
    every process returns the same metrics. The shares are padded to equal length: each process then runs the
    same number of `generate` calls, as ZeRO-3 needs (every rank takes part in every forward; within a call
    transformers keeps the ranks in step with `synced_gpus`)."""
    examples = held_out(tasks, n, split, difficulty, seed)
    if state is None or state.num_processes == 1:
        return accuracy(score(model, tokenizer, examples, system_prompt, batch_size, max_new_tokens))
    from accelerate.utils import gather_object

    with state.split_between_processes(list(enumerate(examples)), apply_padding=True) as mine:
        rows = score(model, tokenizer, [e for _, e in mine], system_prompt, batch_size, max_new_tokens)
        indexed = [(i, row) for (i, _), row in zip(mine, rows)]
    by_index = dict(gather_object(indexed))  # the padding repeats examples: one row per index
    return accuracy([by_index[i] for i in range(len(examples))])


@dataclasses.dataclass
class EvalArguments:
    model_name_or_path: str = dataclasses.field(metadata={"help": "A model directory (or hub id) to score."})
    output_dir: str = dataclasses.field(metadata={"help": "Where eval.json and stage_result.json go."})
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add", "copy", "reverse", "sort", "kv_lookup",
                                                                  "multihop"])
    n: int = dataclasses.field(default=50, metadata={"help": "Examples per task."})
    split: str = dataclasses.field(default="test", metadata={"help": "train, dev or test."})
    difficulty: int = 1
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "Prepended as a system message."})
    batch_size: int = 64
    max_new_tokens: int = 128
    seed: int = 0
    stage: str = dataclasses.field(default="evaluate", metadata={"help": "Stage name in stage_result.json."})

    def __post_init__(self):
        if self.split not in ("train", "dev", "test"):
            raise ValueError(f"key 'split' must be one of train, dev, test, got {self.split!r}")
        for t in self.tasks:
            try:
                get_task(t)
            except KeyError as e:
                raise ValueError(f"key 'tasks': {e.args[0]}") from None
        if self.n < 1 or self.difficulty < 1:
            raise ValueError("keys 'n' and 'difficulty' must be >= 1")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([EvalArguments], argv, prog="python -m pipeline.evaluate")
    from pipeline.modeling import check_model_path

    check_model_path(args.model_name_or_path, source)  # before loading; output_dir was checked by parse
    model, tokenizer = load_for_generation(args.model_name_or_path)

    start = time.perf_counter()
    examples = held_out(args.tasks, args.n, args.split, args.difficulty, args.seed)
    rows = score(model, tokenizer, examples, args.system_prompt, args.batch_size, args.max_new_tokens)
    metrics = accuracy(rows)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    logger.info("accuracy: %s", {k: round(v, 3) for k, v in metrics.items()})

    out = Path(args.output_dir)
    atomic_write_json(out / "eval.json", {"model": args.model_name_or_path, "split": args.split,
                                          "difficulty": args.difficulty, "metrics": metrics, "rows": rows})
    write_stage_result(out, args.stage, metrics, {"eval": str(out / "eval.json")})
    return metrics


if __name__ == "__main__":
    cli(main)

"""Held-out evaluation: batched left-padded generation, per-task accuracy, the stage CLI."""

import json

import pytest

import pipeline.evaluate as ev
from pipeline.config import RecipeError
from pipeline.tasks import TASKS, to_prompt


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_batched_generation_matches_one_by_one(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: varied replies, so that a padding bug would show
        for p in model.parameters():
            p.normal_(0, 0.2)
    examples = ev.held_out(["add", "copy", "multihop", "kv_lookup"], n=2)
    convs = [to_prompt(e, "Be brief." if i % 2 else None) for i, e in enumerate(examples)]  # different lengths
    tok.padding_side = "right"
    model.train()
    batched = ev.generate_replies(model, tok, convs, batch_size=8, max_new_tokens=12)
    assert tok.padding_side == "right" and model.training  # restored for the caller (e.g. a trainer)
    model.eval()
    single = [ev.generate_replies(model, tok, [c], batch_size=1, max_new_tokens=12)[0] for c in convs]
    assert batched == single
    assert len(set(batched)) > 1  # not all empty: the comparison means something


def test_evaluate_scores_with_the_task_verifiers(tiny, monkeypatch):
    model, tok = tiny
    real = ev.generate_replies

    def half_right(model, tokenizer, convs, batch_size, max_new_tokens, **kw):
        real(model, tokenizer, convs[:1], 1, 2)  # the model path still runs
        out = []
        for i, c in enumerate(convs):
            ex = next(e for e in examples if e.question == c[-1]["content"])
            out.append(f"thinking\nAnswer: {ex.answer}" if i % 2 == 0 else "Answer: wrong")
        return out

    examples = ev.held_out(["add", "sort"], n=10)
    monkeypatch.setattr(ev, "generate_replies", half_right)
    metrics = ev.evaluate(model, tok, ["add", "sort"], n=10)
    assert metrics == {"accuracy/add": 0.5, "accuracy/sort": 0.5, "accuracy/mean": 0.5}


def test_accuracy_is_a_mean_over_tasks():
    rows = [{"task": "add", "correct": True}] * 3 + [{"task": "sort", "correct": False}]
    assert ev.accuracy(rows) == {"accuracy/add": 1.0, "accuracy/sort": 0.0, "accuracy/mean": 0.5}


def test_untrained_model_scores_low_and_fast(tiny):
    import time

    model, tok = tiny
    start = time.perf_counter()
    metrics = ev.evaluate(model, tok, list(TASKS), n=20, max_new_tokens=16)
    assert set(metrics) == {f"accuracy/{t}" for t in TASKS} | {"accuracy/mean"}
    assert metrics["accuracy/mean"] < 0.2  # random weights do not solve the task world
    assert time.perf_counter() - start < 60


def test_stage_cli(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    metrics = ev.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--tasks", "[copy]",
                       "--n", "4", "--max_new_tokens", "4"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == metrics and len(saved["rows"]) == 4
    assert json.loads((out / "stage_result.json").read_text())["metrics"]["accuracy/copy"] == metrics["accuracy/copy"]
    with pytest.raises(RecipeError, match="key 'tasks': unknown task 'cpy'"):
        ev.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--tasks", "[cpy]"])

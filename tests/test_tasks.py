"""The tiny task world: verifiers per task, splits, difficulty, the TRL reward function."""

import random

import pytest

from pipeline.tasks import TASKS, Example, get_task, make_split, split_of, to_prompt, verifier_reward


def _worked(ex: Example) -> str:
    return "\n".join(ex.steps) + f"\nAnswer: {ex.answer}"


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_verifier_accepts_right_rejects_wrong(name, difficulty):
    task, rng = TASKS[name], random.Random(difficulty)
    for _ in range(50):
        ex = task.generate(rng, difficulty)
        assert ex.task == name and ex.difficulty == difficulty and ex.steps
        assert task.verify(ex, _worked(ex))
        assert task.verify(ex, f"Some talk first.\nAnswer: {ex.answer}.")  # trailing period tolerated
        assert not task.verify(ex, "\n".join(ex.steps))  # no Answer line
        bad = task.wrong(ex, rng)
        assert bad.answer != ex.answer and not task.verify(ex, _worked(bad)), (ex, bad)
        assert bad.question == ex.question


def test_answers_are_correct():
    rng = random.Random(0)
    for _ in range(200):
        ex = TASKS["add"].generate(rng, 2)
        a, b = (int(t) for t in ex.question[4:-1].split(" + "))
        assert int(ex.answer) == a + b
        ex = TASKS["sort"].generate(rng, 2)
        assert ex.answer.split() == [str(x) for x in sorted(int(t) for t in ex.question[6:].split())]
        ex = TASKS["reverse"].generate(rng, 2)
        assert ex.answer.split() == ex.question.split()[1:][::-1]
        ex = TASKS["kv_lookup"].generate(rng, 2)
        facts = dict(f.split("=") for f in ex.question.split(".")[0].split())
        assert facts[ex.question.split()[-1].rstrip("?")] == ex.answer
        ex = TASKS["multihop"].generate(rng, 2)
        links = dict(f.split(">") for f in ex.question.split(".")[0].split())
        node = ex.question.split("Follow ")[1].split()[0]
        for _ in range(3):
            node = links[node]
        assert node == ex.answer


def test_list_answers_accept_commas_and_case():
    ex = TASKS["sort"].generate(random.Random(1), 1)
    assert TASKS["sort"].verify(ex, "Answer: " + ", ".join(ex.answer.split()))
    ex = TASKS["copy"].generate(random.Random(1), 1)
    assert TASKS["copy"].verify(ex, "Answer: " + ex.answer.upper())


def test_add_carry_steps():
    rng = random.Random(0)
    ex = Example("add", "Add 47 + 38.", "85", ("7+8=15, write 5 carry 1", "4+3+1=8, write 8"))
    wrong = TASKS["add"].wrong(ex, rng)  # a forgotten carry
    assert wrong.answer == "75" and wrong.steps == ("7+8=15, write 5", "4+3=7, write 7")
    from pipeline.tasks.arithmetic import _column_steps
    assert _column_steps(47, 38) == (ex.steps, "85")
    assert _column_steps(95, 17) == (("5+7=12, write 2 carry 1", "9+1+1=11, write 1 carry 1", "write carry 1"), "112")


def test_difficulty_controls_size():
    rng = random.Random(0)
    for name, task in TASKS.items():
        lengths = [len(task.generate(rng, d).question) for d in (1, 2, 3, 4) for _ in range(20)]
        means = [sum(lengths[i * 20:(i + 1) * 20]) / 20 for i in range(4)]
        assert means == sorted(means) and means[0] < means[-1], name


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_and_deterministic(name):
    task = TASKS[name]
    splits = {s: make_split(task, s, 60, seed=0) for s in ("train", "dev", "test")}
    ids = {s: {e.id for e in xs} for s, xs in splits.items()}
    assert all(len(v) == 60 for v in ids.values())
    assert not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"]) and not (ids["train"] & ids["dev"])
    assert all(split_of(e.id) == "test" for e in splits["test"])
    assert [e.id for e in make_split(task, "test", 60, seed=0)] == [e.id for e in splits["test"]]
    assert [e.id for e in make_split(task, "test", 60, seed=1)] != [e.id for e in splits["test"]]


def test_get_task_error_lists_names():
    with pytest.raises(KeyError, match="valid: add, copy"):
        get_task("addition")


def test_to_prompt():
    ex = TASKS["copy"].generate(random.Random(0), 1)
    assert to_prompt(ex) == [{"role": "user", "content": ex.question}]
    assert to_prompt(ex, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_verifier_reward_both_completion_shapes():
    rng = random.Random(0)
    exs = [TASKS[n].generate(rng, 1) for n in TASKS]
    kw = dict(task=[e.task for e in exs], answer=[e.answer for e in exs], question=[e.question for e in exs])
    texts = [_worked(e) if i % 2 == 0 else "Answer: nope" for i, e in enumerate(exs)]
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(len(exs))]
    assert verifier_reward(texts, **kw) == expected
    conv = [[{"role": "assistant", "content": t}] for t in texts]
    assert verifier_reward(conv, **kw, completion_ids=None) == expected  # GRPO passes extra kwargs
    kw.pop("question")
    assert verifier_reward(texts, **kw) == expected

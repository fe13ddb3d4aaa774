"""The generation stage: oracle data, a faulty OpenAI-compatible endpoint, kill -9 + resume, secrets, hygiene."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import RecipeError
from pipeline.generate import main
from pipeline.generation.hygiene import (MinHashIndex, binarize, contaminated, cut_at_first_difference, dedup, jaccard,
                                        shingles)
from pipeline.generation.prompts import STYLES, load_library
from pipeline.generation.teachers import OpenAITeacher, Request, RequestCache, TeacherError, parse_rating, run_requests
from pipeline.tasks import TASKS, Example, extract_answer, get_task, make_split
from openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parents[1]
LIB = str(ROOT / "data" / "system_prompts.yaml")
SECRET = "sk-test-9f8e7d6c5b4a-do-not-leak"


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run(tmp_path, **kw):
    args = {"output_dir": str(tmp_path / "out"), "system_prompts": LIB, "seed": 0, **kw}
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)]
    return main(argv)


def _oracle_answer(body: dict) -> str:
    """A scripted teacher: answers task-world questions correctly (the server does not know the task world)."""
    question = body["messages"][-1]["content"]
    for ex in _ORACLE_POOL:
        if ex.question == question:
            return "\n".join(ex.steps) + f"\nAnswer: {ex.answer}"
    return "Answer: ?"


_ORACLE_POOL = make_split(TASKS["add"], "train", 30) + make_split(TASKS["kv_lookup"], "train", 30)


# ---------------------------------------------------------------------------------------------
# Oracle teacher: the tiny recipe's data
# ---------------------------------------------------------------------------------------------


def test_oracle_sft_and_dpo_data(tmp_path):
    from datasets import load_dataset, load_from_disk

    metrics = _run(tmp_path, tasks=list(TASKS), n_per_task=15, n_samples=4, prompt_erasure=True,
                   teachers=[{"type": "oracle", "wrong_rate": 0.5}])
    out = tmp_path / "out"
    sft = load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
    dpo = load_dataset("json", data_files=str(out / "dpo.jsonl"), split="train")
    assert len(load_from_disk(str(out / "sft"))) == len(sft) == metrics["sft_rows"] > 0
    assert len(load_from_disk(str(out / "dpo"))) == len(dpo) == metrics["dpo_pairs"] > 0
    assert metrics["queries"] == 15 * len(TASKS)
    generic = load_library(LIB).generic
    for row in sft:
        ex = Example(row["task"], row["messages"][1]["content"], "")
        full = next(e for e in make_split(get_task(row["task"]), "train", 15) if e.id == row["id"])
        assert row["messages"][0] == {"role": "system", "content": generic}  # prompt erasure
        assert get_task(row["task"]).verify(full, row["messages"][-1]["content"]) and row["score"] == 1.0
        assert ex.question == full.question and row["teacher"] == "oracle" and row["system_prompt_id"]
    for row in dpo:
        full = next(e for e in make_split(get_task(row["task"]), "train", 15) if e.id == row["id"])
        task = get_task(row["task"])
        assert task.verify(full, row["chosen"][0]["content"])
        assert not task.verify(full, row["rejected"][0]["content"])
        assert extract_answer(row["rejected"][0]["content"]) is not None  # a real (wrong) answer, not garbage
    assert len({r["id"] for r in sft}) == len(sft)
    corpus = (out / "corpus.txt").read_text()
    assert sft[0]["messages"][1]["content"] in corpus
    assert json.loads((out / "stage_result.json").read_text())["metrics"]["sft_rows"] == len(sft)


def test_answer_only_switch_and_specific_prompts(tmp_path):
    _run(tmp_path, tasks=["add", "sort"], n_per_task=10, n_samples=1, styles=["concise"])
    rows = _jsonl(tmp_path / "out" / "sft.jsonl")
    lib = load_library(LIB)
    assert len(rows) == 20
    for r in rows:
        assert r["messages"][-1]["content"].startswith("Answer: ") and "\n" not in r["messages"][-1]["content"]
        assert lib.by_id(r["system_prompt_id"]).style == "concise"
        assert r["messages"][0]["content"] == lib.by_id(r["system_prompt_id"]).text  # no erasure
    _run(tmp_path, output_dir=str(tmp_path / "steps"), tasks=["add"], n_per_task=10, n_samples=1, styles=["steps"],
         prompt_erasure=True, erased_system_prompt="")
    # Erased to nothing: rows start with the question, as task-world evaluation prompts a model.
    assert all(r["messages"][0]["role"] == "user" for r in _jsonl(tmp_path / "steps" / "sft.jsonl"))
    for r in _jsonl(tmp_path / "steps" / "sft.jsonl"):
        assert "carry" in r["messages"][-1]["content"] or "write" in r["messages"][-1]["content"]


def test_prompt_library():
    lib = load_library(LIB)
    assert len(lib.prompts) >= 16 and len({p.id for p in lib.prompts}) == len(lib.prompts)
    rng = random.Random(0)
    for task in TASKS:
        for style in STYLES:
            assert lib.choose(rng, task, [style]).style == style
    chosen = {lib.choose(random.Random(i), "add", list(STYLES)).id for i in range(200)}
    assert "column_addition" in chosen and "follow_links" not in chosen  # per-task selection


def test_bad_library_and_recipe_errors(tmp_path):
    bad = tmp_path / "lib.yaml"
    bad.write_text(yaml.safe_dump({"generic": "x", "prompts": [{"id": "a", "style": "verbose", "text": "t"}]}))
    with pytest.raises(RecipeError, match=r"prompts\[0\] \(a\): key 'style'"):
        load_library(bad)
    with pytest.raises(RecipeError, match="unknown key 'concurency'"):
        _run(tmp_path, tasks=["add"], teachers=[{"type": "openai", "base_url": "http://x", "model": "m", "concurency": 2}])
    with pytest.raises(RecipeError, match="never put an API key"):
        _run(tmp_path, tasks=["add"], teachers=[{"type": "openai", "base_url": "http://x", "model": "m", "api_key": "k"}])
    with pytest.raises(RecipeError, match="unknown task 'ad'"):
        _run(tmp_path, tasks=["ad"])
    dup = tmp_path / "q.jsonl"
    dup.write_text('{"question": "a?", "id": "x"}\n{"question": "b?", "id": "x"}\n')
    with pytest.raises(RecipeError, match=r"q.jsonl: line 2: duplicate id 'x'"):
        _run(tmp_path, queries_file=str(dup), scoring="judge", judge={"type": "oracle"})
    with pytest.raises(RecipeError, match="MISSING_KEY_ENV"):
        _run(tmp_path, tasks=["add"], n_per_task=2, teachers=[{"type": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                                "model": "m", "api_key_env": "MISSING_KEY_ENV"}])


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint with faults
# ---------------------------------------------------------------------------------------------


def _openai(server, **kw):
    return {"type": "openai", "name": "api", "base_url": server.base_url, "model": "teacher-1",
            "api_key_env": "GEN_TEST_KEY", "concurrency": 8, "timeout_s": 0.5, "backoff_s": 0.01,
            "max_backoff_s": 0.05, "max_retries": 12, **kw}


FAULTS = {"429": 0.05, "500": 0.05, "timeout": 0.05, "truncated": 0.05}


def test_faulty_endpoint_every_row_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    with OpenAIServer(reply=_oracle_answer, faults=FAULTS, hang_s=1.0, api_key=SECRET, seed=1) as server:
        metrics = _run(tmp_path, tasks=["add", "kv_lookup"], n_per_task=30, n_samples=2, teachers=[_openai(server)])
    assert all(server.stats[k] > 0 for k in FAULTS), server.stats  # every kind of fault did happen
    assert server.stats["unauthorized"] == 0
    out = tmp_path / "out"
    sft = _jsonl(out / "sft.jsonl")
    assert sorted(r["id"] for r in sft) == sorted(e.id for e in _ORACLE_POOL)  # each query exactly once
    cache = _jsonl(out / "cache.jsonl")
    assert len(cache) == len({c["key"] for c in cache}) == 120 == metrics["completions"]
    assert all(r["teacher"] == "api" and r["score"] == 1.0 for r in sft)


def test_api_key_never_in_outputs_or_errors(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    with OpenAIServer(reply=_oracle_answer, faults=FAULTS, hang_s=1.0, api_key=SECRET) as server:
        _run(tmp_path, tasks=["add"], n_per_task=10, n_samples=1, teachers=[_openai(server)])
    assert any(h.get("Authorization") == f"Bearer {SECRET}" for h in server.headers_seen)  # it was sent...
    for path in (tmp_path / "out").rglob("*"):  # ...and written nowhere
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text

    # A server that echoes the Authorization header into a 400 error: the message must be scrubbed.
    def leaky(body):
        raise ValueError(f"bad request from {server.headers_seen[-1]['Authorization']}")

    with OpenAIServer(reply=leaky, api_key=SECRET) as server:
        with pytest.raises(TeacherError) as err:
            _run(tmp_path, output_dir=str(tmp_path / "leak"), tasks=["add"], n_per_task=2, n_samples=1,
                 teachers=[_openai(server)])
    assert "HTTP 400" in str(err.value) and "***" in str(err.value) and SECRET not in str(err.value)


def test_gives_up_after_retries_and_keeps_finished_rows(tmp_path):
    cache = RequestCache(tmp_path / "c.jsonl")
    with OpenAIServer(faults={"500": 1.0}) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="m", max_retries=2, backoff_s=0.001)
        reqs = [Request(f"k{i}", ({"role": "user", "content": str(i)},)) for i in range(3)]
        with pytest.raises(TeacherError, match="failed after 3 attempts"):
            run_requests(teacher, reqs, cache, "t")
        assert server.stats["500"] >= 3
    cache.close()


def test_rate_limit(tmp_path):
    cache = RequestCache(tmp_path / "c.jsonl")
    with OpenAIServer() as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="m", concurrency=16, requests_per_second=40)
        reqs = [Request(f"k{i}", ({"role": "user", "content": str(i)},)) for i in range(20)]
        start = time.perf_counter()
        replies = run_requests(teacher, reqs, cache, "t")
        elapsed = time.perf_counter() - start
    assert replies["k7"] == "You said: 7"
    assert elapsed >= 19 / 40 * 0.9  # 20 requests at 40/s take at least ~0.475 s even with 16 in flight
    cache.close()


def test_backoff_frees_the_slot_and_a_hung_request_is_hedged(tmp_path):
    # One slot. The first request meets a 500 and backs off for ~1 s: the other requests must go through the
    # slot meanwhile (before this fix the slot slept with it).
    import aiohttp

    cache = RequestCache(tmp_path / "c.jsonl")
    first_failed = []

    def reply(body):
        return "ok " + body["messages"][-1]["content"]

    with OpenAIServer(reply=reply) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="m", concurrency=1, backoff_s=1.0, max_backoff_s=1.0)
        original = teacher._attempt

        async def flaky(session, url, payload, headers, scrub):
            if payload["messages"][0]["content"] == "0" and not first_failed:
                first_failed.append(time.monotonic())
                raise aiohttp.ClientConnectionError("connection reset")
            return await original(session, url, payload, headers, scrub)

        teacher._attempt = flaky
        reqs = [Request(f"k{i}", ({"role": "user", "content": str(i)},)) for i in range(4)]
        start = time.monotonic()
        cache2 = RequestCache(tmp_path / "order.jsonl")
        run_requests(teacher, reqs, cache2, "t")
        order = [json.loads(line)["key"] for line in (tmp_path / "order.jsonl").read_text().splitlines()]
        assert order[-1] == "k0" and sorted(order) == ["k0", "k1", "k2", "k3"], order
        assert time.monotonic() - start < 2.5
        assert teacher.stats["retries"] == 1
        cache2.close()

    # A server that hangs 20% of requests for 3 s (far past its 10 ms latency): the stalled ones get a second
    # copy after the threshold, so 60 requests take well under one hang.
    with OpenAIServer(reply=reply, latency_s=0.01, faults={"timeout": 0.2}, hang_s=3.0, seed=3) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="m", concurrency=8, timeout_s=10, hedge_after_s=0.2)
        reqs = [Request(f"h{i}", ({"role": "user", "content": str(i)},)) for i in range(60)]
        start = time.monotonic()
        replies = run_requests(teacher, reqs, cache, "t")
        elapsed = time.monotonic() - start
    assert replies["h7"] == "ok 7" and server.stats["timeout"] > 0
    assert teacher.stats["hedged"] > 0
    assert elapsed < 2.0, elapsed
    cache.close()


def test_truncated_replies_are_marked_counted_and_kept_out(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    with OpenAIServer(reply=_oracle_answer, faults={"length": 0.3}, api_key=SECRET, seed=2) as server:
        metrics = _run(tmp_path, tasks=["add"], n_per_task=30, n_samples=2, teachers=[_openai(server)])
    n_cut = server.stats["length"]
    assert n_cut > 0 and metrics["completions_truncated"] == n_cut
    cache = _jsonl(tmp_path / "out" / "cache.jsonl")
    cut = {c["key"] for c in cache if c.get("truncated")}
    assert len(cut) == n_cut
    texts = [r["messages"][-1]["content"] for r in _jsonl(tmp_path / "out" / "sft.jsonl")]
    texts += [r[side][0]["content"] for r in _jsonl(tmp_path / "out" / "dpo.jsonl") for side in ("chosen", "rejected")]
    cut_texts = {c["reply"] for c in cache if c.get("truncated")}
    assert texts and not cut_texts & set(texts)
    assert "cut at the token limit" in caplog.text
    # After a rerun (all cached) the same replies are still known as truncated.
    again = _run(tmp_path, tasks=["add"], n_per_task=30, n_samples=2, teachers=[_openai(server)])
    assert again["completions_truncated"] == n_cut


def test_server_errors_carry_the_message_and_unreachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    cache = RequestCache(tmp_path / "c.jsonl")
    with OpenAIServer(faults={"500": 1.0}) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="m", max_retries=1, backoff_s=0.001)
        with pytest.raises(TeacherError, match="HTTP 500: internal error"):
            run_requests(teacher, [Request("k", ({"role": "user", "content": "x"},))], cache, "t")
    cache.close()
    with OpenAIServer() as gone:
        url = gone.base_url  # a port nothing listens on once the server stops
    argv = [sys.executable, "-c", _KILL_SCRIPT, "--output_dir", str(tmp_path / "o"), "--system_prompts", LIB,
            "--tasks", "[add]", "--n_per_task", "3", "--n_samples", "1",
            "--teachers", json.dumps([{**_openai(gone), "base_url": url, "max_retries": 1}])]
    proc = subprocess.run(argv, env={**os.environ, "GEN_TEST_KEY": SECRET, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]  # a teacher that failed after its retries (EXIT_TEACHER)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and url in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert SECRET not in proc.stderr + proc.stdout


def test_identical_samples_and_unusable_judge_replies_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    with OpenAIServer(reply=lambda body: "Answer: 1", api_key=SECRET) as server:  # a greedy server
        metrics = _run(tmp_path, tasks=["add"], n_per_task=10, n_samples=3, teachers=[_openai(server)],
                       scoring="judge", judge=_openai(server, name="judge"))
    assert metrics["queries_identical_samples"] == metrics["queries"] > 0 and metrics["dpo_pairs"] == 0
    assert f"for {metrics['queries']} of {metrics['queries']} queries all 3 samples" in caplog.text
    assert "have no usable 'Rating" in caplog.text


_KILL_SCRIPT = """
import sys
from pipeline.config import cli
from pipeline.generate import main
cli(main, sys.argv[1:])
"""


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    pool = make_split(TASKS["add"], "train", 60)
    env = {**os.environ, "GEN_TEST_KEY": SECRET, "PYTHONPATH": str(ROOT)}

    def argv(out, server):
        return [sys.executable, "-c", _KILL_SCRIPT, "--output_dir", str(out), "--system_prompts", LIB,
                "--tasks", "[add]", "--n_per_task", "60", "--n_samples", "2",
                "--teachers", json.dumps([_openai(server, concurrency=2)])]

    def reply(body):  # deterministic in the request: seed and question
        q = body["messages"][-1]["content"]
        ex = next(e for e in pool if e.question == q)
        ok = (body["seed"] + len(q)) % 3 != 0
        return f"Answer: {ex.answer if ok else int(ex.answer) + 1}"

    with OpenAIServer(reply=reply, latency_s=0.02, faults={"500": 0.05, "truncated": 0.05}) as server:
        ref = subprocess.run(argv(tmp_path / "ref", server), env=env, capture_output=True, text=True, timeout=120)
        assert ref.returncode == 0, ref.stderr[-2000:]
        proc = subprocess.Popen(argv(tmp_path / "run", server), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        cache = tmp_path / "run" / "cache.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 30):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = cache.read_text().count("\n")
        assert 30 <= partial < 120, partial  # really killed midway
        assert not (tmp_path / "run" / "sft.jsonl").exists()
        again = subprocess.run(argv(tmp_path / "run", server), env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
    for name in ("sft.jsonl", "dpo.jsonl"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "ref" / name).read_text()
    keys = [c["key"] for c in _jsonl(cache)]
    assert len(keys) == len(set(keys)) == 120
    assert len(_jsonl(tmp_path / "run" / "dpo.jsonl")) > 0
    assert SECRET not in ref.stderr + again.stderr


def test_cache_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "reply": "x"}\n{"key": "b", "reply": "y"}\n{"key": "c", "rep')
    cache = RequestCache(path)
    assert set(cache.replies) == {"a", "b"}
    cache.put("c", "z")
    cache.close()
    assert [r["key"] for r in _jsonl(path)] == ["a", "b", "c"]
    path.write_text('{"key": "a", "reply": "x"}\ngarbage\n{"key": "b", "reply": "y"}\n')
    with pytest.raises(RecipeError, match="line 2"):
        RequestCache(path)


# ---------------------------------------------------------------------------------------------
# LLM judge, local transformers teacher
# ---------------------------------------------------------------------------------------------


def test_judge_scoring_and_binarization(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"question": f"Name a colour number {i}."}) + "\n" for i in range(8)))

    def script(body):
        if body["model"] == "judge":  # rate by reply length: the longer, the better (capped at 9)
            reply = body["messages"][-1]["content"].rsplit("\n", 1)[-1]
            return f"Looks fine.\nRating: {min(9, len(reply) // 4)}"
        return "blue " * (1 + body["seed"] % 1000)

    with OpenAIServer(reply=script, faults={"truncated": 0.1}) as server:
        metrics = _run(tmp_path, queries_file=str(queries), n_samples=3, scoring="judge", sft_min_score=3,
                       binarize="best_vs_worst", teachers=[_openai(server)],
                       judge=_openai(server, name="judge", model="judge", temperature=0.0))
    sft, dpo = _jsonl(tmp_path / "out" / "sft.jsonl"), _jsonl(tmp_path / "out" / "dpo.jsonl")
    assert metrics["queries"] == 8 and len(sft) == 8 and len(dpo) == 8
    for r in dpo:
        assert r["score_chosen"] > r["score_rejected"]
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])
        assert r["task"] is None
    assert parse_rating("reason\nRating: 7") == 7.0 and parse_rating("Rating: 11") is None and parse_rating("") is None


def test_transformers_teacher_resumes_from_cache(tmp_path, tiny_model_dir):
    kw = dict(tasks=["copy"], n_per_task=4, n_samples=2, styles=["concise"],
              teachers=[{"type": "transformers", "model_name_or_path": str(tiny_model_dir), "max_new_tokens": 8}])
    first = _run(tmp_path, **kw)
    cache_before = (tmp_path / "out" / "cache.jsonl").read_text()
    assert first["completions"] == 8 and len(cache_before.splitlines()) == 8
    second = _run(tmp_path, **kw)  # everything cached: same result, nothing new asked
    assert second["completions"] == 8 and (tmp_path / "out" / "cache.jsonl").read_text() == cache_before


# ---------------------------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------------------------

_TEXT = ("The quick brown fox jumps over the lazy dog near the river bank while the farmer watches from "
         "the old wooden fence and thinks about the harvest that is coming next week")


def test_dedup_exact_and_near():
    near = _TEXT.replace("next week", "next  week ")  # case/space changes: exact after normalization
    para = _TEXT.replace("lazy", "sleepy")  # one word changed: a near duplicate
    other = "A completely different sentence about sorting numbers and adding digits with carries."
    keep, exact, n_near = dedup([_TEXT, near.upper(), para, other], threshold=0.7)
    assert keep == [0, 3] and (exact, n_near) == (1, 1)
    assert jaccard(shingles(_TEXT), shingles(para)) > 0.7
    keep, _, n_near = dedup([_TEXT, para, other], threshold=1.01)  # near-dedup off
    assert keep == [0, 1, 2] and n_near == 0


def test_minhash_has_no_false_positives_and_finds_near_pairs():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    index = MinHashIndex(threshold=0.8)
    for d in docs:
        index.add(d)
    found = 0
    for i, d in enumerate(docs):
        toks = d.split()
        toks[rng.randrange(40)] = "zzz"  # Jaccard with the original ~0.9
        j = index.query(" ".join(toks))
        found += j == i
        fresh = " ".join(rng.choice(words) for _ in range(40))
        hit = index.query(fresh)
        assert hit is None or jaccard(shingles(fresh), shingles(docs[hit])) >= 0.8
    assert found >= 195


def test_decontamination(tmp_path):
    test_ex = make_split(TASKS["add"], "test", 3)
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"messages": [{"role": "user", "content": _TEXT}]}) + "\n")
    queries = tmp_path / "q.jsonl"
    rows = [{"question": e.question, "task": "add", "answer": e.answer} for e in test_ex]  # task-world test split
    rows += [{"question": _TEXT.replace("lazy", "sleepy"), "task": "copy", "answer": "x"},  # near an eval text
             {"question": "Add 1 + 2.", "task": "add", "answer": "3", "id": "train-like"}]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = _run(tmp_path, queries_file=str(queries), decontaminate_against=[str(evalset)], n_samples=1, dedup_threshold=0.7)
    kept = _jsonl(tmp_path / "out" / "sft.jsonl")
    from pipeline.tasks import split_of
    expected = 1 if split_of(Example("add", "Add 1 + 2.", "3").id) == "train" else 0
    assert m["queries_contaminated"] == 4 + (1 - expected) and len(kept) == expected
    assert contaminated(["hello there ."], ["Hello  there."]) == [True]
    assert contaminated(["Add 2 + 3."], ["Add 2 - 3."]) == [False]


def test_binarize_modes():
    rng = random.Random(0)
    assert binarize([1.0, 1.0], "zephyr", rng) is None  # no preference
    assert binarize([None, 1.0], "zephyr", rng) is None
    assert binarize([3, 9, 5, 1], "best_vs_worst", rng) == (1, 3)
    picks = {binarize([3, 9, 5, 1], "zephyr", random.Random(s))[1] for s in range(50)}
    assert picks == {0, 2, 3}


def test_cut_at_first_difference():
    chosen = "4+4=8, write 8\n7+6=13, write 3 carry 1\nwrite carry 1\nAnswer: 138"
    wrong = "4+4=8, write 8\n7+6=15, write 5 carry 1\nwrite carry 1\nAnswer: 158"
    assert cut_at_first_difference(chosen, wrong) == "4+4=8, write 8\n7+6=15"  # up to and including the slip
    assert cut_at_first_difference(chosen, "9") == "9"
    assert cut_at_first_difference("Answer: 12", "Answer: 1") == "Answer: 1"  # a prefix: all of it
    assert cut_at_first_difference("Answer: 1", "Answer: 12") == "Answer: 12"  # one character past the chosen


def test_cut_rejected_pairs_keep_the_whole_reply_and_train_in_the_dpo_stage(tmp_path, tiny_model_dir):
    from pipeline import dpo

    metrics = _run(tmp_path, tasks=["add", "sort"], n_per_task=12, n_samples=4, cut_rejected=True,
                   teachers=[{"type": "oracle", "wrong_rate": 0.5}], save_datasets=False)
    rows = _jsonl(tmp_path / "out" / "dpo.jsonl")
    assert len(rows) == metrics["dpo_pairs"] > 0
    for row in rows:
        chosen, cut, full = row["chosen"][0]["content"], row["rejected"][0]["content"], row["rejected_full"]
        i = len(cut) - 1
        assert full.startswith(cut) and len(cut) < len(full) and chosen != full
        assert chosen[:i] == cut[:i] and chosen[i] != cut[i]  # the shared work, then the first wrong character
    plain = _run(tmp_path / "plain", tasks=["add", "sort"], n_per_task=12, n_samples=4,
                 teachers=[{"type": "oracle", "wrong_rate": 0.5}], save_datasets=False)
    whole = _jsonl(tmp_path / "plain" / "out" / "dpo.jsonl")
    assert plain["dpo_pairs"] == len(rows) and "rejected_full" not in whole[0]
    assert [r["rejected"][0]["content"] for r in whole] == [r["rejected_full"] for r in rows]  # the same pairs
    out = dpo.main(["--config", str(ROOT / "recipes/tiny/dpo.yaml"), "--model_name_or_path", str(tiny_model_dir),
                    "--dataset_name", str(tmp_path / "out" / "dpo.jsonl"), "--output_dir", str(tmp_path / "dpo"),
                    "--max_steps", "2", "--eval_split_size", "4", "--eval_tasks", "[add]", "--eval_examples", "2",
                    "--save_strategy", "no"])
    assert out["train_loss"] > 0 and "eval_rewards/accuracies" in out


# ---------------------------------------------------------------------------------------------
# The data trains through TRL
# ---------------------------------------------------------------------------------------------


def test_generated_data_trains_with_trl(tmp_path, tiny_model_dir):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    _run(tmp_path, tasks=["add", "sort"], n_per_task=8, n_samples=4, teachers=[{"type": "oracle", "wrong_rate": 0.5}])
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True,
                  bf16=False, disable_tqdm=True, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sft = load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
    log = SFTTrainer(model=model, processing_class=tok, train_dataset=sft,
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=True, **common)).train()
    assert log.training_loss > 0
    dpo = load_dataset("json", data_files=str(out / "dpo.jsonl"), split="train")
    log = DPOTrainer(model=model, processing_class=tok, train_dataset=dpo,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common)).train()
    assert log.training_loss > 0


def test_deterministic_oracle_does_not_warn_of_identical_samples(tmp_path, caplog):
    """The oracle is deterministic by design: four identical correct replies are not a server that ignores
    temperature."""
    metrics = _run(tmp_path, tasks=["add"], n_per_task=10, n_samples=4,
                   teachers=[{"type": "oracle", "name": "oracle", "wrong_rate": 0.0}])
    assert metrics["queries_identical_samples"] == 0
    assert "samples of a teacher are identical" not in caplog.text

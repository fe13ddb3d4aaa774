"""The teacher stages against a real OpenAI-compatible server: `transformers serve` on loopback with a tiny
local model, offline. Generation (verifier and judge scoring), a kill of the server mid-run and a resume, and
EvoPrompt's LLM operator; the API key is never written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="`transformers serve` needs the serving extra: pip install -e '.[serving]'")
pytest.importorskip("uvicorn", reason="`transformers serve` needs the serving extra: pip install -e '.[serving]'")

ROOT = Path(__file__).resolve().parents[1]
LIB = str(ROOT / "data" / "system_prompts.yaml")
SECRET = "sk-serve-test-1a2b3c4d-do-not-leak"
REPLY = "<prompt>Be brief and exact.</prompt>"
_STAGE = "import sys\nfrom pipeline.config import cli\nfrom pipeline.generate import main\ncli(main, sys.argv[1:])\n"

pytestmark = pytest.mark.slow


def scripted_model(out: Path) -> Path:
    """A tiny Llama that answers every chat with REPLY + ' Rating: 7' or ' Rating: 8' (even odds), saved with a
    generation config that samples. Attention and MLP outputs are zeroed, so a position's logits depend on its
    own token only; the LM head then maps the generation prompt's last token -> REPLY -> one of the two rating
    tokens -> end of turn. (An untrained tiny model would ramble to max_tokens; the stages need usable text.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tiny import TinyModelSpec, build_tiny_model

    base = build_tiny_model(TinyModelSpec(output_dir=str(out / "base"), hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                          vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False))
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    tok.add_tokens([REPLY, " Rating: 7", " Rating: 8"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    start = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"][-1]
    reply, r7, r8 = tok.convert_tokens_to_ids([REPLY, " Rating: 7", " Rating: 8"])
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        basis = torch.eye(emb.size(1))
        for i, t in enumerate((start, reply, r7, r8)):
            emb[t] = basis[i]
        head.zero_()
        head[reply] = 5 * basis[0]  # after RMSNorm a basis vector has norm 8: logit 40 vs 0
        head[r7] = head[r8] = 5 * basis[1]
        head[eos] = 5 * (basis[2] + basis[3])
    model.generation_config.do_sample, model.generation_config.temperature = True, 1.0
    path = out / "scripted"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Serve:
    """`transformers serve <model>` on 127.0.0.1 at a free port, started and stopped by the test."""

    def __init__(self, model: Path, log: Path):
        self.model, self.log = model, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "Serve":
        exe = Path(sys.executable).parent / "transformers"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([str(exe), "serve", str(self.model), "--host", "127.0.0.1", "--port",
                                      str(self.port), "--device", "cpu"], stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError("transformers serve did not come up:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def _teacher(server: Serve, name: str = "served", **kw) -> dict:
    return {"type": "openai", "name": name, "base_url": server.base_url, "model": str(server.model),
            "api_key_env": "SERVE_TEST_KEY", "concurrency": 2, "timeout_s": 60, "backoff_s": 0.05,
            "max_backoff_s": 0.2, "max_retries": 3, **kw}


def _argv(out: Path, server: Serve, **kw) -> list[str]:
    args = {"output_dir": str(out), "system_prompts": LIB, "tasks": ["add"], "n_per_task": 8, "n_samples": 2,
            "teachers": [_teacher(server)], "sft_min_score": 0, **kw}
    return [x for k, v in args.items()
            for x in (f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v))]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _assert_secret_nowhere(*dirs: Path, text: str = "") -> None:
    assert SECRET not in text
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    server = Serve(scripted_model(tmp), tmp / "serve.log").start()
    yield server, tmp
    server.kill()


def test_generate_with_verifier_and_judge_scoring(served, tmp_path, monkeypatch, caplog):
    from pipeline.generate import main

    server, _ = served
    monkeypatch.setenv("SERVE_TEST_KEY", SECRET)
    m = main(_argv(tmp_path / "verifier", server))
    rows = [json.loads(x) for x in (tmp_path / "verifier" / "sft.jsonl").read_text().splitlines()]
    assert m["completions"] == 16 and m["completions_truncated"] == 0 and len(rows) == m["queries"] == 8
    assert all(r["messages"][-1]["content"].startswith(REPLY) for r in rows)  # the served model's words
    assert all(r["score"] == 0.0 for r in rows)  # ... which never answer the sum (sft_min_score 0 keeps them)

    m = main(_argv(tmp_path / "judge", server, scoring="judge", judge=_teacher(server, name="judge")))
    rows = [json.loads(x) for x in (tmp_path / "judge" / "sft.jsonl").read_text().splitlines()]
    assert m["sft_rows"] == len(rows) == 8 and {r["score"] for r in rows} <= {7.0, 8.0}
    _assert_secret_nowhere(tmp_path, text=caplog.text)


def test_server_killed_mid_run_then_resume(served, tmp_path):
    server, tmp = served
    env = {**os.environ, "SERVE_TEST_KEY": SECRET, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    argv = [sys.executable, "-c", _STAGE, *_argv(out, server, n_per_task=40, n_samples=2)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and _lines(out / "cache.jsonl") < 10 and proc.poll() is None:
        time.sleep(0.05)
    server.kill()
    stdout, stderr = proc.communicate(timeout=240)
    partial = _lines(out / "cache.jsonl")
    assert proc.returncode == 3 and 10 <= partial < 80, (proc.returncode, partial, stderr[-2000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and server.base_url in errors[0] and "Traceback" not in stderr, stderr[-2000:]
    assert not (out / "sft.jsonl").exists()

    server.start()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    keys = [json.loads(x)["key"] for x in (out / "cache.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 80
    assert len((out / "sft.jsonl").read_text().splitlines()) == 40
    _assert_secret_nowhere(out, tmp, text=stdout + stderr + again.stdout + again.stderr)


def test_evoprompt_llm_operator(served, tmp_path, monkeypatch):
    from pipeline import evoprompt

    server, _ = served
    monkeypatch.setenv("SERVE_TEST_KEY", SECRET)
    (tmp_path / "init.yaml").write_text('prompts: ["Think step by step.", "Answer it."]\n')
    out = tmp_path / "evo"
    metrics = evoprompt.main(["--output_dir", str(out), "--initial_prompts", str(tmp_path / "init.yaml"),
                              "--operator", json.dumps(_teacher(server, name="operator")),
                              "--task_model_endpoint", json.dumps(_teacher(server, name="task", temperature=0.0)),
                              "--tasks", "[add]", "--n_dev", "3", "--n_test", "3", "--population_size", "3",
                              "--generations", "1", "--seed", "1"])
    history = json.loads((out / "history.json").read_text())
    made = [c for c in history["candidates"] if c["origin"] != "initial"]
    # Every child the operator made is the served model's <prompt> text, parsed out of its reply.
    assert made and all(c["prompt"] == "Be brief and exact." for c in made)
    assert metrics["operator"].startswith("llm (openai:") and metrics["malformed_operator_replies"] == 0
    _assert_secret_nowhere(out)

"""The staged runner: stages in order, outputs chained, finished stages skipped, changed recipes caught."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import RecipeError
from pipeline.run import main
from tests.conftest import ROOT


@pytest.fixture
def pipeline_yaml(tmp_path, sft_jsonl, dpo_jsonl):
    def write(name, data):
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return str(tmp_path / name)

    train = {"per_device_train_batch_size": 8, "max_steps": 2, "logging_steps": 1, "report_to": "none",
             "gradient_checkpointing": False, "max_length": 96, "bf16": False}
    model = write("model.yaml", {"output_dir": str(tmp_path / "out/base"), "hidden_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "vocab_size": 320})
    sft = write("sft.yaml", {**train, "dataset_name": str(sft_jsonl), "output_dir": str(tmp_path / "out/sft"),
                             "model_name_or_path": "unused"})
    dpo = write("dpo.yaml", {**train, "dataset_name": str(dpo_jsonl), "output_dir": str(tmp_path / "out/dpo"),
                             "model_name_or_path": "unused"})
    return write("pipeline.yaml", {
        "name": "test", "output_dir": str(tmp_path / "out"), "env": {"OMP_NUM_THREADS": 1},
        "stages": [{"name": "base", "module": "pipeline.tiny", "config": model},
                   {"name": "sft", "module": "pipeline.sft", "config": sft,
                    "args": {"model_name_or_path": str(tmp_path / "out/base"), "report_to": "tensorboard"}},
                   {"name": "dpo", "module": "pipeline.dpo", "config": dpo,
                    "args": {"model_name_or_path": str(tmp_path / "out/sft")}}]})


def test_runs_skips_and_catches_changes(pipeline_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    state = main(["--config", pipeline_yaml])
    assert [state[s]["status"] for s in ("base", "sft", "dpo")] == ["done"] * 3
    report = (tmp_path / "out" / "report.md").read_text()
    for stage in ("base", "sft", "dpo"):
        assert f"| {stage} | done |" in report
        assert f"[console](logs/{stage}.log)" in report
    # The stage that logged to TensorBoard is linked to its event files; the others have none.
    events = list((tmp_path / "out/sft/runs").rglob("events.out.tfevents.*"))
    assert events and "[TensorBoard](sft/runs)" in report
    assert report.count("[TensorBoard]") == 1
    dpo_result = json.loads((tmp_path / "out/dpo/stage_result.json").read_text())
    assert dpo_result["metrics"]["global_step"] == 2

    state = main(["--config", pipeline_yaml])  # nothing to do
    assert all(state[s]["status"] == "done (skipped)" for s in ("base", "sft", "dpo"))

    sft_recipe = tmp_path / "sft.yaml"
    sft_recipe.write_text("# an edited comment is not a change\n" + sft_recipe.read_text())
    state = main(["--config", pipeline_yaml])
    assert state["sft"]["status"] == "done (skipped)"
    # A state file from before the parsed-settings fingerprint (the file's bytes) still counts as unchanged.
    from pipeline.run import PipelineRecipe, fingerprint, legacy_fingerprint, load_stages
    from pipeline.config import load_yaml

    sft_stage = load_stages(PipelineRecipe(**load_yaml(pipeline_yaml)), pipeline_yaml)[1]
    state_path = tmp_path / "out/run_state.json"
    old = json.loads(state_path.read_text())
    old["sft"]["fingerprint"] = legacy_fingerprint(sft_stage)
    assert old["sft"]["fingerprint"] != fingerprint(sft_stage)
    state_path.write_text(json.dumps(old))
    state = main(["--config", pipeline_yaml])
    assert state["sft"]["status"] == "done (skipped)" and state["sft"]["fingerprint"] == fingerprint(sft_stage)
    sft_recipe.write_text(sft_recipe.read_text().replace("max_steps: 2", "max_steps: 3"))
    with pytest.raises(RecipeError, match="stage 'sft': its recipe changed .* --rerun sft"):
        main(["--config", pipeline_yaml])
    state = main(["--config", pipeline_yaml, "--rerun", "sft"])
    assert state["base"]["status"] == "done (skipped)"
    assert state["sft"]["status"] == state["dpo"]["status"] == "done"
    assert json.loads((tmp_path / "out/sft/stage_result.json").read_text())["metrics"]["global_step"] == 3


def test_bad_stage_recipe_fails_before_any_stage_runs(pipeline_yaml, tmp_path):
    bad = tmp_path / "dpo.yaml"
    bad.write_text(bad.read_text() + "bogus_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--config", pipeline_yaml], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: stage 'dpo': {bad}: unknown key 'bogus_key'"]
    assert not (tmp_path / "out" / "base").exists()  # checked before the first stage ran


def test_failed_stage_exits_with_its_one_line_error(pipeline_yaml, tmp_path):
    sft = tmp_path / "sft.yaml"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]\n')
    sft.write_text(yaml.safe_dump({**yaml.safe_load(sft.read_text()), "dataset_name": str(broken)}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--config", pipeline_yaml], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: stage 'sft': {sft}: key 'dataset_name': {broken}: "
                                                     "line 1: invalid JSON")
    assert "| sft | failed |" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "sft" / "stage_result.json").exists()


def test_bad_pipeline_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: a, module: pipeline.sft, config: missing.yaml}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\].config: missing.yaml not found"):
        main(["--config", str(path)])
    path.write_text("stages:\n  - {name: a, modul: pipeline.sft, config: p.yaml}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'stages\[0\].modul'"):
        main(["--config", str(path)])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("sig,preload", [("SIGTERM", True), ("SIGINT", True), ("SIGKILL", True), ("SIGKILL", False)])
def test_killed_runner_ends_its_stage(tmp_path, sig, preload):
    import os
    import signal
    import time

    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pid_file = tmp_path / "pids"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "preload": preload, "stages": [
        {"name": "sleepy", "module": "tests.sleepy_stage", "config": str(recipe),
         "args": {"pid_file": str(pid_file), "output_dir": str(tmp_path / "out/sleepy")}}]}))
    # A job a non-interactive shell started with `&` inherits SIGINT ignored (and so would this runner): give it
    # the default disposition a foreground runner has, so that Python turns SIGINT into KeyboardInterrupt.
    runner = subprocess.Popen([sys.executable, "-m", "pipeline.run", "--config", str(pipeline)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text().endswith("\n")) and time.time() < deadline:
        time.sleep(0.1)
    stage_pid, worker_pid = map(int, pid_file.read_text().split())
    assert _alive(stage_pid) and _alive(worker_pid)
    runner.send_signal(getattr(signal, sig))
    runner.wait(timeout=30)
    deadline = time.time() + 20
    # SIGTERM / SIGINT: the runner ends the stage's whole process group. SIGKILL cannot be caught: the stage
    # process itself gets SIGTERM, from the kernel (PR_SET_PDEATHSIG; `python -m`) or from its watch on the runner's
    # end (forked), and must end what it started (accelerate launch does; this test stage does not, so its worker
    # is not checked).
    watched = (stage_pid, worker_pid) if sig != "SIGKILL" else (stage_pid,)
    while any(_alive(p) for p in watched) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in watched if _alive(p)]
    for p in (stage_pid, worker_pid):
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    assert not left, f"the {sig}-killed runner left its stage processes {left} running"


def test_failure_message_is_not_wrapped_off_a_terminal(tmp_path):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out-with-a-long-name" / ("d" * 60)), "stages": [
        {"name": "failing", "module": "tests.sleepy_stage", "config": str(recipe),
         "args": {"exit": 1, "output_dir": str(tmp_path / "out/failing")}}]}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--config", str(pipeline)], cwd=ROOT,
                          capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "80"})
    assert proc.returncode == 1
    failed = [line for line in proc.stdout.splitlines() if "stage 'failing' failed (exit 1)" in line]
    assert len(failed) == 1 and failed[0].endswith("failing.log") and len(failed[0]) > 80
    assert any(line.endswith("x" * 150) for line in proc.stdout.splitlines())  # the log tail, unwrapped too


def _autogroup_writable() -> bool:
    """Whether this process may set its autogroup's niceness (not where /proc is read-only): writes it back as is."""
    path = Path("/proc/self/autogroup")
    try:
        path.write_text(path.read_text().split()[-1])
        return True
    except (OSError, IndexError):
        return False


def test_parallel_stages_run_together_share_the_threads_and_are_skipped_when_done(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")

    def stage(name, seconds, parallel=None, nice=None):
        s = {"name": name, "module": "tests.sleepy_stage", "config": str(recipe),
             "args": {"seconds": seconds, "output_dir": str(tmp_path / "out" / name)}}
        return {**s, **({"parallel": parallel} if parallel else {}), **({"nice": nice} if nice else {})}

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "env": {"OMP_NUM_THREADS": 4}, "stages": [
        stage("first", 0.2), stage("a", 3, "post"), stage("b", 3, "post", nice=5), stage("c", 3, "post"),
        stage("last", 0.2)]}))
    state = main(["--config", str(pipeline)])
    t = {n: json.loads((tmp_path / "out" / n / "times.json").read_text()) for n in ("first", "a", "b", "c", "last")}
    assert all(state[n]["status"] == "done" for n in t)
    group = [t[n] for n in "abc"]
    assert max(g["start"] for g in group) < min(g["end"] for g in group)  # all three were running at one moment
    assert t["first"]["end"] <= min(g["start"] for g in group) and max(g["end"] for g in group) <= t["last"]["start"]
    assert [g["threads"] for g in group] == ["1", "1", "1"] and t["first"]["threads"] == t["last"]["threads"] == "4"
    base = os.nice(0)  # the stages inherit the runner's niceness; `nice` adds to it
    assert [t[n]["nice"] - base for n in ("first", "a", "b", "c", "last")] == [0, 0, 5, 0, 0]
    if t["a"]["autogroup"] is not None and _autogroup_writable():  # sched_autogroup: each stage's session is a
        assert [t[n]["autogroup"] for n in "abc"] == [0, 5, 0]       # group, and the group's niceness shares the CPU
    # b is redone alone; the others are skipped.
    (tmp_path / "out" / "b" / "stage_result.json").unlink()
    state = main(["--config", str(pipeline)])
    assert state["b"]["status"] == "done" and {state[n]["status"] for n in ("first", "a", "c", "last")} == {
        "done (skipped)"}


def test_bad_parallel_label(tmp_path):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "a", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": True}]}))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.parallel must be a label"):
        main(["--config", str(pipeline)])
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "env": {"OMP_NUM_THREADS": "two"},
                                        "stages": [{"name": "a", "module": "tests.sleepy_stage", "config": str(recipe),
                                                    "parallel": "g"}]}))
    with pytest.raises(RecipeError, match="OMP_NUM_THREADS='two'.*whole number"):
        main(["--config", str(pipeline)])
    for bad in (20, -1, "low", True):
        pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
            {"name": "a", "module": "tests.sleepy_stage", "config": str(recipe), "nice": bad}]}))
        with pytest.raises(RecipeError, match=r"stages\[0\]\.nice must be a whole number from 0 to 19, got"):
            main(["--config", str(pipeline)])


def test_killed_runner_ends_every_stage_of_a_parallel_group(tmp_path):
    import os
    import signal
    import time

    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pids = [tmp_path / "pids-a", tmp_path / "pids-b"]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": f"sleepy{k}", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": "g",
         "args": {"pid_file": str(pid), "output_dir": str(tmp_path / f"out/sleepy{k}")}} for k, pid in enumerate(pids)]}))
    runner = subprocess.Popen([sys.executable, "-m", "pipeline.run", "--config", str(pipeline)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not all(p.is_file() and p.read_text().endswith("\n") for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    watched = [int(x) for p in pids for x in p.read_text().split()]
    assert all(_alive(p) for p in watched)
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=30)
    deadline = time.time() + 20
    while any(_alive(p) for p in watched) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in watched if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"the killed runner left processes {left} of its parallel stages running"


def test_a_failed_stage_of_a_parallel_group_keeps_the_others_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "fails", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": "g",
         "args": {"exit": 1, "output_dir": str(tmp_path / "out/fails")}},
        {"name": "works", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": "g",
         "args": {"seconds": 1, "output_dir": str(tmp_path / "out/works")}}]}))
    with pytest.raises(SystemExit):
        main(["--config", str(pipeline)])
    state = json.loads((tmp_path / "out/run_state.json").read_text())
    assert state["fails"]["status"] == "failed" and state["works"]["status"] == "done"


def test_forked_stage_sees_what_a_fresh_python_m_process_sees(tmp_path, monkeypatch):
    """`preload: true` (the default) forks `python` stages from a fork server that imported torch/transformers/trl;
    `preload: false` starts `python -m`. The stage must not tell them apart: the same argv, working directory,
    environment, torch threads (OMP_NUM_THREADS, read by torch at import in the server), niceness and own session,
    output in its log, atexit handlers run, exit code kept."""
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    seen = {}
    for preload in (False, True):
        out = tmp_path / f"out-{preload}"
        probes = {n: tmp_path / f"probe-{preload}-{n}" for n in ("alone", "g1", "g2")}
        pipeline = tmp_path / f"p-{preload}.yaml"
        pipeline.write_text(yaml.safe_dump({"output_dir": str(out), "preload": preload,
                                            "env": {"OMP_NUM_THREADS": 2, "PROBE_VAR": "x y"}, "stages": [
            {"name": "alone", "module": "tests.sleepy_stage", "config": str(recipe),
             "args": {"probe": str(probes["alone"]), "code": 0, "output_dir": str(out / "alone")}},
            {"name": "g1", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": "g", "nice": 3,
             "args": {"probe": str(probes["g1"]), "code": 0, "output_dir": str(out / "g1")}},
            {"name": "g2", "module": "tests.sleepy_stage", "config": str(recipe), "parallel": "g",
             "args": {"probe": str(probes["g2"]), "code": 5, "output_dir": str(out / "g2")}}]}))
        with pytest.raises(SystemExit):  # g2 exits 5: the run fails there
            main(["--config", str(pipeline)])
        state = json.loads((out / "run_state.json").read_text())
        assert state["g2"]["status"] == "failed"
        log = (out / "logs" / "g2.log").read_text()
        assert "probe: to stdout" in log and "probe: to stderr" in log
        seen[preload] = {}
        for name, probe in probes.items():
            text = probe.read_text()
            assert text.endswith("atexit\n"), f"{name}: atexit handlers did not run (preload={preload})"
            record = json.loads(text.splitlines()[0])
            # Into the log: straight (forked), or through a pipe the runner copies from (python -m).
            assert record["stdout"] == record["stderr"] == (str((out / "logs" / f"{name}.log").resolve()) if preload
                                                            else record["stdout"])
            record["argv"] = [str(a).replace(f"-{preload}", "") for a in record["argv"]]
            record.pop("stdout"), record.pop("stderr")
            seen[preload][name] = record
    assert seen[True] == seen[False]
    assert seen[True]["alone"]["torch_threads"] == 2 and seen[True]["g1"]["torch_threads"] == 1
    assert seen[True]["g1"]["env"] == {"OMP_NUM_THREADS": "1", "PROBE_VAR": "x y", "HF_HUB_OFFLINE": "1"}
    assert seen[True]["g1"]["nice"] - seen[True]["g2"]["nice"] == 3 and seen[True]["g1"]["session_leader"]
    assert seen[True]["alone"]["argv0"] == "sleepy_stage.py" and seen[True]["alone"]["cwd"] == str(ROOT)


def test_preloaded_modules_exist():
    """The fork server preloads these by name and skips one that fails to import (the stage then imports it itself,
    ~5 s slower per stage, with the same results): a library release that moves one must show up here."""
    import importlib

    from pipeline.run import PRELOAD

    for name in PRELOAD:
        importlib.import_module(name)


def test_no_fork_server_where_cuda_is_visible(tmp_path, monkeypatch):
    """A process forked from one whose imports initialised CUDA cannot use CUDA: with a device visible, stages start
    fresh (`python -m`), whatever `preload` says."""
    import torch

    from pipeline import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run._stage_server(dict(os.environ)) is None


def test_rerun_drops_the_later_stages_results_even_if_the_run_stops_early(tmp_path, monkeypatch):
    """`--rerun b` redoes b and every later stage. If b fails (or the runner is killed) before the run reaches c, c's
    old result, made from b's old output, must not be skipped as done by the next run."""
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": n, "module": "tests.sleepy_stage", "config": str(recipe),
         "args": {"seconds": 0.1, "output_dir": str(tmp_path / "out" / n)}} for n in "abc"]}))
    assert {v["status"] for k, v in main(["--config", str(pipeline)]).items() if k != "_source"} == {"done"}
    monkeypatch.setenv("SLEEPY_FAIL", "b")
    with pytest.raises(SystemExit):
        main(["--config", str(pipeline), "--rerun", "b"])
    assert (tmp_path / "out/a/stage_result.json").is_file() and not (tmp_path / "out/c").exists()
    monkeypatch.delenv("SLEEPY_FAIL")
    state = main(["--config", str(pipeline)])
    assert state["a"]["status"] == "done (skipped)" and state["b"]["status"] == state["c"]["status"] == "done"


def test_a_stage_the_fork_server_cannot_start_starts_fresh(tmp_path, monkeypatch):
    """If the fork server is gone (killed, or its preload crashed), the stage runs as `python -m` instead."""
    from pipeline import run

    class Gone:
        def Process(self, **kwargs):
            class P:
                def start(self):
                    raise EOFError("no fork server")
            return P()

    monkeypatch.setattr(run, "_stage_server", lambda env: Gone())
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("output_dir: x\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "a", "module": "tests.sleepy_stage", "config": str(recipe),
         "args": {"seconds": 0.1, "output_dir": str(tmp_path / "out/a")}}]}))
    assert main(["--config", str(pipeline)])["a"]["status"] == "done"
    assert "the preload server could not start it" in (tmp_path / "out/logs/a.log").read_text()

"""kill -9 of an SFT or DPO stage at three moments, then a rerun: the same per-step losses, the same final
weights and the same train_loss as an uninterrupted run, and never a step past max_steps.

The kills are deterministic: PIPELINE_TEST_KILL (pipeline/training.py `_test_kill_hook`) makes the stage
SIGKILL itself after step N (`step:N`), while checkpoint-N is being written (`save:N`: after its weights,
before its optimizer state and trainer_state.json), or after the last step's checkpoint, before the stage
result (`end`). 6 steps of 8 per epoch: resuming at the end of a schedule that stops mid-epoch is where
Trainer.train would run one step too many.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

ARGS = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", "--report_to", "none", "--gradient_checkpointing", "false", "--max_length", "96",
        "--seed", "0", "--bf16", "false"]
MOMENTS = {"between checkpoints": "step:4", "during a checkpoint write": "save:6", "after the last step": "end"}


def _run(stage, model, data, out, kill=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PIPELINE_TEST_KILL", None)
    if kill:
        env["PIPELINE_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--model_name_or_path", str(model),
                           "--dataset_name", str(data), "--output_dir", str(out), *ARGS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(out):
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in log if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, sft_jsonl, dpo_jsonl, tmp_path_factory):
    runs = {}
    for stage, data in (("sft", sft_jsonl), ("dpo", dpo_jsonl)):
        out = tmp_path_factory.mktemp(f"{stage}-full") / "out"
        proc = _run(stage, tiny_model_dir, data, out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[stage] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kill_9_then_rerun_equals_uninterrupted(stage, moment, uninterrupted, tiny_model_dir, sft_jsonl, dpo_jsonl,
                                                tmp_path):
    data = sft_jsonl if stage == "sft" else dpo_jsonl
    out = tmp_path / "out"
    killed = _run(stage, tiny_model_dir, data, out, kill=MOMENTS[moment])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "stage_result.json").exists()
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    if moment == "during a checkpoint write":  # the killed write left a partial checkpoint-6
        assert checkpoints == ["checkpoint-3", "checkpoint-6"]
        assert not (out / "checkpoint-6" / "trainer_state.json").exists()
    rerun = _run(stage, tiny_model_dir, data, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    full = uninterrupted[stage]
    want, got = _losses(full), _losses(out)
    assert sorted(got) == list(range(1, 7)), f"steps logged after the rerun: {sorted(got)}"
    loss_diff = max(abs(want[s] - got[s]) for s in want)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    m_full = json.loads((full / "stage_result.json").read_text())["metrics"]
    m_rerun = json.loads((out / "stage_result.json").read_text())["metrics"]
    print(f"{stage} / {moment}: max |loss diff| {loss_diff:.3g}, max |weight diff| {weight_diff:.3g}, "
          f"train_loss {m_full['train_loss']:.10g} vs {m_rerun['train_loss']:.10g}")
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6
    assert m_rerun["global_step"] == m_full["global_step"] == 6
    assert m_rerun["train_loss"] == pytest.approx(m_full["train_loss"], rel=1e-6)
    assert m_rerun["last_logged_loss"] == pytest.approx(m_full["last_logged_loss"], rel=1e-6)
    if moment == "during a checkpoint write":
        assert "incomplete checkpoint" in rerun.stdout + rerun.stderr
    if moment == "after the last step":
        assert "is the end of training" in rerun.stdout + rerun.stderr
    assert all(torch.isfinite(v).all() for v in b.values())

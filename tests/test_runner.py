"""The staged runner: stages in order, outputs chained, finished stages skipped, changed recipes caught."""

import json
import subprocess
import sys

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
    sft_recipe.write_text(sft_recipe.read_text().replace("max_steps: 2", "max_steps: 3"))
    with pytest.raises(RecipeError, match="stage 'sft': its recipe changed .* --rerun sft"):
        main(["--config", pipeline_yaml])
    state = main(["--config", pipeline_yaml, "--rerun", "sft"])
    assert state["base"]["status"] == "done (skipped)"
    assert state["sft"]["status"] == state["dpo"]["status"] == "done"
    assert json.loads((tmp_path / "out/sft/stage_result.json").read_text())["metrics"]["global_step"] == 3


def test_failed_stage_exits_nonzero_with_its_log(pipeline_yaml, tmp_path):
    bad = tmp_path / "dpo.yaml"
    bad.write_text(bad.read_text() + "bogus_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--config", pipeline_yaml], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "unknown key 'bogus_key'" in proc.stdout and "stage 'dpo' failed" in proc.stdout
    assert "| dpo | failed |" in (tmp_path / "out" / "report.md").read_text()


def test_bad_pipeline_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: a, module: pipeline.sft, config: missing.yaml}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\].config: missing.yaml not found"):
        main(["--config", str(path)])
    path.write_text("stages:\n  - {name: a, modul: pipeline.sft, config: p.yaml}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'stages\[0\].modul'"):
        main(["--config", str(path)])

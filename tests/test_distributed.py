"""Two processes on CPU through `accelerate launch`: DDP and DeepSpeed ZeRO-2/3 (gloo).

`accelerate launch --cpu --num_processes 2` silently starts one process, so every test asserts the
world size the trainer saw.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config,stage", [("ddp", "sft"), ("zero2", "sft"), ("zero3", "dpo"),
                                          ("zero3_offload", "sft")])
def test_two_processes(tiny_model_dir, sft_jsonl, dpo_jsonl, tmp_path, config, stage):
    data = sft_jsonl if stage == "sft" else dpo_jsonl
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions"))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{config}.yaml"), str(ROOT / "pipeline" / f"{stage}.py"),
           "--config", str(ROOT / "recipes" / "tiny" / f"{stage}.yaml"),
           "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
           "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--max_length", "96", "--logging_steps", "1", "--save_steps", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "stage_result.json").read_text())
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["global_step"] == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()

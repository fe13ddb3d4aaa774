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
    if stage == "dpo":  # the recipe holds out 64 pairs; the test data has 64
        cmd += ["--eval_split_size", "8"]
    else:  # the tiny SFT recipe trains streaming heads (its registry is the demo base's): this model's own
        from transformers import AutoModelForCausalLM

        from pipeline.kv.detect import save_registry

        save_registry(tmp_path / "heads.json", AutoModelForCausalLM.from_pretrained(tiny_model_dir), "wu",
                      [[0.0, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 0.0]], {})
        cmd += ["--streaming_heads", str(tmp_path / "heads.json"), "--streaming_full_heads", "1",
                "--streaming_sink", "2", "--streaming_window", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "stage_result.json").read_text())
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["global_step"] == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()
    if stage == "sft":  # every rank trained with them, and the saved model declares them
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["streaming_heads"]["full_heads"] == [[1], []]



_EVAL_SCRIPT = """
import json, sys
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from pipeline.evaluate import evaluate

state = PartialState(cpu=True)
tok, model = AutoTokenizer.from_pretrained(sys.argv[1]), AutoModelForCausalLM.from_pretrained(sys.argv[1])
calls = []
generate = model.generate
model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw)
split = evaluate(model, tok, ["add", "copy", "sort"], n=5, max_new_tokens=8, batch_size=3, state=state)
n_split = len(calls)
alone = evaluate(model, tok, ["add", "copy", "sort"], n=5, max_new_tokens=8, batch_size=3)
print("RESULT", json.dumps({"rank": state.process_index, "world": state.num_processes, "split": split,
                            "alone": alone, "split_calls": calls[:n_split]}), flush=True)
"""


def test_evaluation_is_split_between_processes(tiny_model_dir, tmp_path):
    script = tmp_path / "eval_split.py"
    script.write_text(_EVAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_model_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    # The same metrics on both ranks, equal to one process decoding all 15 examples.
    assert results[0]["split"] == results[1]["split"] == results[0]["alone"]
    # 15 examples: 8 per rank (one padded), in batches of 3: both ranks make the same 3 generate calls.
    assert [r["split_calls"] for r in results] == [[3, 3, 2], [3, 3, 2]]

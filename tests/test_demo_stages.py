"""The demo's look-inside stages on small inputs: retrieval-head detection as a stage (pipeline.kv.detect),
the super-weight quantization comparison (pipeline.quant.compare), and SFT's held-out scoring under a system
prompt (eval_system_prompt)."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ROOT / "data/models/retrieval-tiny"


def test_detect_stage_finds_the_committed_models_retrieval_heads(tmp_path):
    from pipeline.kv.detect import main as detect_main

    out = tmp_path / "heads"
    metrics = detect_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", str(out),
                           "--compare_with", str(RETRIEVAL / "retrieval_heads.json"),
                           "--lengths", "[128]", "--depths", "[0.5]", "--per_cell", "2", "--top_k", "2"])
    assert metrics["passkey_solved"] == 1.0 and metrics["top_score"] > 0.5
    # the committed registry was scored at longer contexts: its two strongest heads are found again
    assert metrics["top2_overlap"] == 1.0, metrics
    reg = json.loads((out / "retrieval_heads.json").read_text())
    assert reg["method"] == "wu" and (out / "retrieval_heads.png").is_file()
    assert json.loads((out / "stage_result.json").read_text())["metrics"] == metrics


def test_detect_stage_rejects_a_registry_of_another_shape(tmp_path, tiny_model_dir):
    from pipeline.kv.detect import main as detect_main, save_registry
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other.json"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_registry(other, m, "wu", [[0.0] * m.config.num_attention_heads] * m.config.num_hidden_layers, {})
    with pytest.raises(RecipeError, match="key 'compare_with'.*another shape"):
        detect_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", str(tmp_path / "h"),
                     "--compare_with", str(other), "--lengths", "[64]", "--depths", "[0.5]", "--per_cell", "1"])


def test_quant_compare_keeps_the_super_weight_exact(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quant.compare import main as compare_main
    from pipeline.quant.plant import Plant, plant_super_weight

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sw = plant_super_weight(model, tok.bos_token_id, Plant(layer=1, row=17, col=100))
    planted = tmp_path / "planted"
    model.save_pretrained(planted)
    tok.save_pretrained(planted)
    out = tmp_path / "quant"
    metrics = compare_main(["--model_name_or_path", str(planted), "--output_dir", str(out), "--tasks", "[copy]",
                            "--n", "2", "--max_new_tokens", "4", "--nf4", "false"])
    assert metrics["super_weights"] == 1 and metrics["super_weight"].startswith("L1 [17,100]")
    report = json.loads((out / "quant.json").read_text())
    assert set(report["variants"]) == {"fp", "fp_sw_zeroed", "rtn", "rtn_clip", "rtn_clip_restore_sw"}
    assert all(v["nll"] > 0 and 0 <= v["accuracy"] <= 1 for v in report["variants"].values())
    assert report["super_weights"][0]["value"] == pytest.approx(sw.value)
    saved = AutoModelForCausalLM.from_pretrained(out / "rtn_sw", dtype=torch.float32)
    assert saved.model.layers[1].mlp.down_proj.weight[17, 100].item() == pytest.approx(sw.value, abs=0)
    assert (out / "rtn_sw" / "super_weights.json").is_file()


def test_sft_scores_held_out_examples_under_eval_system_prompt(monkeypatch):
    import pipeline.evaluate as ev
    from pipeline.config import DataArguments

    seen = []

    def fake_generate(model, tokenizer, conversations, batch_size=64, max_new_tokens=128, **kw):
        seen.extend(conversations)
        return [""] * len(conversations)

    monkeypatch.setattr(ev, "generate_replies", fake_generate)
    ev.evaluate(None, None, ["copy"], n=3, system_prompt="Think step by step.")
    assert len(seen) == 3 and all(c[0] == {"role": "system", "content": "Think step by step."} for c in seen)
    assert DataArguments.__dataclass_fields__["eval_system_prompt"].default is None

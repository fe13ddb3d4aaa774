"""Super weights: detection, registry, RTN with clip + restore (fast, tiny models only)."""

import json

import pytest
import torch

from pipeline.config import RecipeError
from pipeline.quant.detect import confirm_super_weights, detect_super_weights, encode_prompt, main as detect_main
from pipeline.quant.evaluate import fidelity
from pipeline.quant.plant import Plant, plant_super_weight
from pipeline.quant.registry import (SuperWeight, load_registry, make_registry, published_match, read_registry,
                                     save_registry)
from pipeline.quant.rtn import quantize_dequantize, quantize_model_rtn

V = Plant().value  # the planted super weight


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def planted_dir(tiny_model_dir, tok, tmp_path_factory):
    """The conftest tiny model (2 layers, hidden 64, intermediate 128) with a super weight planted in layer 1."""
    model = load(tiny_model_dir)
    plant_super_weight(model, tok.bos_token_id, Plant(layer=1, row=17, col=100))
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_detection_finds_planted_super_weight_exactly(planted_dir, tiny_model_dir, tok):
    ids = encode_prompt(tok, "the answer is 12 = 12.")
    sws, trace = detect_super_weights(load(planted_dir), ids)
    assert [(s.layer, s.row, s.col, s.value) for s in sws] == [(1, 17, 100, V)]
    assert trace["spike_over_median"][1] > 50 and trace["per_layer_after_removal"] is not None
    clean, trace = detect_super_weights(load(tiny_model_dir), ids)
    assert clean == [] and max(trace["spike_over_median"]) < 50


def test_detection_restores_weights_and_confirmation_beats_null(planted_dir, tok):
    model = load(planted_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = encode_prompt(tok, "12 + 7 = 19. the sum is 19.")
    sws, _ = detect_super_weights(model, ids)
    conf = confirm_super_weights(model, sws, ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert conf["confirmed"] and conf["kl_zero_super_weights"] > 10 * max(conf["kl_zero_null"])


def test_detect_cli_writes_registry_and_plot(planted_dir, tmp_path):
    out = tmp_path / "reg" / "super_weights.json"
    detect_main(["--model_name_or_path", str(planted_dir), "--output", str(out)])
    reg = read_registry(out)
    assert [(s["layer"], s["row"], s["col"]) for s in reg["super_weights"]] == [(1, 17, 100)]
    assert reg["confirmation"]["confirmed"] and reg["published"] is None
    assert out.with_suffix(".png").stat().st_size > 1000
    sws = load_registry(out, load(planted_dir))  # round trip against the same model
    assert sws == [SuperWeight(1, 17, 100, V)]


def test_registry_rejects_other_model_and_bad_coordinates(planted_dir, tiny_model_dir, tmp_path):
    model = load(planted_dir)
    reg = make_registry(model, [SuperWeight(1, 17, 100, V)])
    path = save_registry(reg, tmp_path / "r.json")
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(model.config)  # same shapes, different weights
    with pytest.raises(RecipeError, match="fingerprint"):
        load_registry(path, other)
    bad = json.loads(path.read_text())
    bad["super_weights"][0]["col"] = 128  # intermediate_size is 128
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(RecipeError, match=r"super_weights\[0\]\.col = 128 is outside \[0, 128\)"):
        load_registry(tmp_path / "bad.json", model)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RecipeError, match="invalid JSON"):
        read_registry(tmp_path / "broken.json")


def test_detect_cli_bad_input_exits_2(tmp_path, capsys):
    from pipeline.config import cli

    with pytest.raises(SystemExit) as e:
        cli(detect_main, ["--model_name_or_path", str(tmp_path / "nope"), "--output", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


def test_published_table_matches_by_config():
    from transformers import LlamaConfig, MistralConfig

    llama7 = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                         max_position_embeddings=2048)
    assert published_match(llama7) == "Llama-7B"
    llama2 = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                         max_position_embeddings=4096)
    assert published_match(llama2) == "Llama-2-7B"
    mistral = MistralConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                            max_position_embeddings=32768)
    assert published_match(mistral) == "Mistral-7B-v0.1"
    assert published_match(LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128)) is None


def test_rtn_error_bound_clip_and_restore():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[17, 100] = 2.0
    for block in [(16, 16), (64, 64), None]:
        dq = quantize_dequantize(w, 4, block)
        b = (16, 16) if block == (16, 16) else (64, 64) if block else (64, 256)
        blocks = w.reshape(64 // b[0], b[0], 256 // b[1], b[1])
        scale = (blocks.amax((1, 3)) - blocks.amin((1, 3))) / 15
        bound = scale.repeat_interleave(b[0], 0).repeat_interleave(b[1], 1) / 2
        assert ((dq - w).abs() <= bound + 1e-7).all()
        assert abs(dq[17, 100] - 2.0) < 1e-6  # min-max RTN keeps the block extreme on its own
        clipped = quantize_dequantize(w, 4, block, clip="zscore", clip_value=3.0)
        assert clipped[17, 100] < 0.5  # clipping destroys it (the SW inflates a small block's std) ...
        restored = quantize_dequantize(w, 4, block, clip="zscore", clip_value=3.0, restore=[(17, 100)])
        assert restored[17, 100] == w[17, 100]  # ... restore puts it back bit-exactly
        mates = torch.ones_like(w, dtype=torch.bool)
        mates[17, 100] = False
        assert (restored - w)[mates].abs().mean() < (dq - w)[mates].abs().mean()
    p = quantize_dequantize(w, 4, None, clip="percentile", clip_value=99.0, restore=[(17, 100)])
    assert p[17, 100] == w[17, 100] and (p - w)[mates].abs().mean() < (quantize_dequantize(w, 4) - w)[mates].abs().mean()
    with pytest.raises(ValueError, match="does not divide"):
        quantize_dequantize(w, 4, (48, 48))


def test_rtn_clip_restore_recovers_fidelity_at_whole_tensor(planted_dir, tok):
    from pipeline.quant.plant import copy_task_ids

    ids = copy_task_ids(tok, 16, seed=3)
    ref = load(planted_dir)
    sw = SuperWeight(1, 17, 100, V)
    ref_logits = ref(input_ids=ids).logits
    ref_sa = fidelity(ref, ids, sw=sw)["super_activation"]
    kl, sa = {}, {}
    for name, clip, restore, rows in (("rtn", None, [], False), ("clip", "zscore", [], False),
                                      ("clip_restore", "zscore", [sw], False), ("clip_restore_rows", "zscore", [sw], True)):
        m = load(planted_dir)
        assert quantize_model_rtn(m, 4, None, clip, 3.0, restore, rows) == 14
        f = fidelity(m, ids, ref_logits, sw, ref_sa)
        kl[name], sa[name] = f["kl"], f["sa_rel_err"]
    assert kl["clip_restore"] < 0.7 * kl["rtn"] and kl["clip_restore"] < kl["clip"]
    assert kl["clip_restore_rows"] < kl["clip_restore"]
    # Clipping kills the super activation; restoring the SW alone does not bring it back here, because the
    # planted gate/up weights feeding it are outliers that clipping shrinks too; restoring those rows does.
    assert sa["clip"] > 0.5 and sa["clip_restore_rows"] < 0.1


def test_plant_cli_writes_a_model_with_a_detectable_super_weight(tiny_model_dir, tok, tmp_path, capsys):
    from pipeline.config import cli
    from pipeline.io import read_stage_result
    from pipeline.quant.plant import main as plant_main

    out = tmp_path / "base_sw"
    plant_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_steps", "5"])
    metrics = read_stage_result(out)["metrics"]
    assert metrics["super_activation"] > 100 and metrics["detected"] == 1
    sws, _ = detect_super_weights(load(out), encode_prompt(tok, "12 = 12"))
    assert [(s.layer, s.row, s.col) for s in sws] == [(0, 17, 100)]
    # a circuit too weak to spike is reported as undetected (the stage says so instead of a later stage failing)
    weak = tmp_path / "weak"
    plant_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(weak), "--train_steps", "0",
                "--gate", "0.001"])
    assert read_stage_result(weak)["metrics"]["detected"] == 0
    with pytest.raises(SystemExit) as e:
        cli(plant_main, ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "x"),
                         "--col", "128"])
    assert e.value.code == 2 and "key 'col' = 128 is outside [0, 128)" in capsys.readouterr().err

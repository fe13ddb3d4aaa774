"""SFT and DPO stages on a tiny model: they train, change every trainable weight, save loadable
artifacts, resume exactly, and reject bad data with one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import dpo, sft
from pipeline.config import RecipeError

COMMON = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "100",
          "--learning_rate", "3e-3", "--report_to", "none", "--bf16", "false", "--gradient_checkpointing", "false",
          "--max_length", "96", "--seed", "0"]


def _sft(model, data, out, *extra):
    return sft.main(["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                     "--max_steps", "4", *COMMON, *extra])


def _dpo(model, data, out, *extra):
    return dpo.main(["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                     "--max_steps", "3", *COMMON, *extra])


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_all_changed(before, after):
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"


def test_sft_full(tiny_model_dir, sft_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = _sft(tiny_model_dir, sft_jsonl, tmp_path / "sft", "--assistant_only_loss", "true")
    assert metrics["global_step"] == 4 and metrics["train_loss"] > 0 and metrics["world_size"] == 1
    _assert_all_changed(_weights(tiny_model_dir), _weights(tmp_path / "sft"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").chat_template
    result = json.loads((tmp_path / "sft" / "stage_result.json").read_text())
    assert result["stage"] == "sft" and result["metrics"]["train_loss"] == metrics["train_loss"]


@pytest.mark.parametrize("ref", ["copy", "precomputed", "separate"])
def test_dpo_full_reference_modes(tiny_model_dir, dpo_jsonl, tmp_path, ref):
    extra = {"copy": [], "precomputed": ["--precompute_ref_log_probs", "true"],
             "separate": ["--ref_model_name_or_path", str(tiny_model_dir)]}[ref]
    metrics = _dpo(tiny_model_dir, dpo_jsonl, tmp_path / "dpo", *extra)
    assert metrics["global_step"] == 3 and 0 < metrics["train_loss"] < 5
    _assert_all_changed(_weights(tiny_model_dir), _weights(tmp_path / "dpo"))


def test_lora_dpo_and_qlora_sft(tiny_model_dir, dpo_jsonl, sft_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]
    _dpo(tiny_model_dir, dpo_jsonl, tmp_path / "lora", *lora)
    _sft(tiny_model_dir, sft_jsonl, tmp_path / "qlora", *lora, "--load_in_4bit", "true")
    for out in ("lora", "qlora"):
        adapter = load_file(str(tmp_path / out / "adapter_model.safetensors"))
        lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B starts at zero: it must train"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / out)
        assert model.merge_and_unload() is not None


# The tiny DPO recipe precomputes its reference; the tiny SFT recipe batches by length (the system-prompted rows are
# the longer bucket here).
@pytest.mark.parametrize("stage", ["sft", "sft_length_buckets", "dpo", "dpo_precomputed"])
def test_resume_gives_the_same_losses(tiny_model_dir, sft_jsonl, dpo_jsonl, tmp_path, stage):
    run = _sft if stage.startswith("sft") else _dpo
    data = sft_jsonl if stage.startswith("sft") else dpo_jsonl
    args = ["--max_steps", "8", "--save_steps", "4", "--save_total_limit", "5"]
    if stage == "sft_length_buckets":
        args += ["--length_buckets", "[20]"]
    if stage == "dpo_precomputed":
        args += ["--precompute_ref_log_probs", "true", "--loss_type", "[sigmoid, sft]"]
    run(tiny_model_dir, data, tmp_path / "full", *args)
    # A run killed anywhere in steps 5-8 leaves exactly this on disk: checkpoint-4 and nothing after it.
    (tmp_path / "killed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "killed" / "checkpoint-4")
    run(tiny_model_dir, data, tmp_path / "killed", *args)

    def losses(out):
        log = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in log if "loss" in h}

    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(full) == list(range(1, 9)) and sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_rows_cut_at_max_length_are_counted_in_a_warning(tiny_model_dir, sft_jsonl, tmp_path, capsys):
    """TRL keeps a row's first max_length tokens without a word: the stage says how many rows lost their end."""
    _sft(tiny_model_dir, sft_jsonl, tmp_path / "short", "--max_length", "40", "--max_steps", "1")
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "training rows reach max_length" in x)
    cut = int(line.split(" of 64 training rows")[0].split(": ")[-1])
    assert 0 < cut <= 64 and "of 64 training rows reach max_length 40 (cut at the end" in line
    _sft(tiny_model_dir, sft_jsonl, tmp_path / "long", "--max_steps", "1", "--max_length", "512")
    assert "reach max_length" not in capsys.readouterr().out


def test_finished_stage_is_not_retrained(tiny_model_dir, sft_jsonl, tmp_path):
    first = _sft(tiny_model_dir, sft_jsonl, tmp_path / "sft")
    before = (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns
    again = _sft(tiny_model_dir, sft_jsonl, tmp_path / "sft")
    assert again["train_loss"] == first["train_loss"]
    assert (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_fallback_builds_the_base(tmp_path, sft_jsonl, monkeypatch):
    spec = tmp_path / "model.yaml"
    spec.write_text(f"output_dir: {tmp_path / 'base'}\nhidden_size: 32\nnum_hidden_layers: 1\n"
                    "num_attention_heads: 2\nvocab_size: 320\n")
    metrics = _sft(tmp_path / "not-there", sft_jsonl, tmp_path / "sft", "--tiny_model", str(spec), "--max_steps", "1")
    assert metrics["global_step"] == 1 and (tmp_path / "base" / "config.json").is_file()


def _bad(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows,message", [
    ([{"question": "q", "answer": "a"}], r"columns \['answer', 'question'\] do not fit the sft stage"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
      {"messages": [{"role": "bot", "content": "x"}]}],
     "bad.jsonl: line 2: column 'messages' has an unknown role 'bot'"),
    ([{"messages": []}], "bad.jsonl: line 1: column 'messages' is an empty list"),
])
def test_bad_sft_data(tiny_model_dir, tmp_path, rows, message):
    with pytest.raises(RecipeError, match=message):
        _sft(tiny_model_dir, _bad(tmp_path, rows), tmp_path / "out")


def test_bad_dpo_data_and_paths(tiny_model_dir, sft_jsonl, dpo_jsonl, tmp_path):
    with pytest.raises(RecipeError, match="do not fit the dpo stage"):
        _dpo(tiny_model_dir, sft_jsonl, tmp_path / "out")
    with pytest.raises(RecipeError, match="dataset .*missing.jsonl not found"):
        _dpo(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(RecipeError, match="model_name_or_path.*not found"):
        _dpo(tmp_path / "no-model", dpo_jsonl, tmp_path / "out")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(RecipeError, match=r"broken.jsonl: line 2: invalid JSON \(Expecting value"):
        _dpo(tiny_model_dir, broken, tmp_path / "out")


def test_mixture_of_local_files(tiny_model_dir, sft_jsonl, tmp_path):
    import datasets

    from pipeline.config import DataArguments
    from pipeline.data import load_train_data

    disk = tmp_path / "disk"
    datasets.load_dataset("json", data_files=str(sft_jsonl), split="train").save_to_disk(str(disk))
    mix = [{"path": str(sft_jsonl), "fraction": 0.75}, {"path": str(disk), "fraction": 0.25}]
    train, _ = load_train_data(DataArguments(datasets=mix), "sft", "mix.yaml")
    assert len(train) == 64 + 21  # shares 3:1 of the largest mixture that oversamples neither source
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"datasets:\n  - {{path: {sft_jsonl}, fraction: 0.5}}\n  - {{path: {disk}, fraction: 0.5}}\n")
    metrics = sft.main(["--config", str(recipe), "--model_name_or_path", str(tiny_model_dir), "--output_dir",
                        str(tmp_path / "out"), "--max_steps", "1", *COMMON])
    assert metrics["global_step"] == 1


def test_qlora_sft_keeps_a_planted_super_weight_exact(tiny_model_dir, sft_jsonl, tmp_path):
    """The recipe switch end to end: detect (no registry given), QLoRA through the SFT stage, merge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quant.plant import Plant, plant_super_weight
    from pipeline.quant.qlora import merge_adapter_preserving_super_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sw = plant_super_weight(model, tok.bos_token_id, Plant(layer=0, row=9, col=40, value=32.0))
    model.save_pretrained(tmp_path / "planted")
    tok.save_pretrained(tmp_path / "planted")
    out = tmp_path / "qlora"
    _sft(tmp_path / "planted", sft_jsonl, out, "--load_in_4bit", "true", "--use_peft", "true", "--lora_r", "4",
         "--lora_target_modules", "q_proj", "v_proj", "--preserve_super_weights", "true", "--max_steps", "2")
    registry = json.loads((out / "super_weights.json").read_text())
    assert [(s["layer"], s["row"], s["col"]) for s in registry["super_weights"]] == [(sw.layer, sw.row, sw.col)]
    merged = merge_adapter_preserving_super_weights(str(tmp_path / "planted"), str(out))
    got = merged.model.layers[sw.layer].mlp.down_proj.weight[sw.row, sw.col]
    assert got.item() == sw.value  # bit-exact through 4-bit training, save and merge


# --- issue #15 item 5: resume_from_checkpoint, recipe fingerprint, the "finished" check before loading ---------

def _losses_of(out):
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in log if "loss" in h}


def test_finished_check_runs_before_anything_loads(tiny_model_dir, sft_jsonl, tmp_path, monkeypatch):
    import datasets
    import transformers

    first = _sft(tiny_model_dir, sft_jsonl, tmp_path / "sft")

    def trip(*a, **k):
        raise AssertionError("a finished stage loaded a model, tokenizer or dataset")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", trip)
    monkeypatch.setattr(datasets, "load_dataset", trip)
    assert _sft(tiny_model_dir, sft_jsonl, tmp_path / "sft") == first


def test_resume_from_checkpoint_path_is_honoured(tiny_model_dir, sft_jsonl, tmp_path):
    args = ["--max_steps", "8", "--save_steps", "4"]
    _sft(tiny_model_dir, sft_jsonl, tmp_path / "a", *args)
    ckpt = tmp_path / "elsewhere" / "checkpoint-4"
    shutil.copytree(tmp_path / "a" / "checkpoint-4", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for h in state["log_history"]:  # marks: a run that resumed from this checkpoint carries them over
        h["loss"] = 100.0 + h["step"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    _sft(tiny_model_dir, sft_jsonl, tmp_path / "b", *args, "--resume_from_checkpoint", str(ckpt))
    full, resumed = _losses_of(tmp_path / "a"), _losses_of(tmp_path / "b")
    assert [resumed[s] for s in range(1, 5)] == [101.0, 102.0, 103.0, 104.0]
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_checkpoint_of_another_recipe_is_refused(tiny_model_dir, sft_jsonl, tmp_path):
    out = tmp_path / "sft"
    args = ["--max_steps", "8", "--save_steps", "4"]
    _sft(tiny_model_dir, sft_jsonl, out, *args)
    shutil.rmtree(out / "checkpoint-8")  # as if killed after checkpoint-4
    (out / "stage_result.json").unlink()
    with pytest.raises(RecipeError, match=r"checkpoint-4 was made by a different recipe \(keys that differ: "
                                          r"learning_rate: 0.003 -> 0.001\)"):
        _sft(tiny_model_dir, sft_jsonl, out, *args, "--learning_rate", "1e-3")
    # logging, saving and output keys do not count: this resumes
    metrics = _sft(tiny_model_dir, sft_jsonl, out, *args, "--logging_steps", "2", "--save_total_limit", "3")
    assert metrics["global_step"] == 8

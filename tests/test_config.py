"""Strict recipe parsing: unknown keys, wrong types, bad files and bad combinations fail in one line."""

import subprocess
import sys

import pytest
from trl import DPOConfig, SFTConfig

from pipeline.config import DataArguments, ModelArguments, RecipeError, check_training, parse
from tests.conftest import ROOT

TYPES = [DataArguments, SFTConfig, ModelArguments]


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def _parse(tmp_path, text, *cli):
    path = _recipe(tmp_path, text)
    return parse(TYPES, ["--config", path, *cli])


BASE = "model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: out\n"


def test_values_and_overrides(tmp_path):
    (data, train, model), explicit, source = _parse(
        tmp_path, BASE + "learning_rate: 1e-5\nlora_target_modules: all-linear\n",
        "--learning_rate", "3e-4", "--num_train_epochs=2", "--use_peft", "--lora_r", "4")
    assert train.learning_rate == 3e-4  # the command line wins; YAML's `1e-5` string became a float
    assert train.num_train_epochs == 2.0 and model.use_peft is True and model.lora_r == 4
    assert model.lora_target_modules == "all-linear"
    assert explicit["learning_rate"] == 3e-4 and source.endswith("r.yaml")
    assert train.bf16 is False and train.use_cpu is True  # no CUDA here: TRL's bf16 default is switched off


def test_list_option_takes_several_values(tmp_path):
    (_, _, model), _, _ = _parse(tmp_path, BASE, "--lora_target_modules", "q_proj", "v_proj")
    assert model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("text,cli,message", [
    ("lerning_rate: 1e-5\n", [], "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("", ["--num_train_epoch", "2"], "unknown key 'num_train_epoch' (did you mean 'num_train_epochs'?)"),
    ("num_train_epochs: two\n", [], "key 'num_train_epochs' must be float, got 'two'"),
    ("use_peft: 1\n", [], "key 'use_peft' must be bool, got 1"),
    ("per_device_train_batch_size: 2.5\n", [], "key 'per_device_train_batch_size' must be int"),
    ("", ["--lora_r", "x"], "option --lora_r must be int, got 'x'"),
    ("datasets:\n  - {path: a.jsonl, splt: train}\n", [], "unknown key 'datasets[0].splt' (did you mean 'split'?)"),
    ("lr_scheduler_type: cosin\n", [], "key 'lr_scheduler_type' must be"),
])
def test_bad_recipes_name_file_and_key(tmp_path, text, cli, message):
    with pytest.raises(RecipeError) as err:
        _parse(tmp_path, BASE + text, *cli)
    assert message in str(err.value) and "r.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        parse(TYPES, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(RecipeError, match=r"r.yaml: line \d+ invalid YAML"):
        _parse(tmp_path, "a: 1\nb: [unclosed\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        _parse(tmp_path, "- just\n- a list\n")


@pytest.mark.parametrize("text,message", [
    ("load_in_4bit: true\n", "needs 'use_peft: true'"),
    ("load_in_4bit: true\nload_in_8bit: true\nuse_peft: true\n", "8 bit and 4 bit"),  # ModelConfig's own check
    ("load_in_4bit: true\nuse_peft: true\naccelerate_config: ACC\n", "does not work with DeepSpeed ZeRO-3"),
    ("use_peft: true\nref_model_name_or_path: r\n", "adapters disabled"),
    ("accelerate_config: missing.yaml\n", "file missing.yaml not found"),
])
def test_cross_field_rules(tmp_path, text, message):
    text = text.replace("ACC", str(ROOT / "accelerate_configs" / "zero3.yaml"))
    with pytest.raises(RecipeError, match=message):
        (data, train, model), _, source = _parse(tmp_path, BASE + text)
        check_training(model, train, data, source)


def test_qlora_with_zero3_from_accelerate_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    (data, train, model), _, source = _parse(tmp_path, BASE + "load_in_4bit: true\nuse_peft: true\n")
    with pytest.raises(RecipeError, match="ZeRO-3"):
        check_training(model, train, data, source)


def test_cli_exits_2_with_one_line(tmp_path):
    path = _recipe(tmp_path, BASE + "learning_rat: 1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.sft", "--config", path], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"]
    assert "Traceback" not in proc.stderr


def test_dpo_config_fields_are_checked_too(tmp_path):
    path = _recipe(tmp_path, BASE + "beta: high\n")
    with pytest.raises(RecipeError, match="key 'beta' must be float"):
        parse([DataArguments, DPOConfig, ModelArguments], ["--config", path])

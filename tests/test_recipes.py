"""Every shipped recipe parses strictly and passes its stage's cross-field checks (--dry_run)."""

import importlib
from pathlib import Path

import pytest

from pipeline.config import ModelArguments, load_yaml, parse
from tests.conftest import ROOT

# Which stage module reads a recipe: named in the staged pipeline files, else by a word of the file name.
# plant_sw and qlora_sw run on their own since the demo starts from the shipped base (docs/quant.md).
STAGE_BY_PREFIX = {"sft": "pipeline.sft", "dpo": "pipeline.dpo", "model": "pipeline.tiny",
                   "plant": "pipeline.quant.plant", "qlora": "pipeline.sft"}


def _is_pipeline(path: Path) -> bool:
    return "stages" in load_yaml(path)


def _stage_recipes():
    mapping = {}
    for path in sorted(ROOT.glob("recipes/*/*.yaml")):
        if _is_pipeline(path):
            for stage in load_yaml(path)["stages"]:
                mapping[str(ROOT / stage["config"])] = stage["module"]
    for path in sorted(ROOT.glob("recipes/*/*.yaml")):
        if _is_pipeline(path) or str(path) in mapping:
            continue
        stage = next((w for w in path.stem.split("_") if w in STAGE_BY_PREFIX), None)  # sft_qlora, longctx_dpo
        if stage:
            mapping[str(path)] = STAGE_BY_PREFIX[stage]
    return sorted(mapping.items())


def _arguments(module: str):
    """The dataclasses a (non-trainer) stage parses its recipe into."""
    from pipeline.cppo import CPPOArguments
    from pipeline.evaluate import EvalArguments
    from pipeline.evoprompt import EvoPromptArguments
    from pipeline.generate import GenerateArguments
    from pipeline.longctx.data import PasskeyDataArguments
    from pipeline.kv.detect import DetectArguments
    from pipeline.niah import NiahArguments
    from pipeline.quant.compare import CompareArguments
    from pipeline.quant.plant import PlantArguments
    from pipeline.rl.cppo_trainer import CPPOConfig
    from pipeline.tiny import TinyModelSpec

    return {"pipeline.tiny": [TinyModelSpec], "pipeline.generate": [GenerateArguments],
            "pipeline.evaluate": [EvalArguments], "pipeline.evoprompt": [EvoPromptArguments],
            "pipeline.niah": [NiahArguments], "pipeline.longctx.data": [PasskeyDataArguments],
            "pipeline.quant.plant": [PlantArguments], "pipeline.kv.detect": [DetectArguments],
            "pipeline.quant.compare": [CompareArguments],
            "pipeline.cppo": [CPPOArguments, CPPOConfig, ModelArguments]}[module]


RECIPES = _stage_recipes()


def test_every_recipe_has_a_stage():
    stray = [p for p in ROOT.glob("recipes/*/*.yaml") if not _is_pipeline(p) and str(p) not in dict(RECIPES)]
    assert not stray, f"recipes no stage claims: {stray}"
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("recipe,module", RECIPES, ids=[Path(r).relative_to(ROOT).as_posix() for r, _ in RECIPES])
def test_recipe_parses_strictly(recipe, module, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if module in ("pipeline.sft", "pipeline.dpo"):  # the trainer stages check cross-field rules too
        importlib.import_module(module).main(["--config", recipe, "--dry_run"])
        out = capsys.readouterr().out
        assert "stage:" in out and "output_dir:" in out
    else:
        instances, values, _ = parse(_arguments(module), ["--config", recipe])
        assert values and all(instances)


def test_real_recipes_use_zero3_or_reject_it():
    real = [r for r, m in RECIPES if "/tiny/" not in r and m in ("pipeline.sft", "pipeline.dpo")]
    assert len(real) >= 6
    for recipe in real:
        cfg = load_yaml(recipe)
        assert cfg.get("accelerate_config"), f"{recipe}: says which accelerate config it is for"
        if cfg.get("load_in_4bit"):
            assert "zero3" not in cfg["accelerate_config"]

"""Every shipped recipe parses strictly and passes its stage's cross-field checks (--dry_run)."""

import importlib
from pathlib import Path

import pytest

from pipeline.config import load_yaml
from tests.conftest import ROOT

# Which stage module reads a recipe: named in the staged pipeline files, else by file name.
STAGE_BY_PREFIX = {"sft": "pipeline.sft", "dpo": "pipeline.dpo", "model": "pipeline.tiny"}


def _stage_recipes():
    mapping = {}
    for pipeline_file in ROOT.glob("recipes/*/pipeline.yaml"):
        for stage in load_yaml(pipeline_file)["stages"]:
            mapping[str(ROOT / stage["config"])] = stage["module"]
    for path in sorted(ROOT.glob("recipes/*/*.yaml")):
        if path.name == "pipeline.yaml" or str(path) in mapping:
            continue
        prefix = path.stem.split("_")[0]
        if prefix in STAGE_BY_PREFIX:
            mapping[str(path)] = STAGE_BY_PREFIX[prefix]
    return sorted(mapping.items())


RECIPES = _stage_recipes()


def test_every_recipe_has_a_stage():
    stray = [p for p in ROOT.glob("recipes/*/*.yaml") if p.name != "pipeline.yaml" and str(p) not in dict(RECIPES)]
    assert not stray, f"recipes no stage claims: {stray}"
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("recipe,module", RECIPES, ids=[Path(r).relative_to(ROOT).as_posix() for r, _ in RECIPES])
def test_recipe_parses_strictly(recipe, module, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    mod = importlib.import_module(module)
    if module == "pipeline.tiny":
        from pipeline.tiny import load_spec

        assert load_spec(recipe).output_dir
        return
    if not hasattr(mod, "main"):
        pytest.fail(f"{module} has no main()")
    mod.main(["--config", recipe, "--dry_run"])
    out = capsys.readouterr().out
    assert "stage:" in out and "output_dir:" in out


def test_real_recipes_use_zero3_or_reject_it():
    real = [r for r, m in RECIPES if "/tiny/" not in r and m in ("pipeline.sft", "pipeline.dpo")]
    assert len(real) >= 6
    for recipe in real:
        cfg = load_yaml(recipe)
        assert cfg.get("accelerate_config"), f"{recipe}: says which accelerate config it is for"
        if cfg.get("load_in_4bit"):
            assert "zero3" not in cfg["accelerate_config"]

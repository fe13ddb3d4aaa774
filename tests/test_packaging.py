"""The version ranges in pyproject.toml and the two ends CI installs (.ci/lowest.txt, .ci/highest.txt)."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def _ranges() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return {r.name: r for r in reqs if r.specifier}


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, version = line.split("==")
            pins[pkg.strip()] = Version(version.strip())
    return pins


def test_ci_installs_the_lowest_and_a_highest_version_of_every_range():
    ranges, low, high = _ranges(), _pins("lowest.txt"), _pins("highest.txt")
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "tensorboard",
                "bitsandbytes", "deepspeed"):
        spec = ranges[pkg].specifier
        floor = next(Version(s.version) for s in spec if s.operator == ">=")
        assert low[pkg] == floor, f"{pkg}: .ci/lowest.txt pins {low[pkg]}, pyproject's lowest is {floor}"
        assert high[pkg] in spec, f"{pkg}: .ci/highest.txt pins {high[pkg]}, outside pyproject's {spec}"
        assert high[pkg] >= low[pkg]


def test_distribution_name_is_not_the_import_name():
    # `pipeline` is taken on the package index; the import package stays `pipeline/`.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "longctx-align-pipeline"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["pipeline*"]

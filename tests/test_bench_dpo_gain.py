"""scripts/bench_dpo_gain.py's paired comparison: the figures docs/BENCHMARKS.md quotes for "DPO over SFT"."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_dpo_gain", Path(__file__).parents[1] / "scripts/bench_dpo_gain.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def rows(bits):
    return [{"correct": bool(b)} for b in bits]


def test_paired_gain_counts_each_question_once_and_its_se_is_that_of_the_differences():
    sft = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    dpo = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]   # 3 questions only DPO gets, 1 only SFT gets
    got = bench.paired(rows(sft), rows(dpo))
    assert got["n"] == 10 and got["sft"] == 0.6 and got["dpo"] == 0.8
    assert got["gain"] == pytest.approx(0.2)
    assert got["dpo_only_right"] == 3 and got["sft_only_right"] == 1
    # differences 0,0,1,1,-1,0,0,0,1,0: mean 0.2, sample variance 3.6 / 9 = 0.4, SE sqrt(0.4 / 10) = 0.2
    assert got["paired_se"] == pytest.approx(0.2)


def test_identical_models_have_no_gain_and_no_noise():
    same = rows([1, 0, 1, 1])
    got = bench.paired(same, same)
    assert got["gain"] == 0 and got["paired_se"] == 0


@pytest.mark.parametrize("argv, line", [
    (["--n", "1"], "error: --n: must be >= 2, got 1"),
    (["--runs", "/nonexistent"], "error: /nonexistent/seed0/sft: no model there; run scripts/bench_demo.py first"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, line):
    r = subprocess.run([sys.executable, str(Path(bench.__file__)), *argv], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == line

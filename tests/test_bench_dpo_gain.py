"""scripts/bench_dpo_gain.py's paired comparison: the figures docs/BENCHMARKS.md quotes for "DPO over SFT"."""

import importlib.util
import statistics
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
    d = [b - a for a, b in zip(sft, dpo)]
    assert got["n"] == 10 and got["sft"] == 0.6 and got["dpo"] == 0.8
    assert got["gain"] == pytest.approx(0.2)
    assert got["dpo_only_right"] == 3 and got["sft_only_right"] == 1
    assert got["paired_se"] == pytest.approx(statistics.stdev(d) / 10 ** 0.5)


def test_identical_models_have_no_gain_and_no_noise():
    same = rows([1, 0, 1, 1])
    got = bench.paired(same, same)
    assert got["gain"] == 0 and got["paired_se"] == 0

"""scripts/gpu_longctx_8b.py's arithmetic (the GPU run itself cannot run here): parameter count, the budget's
deadlines, the step-time guess that stops a ladder, and the summary's extrapolation labels."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_longctx as B  # noqa: E402
import gpu_longctx_8b as G  # noqa: E402


def test_the_8b_preset_is_llama_3_1_8b():
    assert B.n_params(B.PRESETS["llama8b"]) == 8_030_261_248  # Llama-3.1-8B's parameter count


def test_step_time_guess_is_a_clipped_local_power_law():
    assert B.predict_step_s([], 1000) == 0.0
    assert B.predict_step_s([(1000, 2.0)], 2000, safety=1.0) == pytest.approx(8.0)  # one point: quadratic
    assert B.predict_step_s([(1000, 2.0), (2000, 3.0)], 4000, safety=1.0) == pytest.approx(6.0)  # exponent clipped to 1
    assert B.predict_step_s([(1000, 1.0), (2000, 8.0)], 4000, safety=1.0) == pytest.approx(32.0)  # ... and to 2


def test_budget_reserves_the_later_runs_minimum_and_shares_the_slack():
    b = G.Budget(100.0, start=0.0)
    # 100 s left: 10 now, 20 + 30 later, slack 40 shared 1 : (1 + 3)
    assert b.deadline(10, [20, 30], 1.0, [1.0, 2.0], now=0.0) == pytest.approx(10 + 40 * 1 / 4)
    assert b.deadline(10, [80, 30], 1.0, [1.0], now=0.0) == pytest.approx(10)  # no slack: its minimum only
    assert b.deadline(10, [], 1.0, [], now=95.0) is None  # not even its minimum fits: skipped


def test_summary_labels_extrapolations_and_judges_the_goals():
    rows = [dict(stage="sft", mode=m, length=n, peak_gb=base + n * slope, host_peak_gb=10.0 + n * 1e-6,
                 step_s=n * t, tokens_per_s=1 / t)
            for m, base, slope, t in (("trl", 20, 4e-4, 1e-3), ("ours", 20, 1e-4, 1.2e-3)) for n in (16384, 32768)]
    rows.append(dict(stage="sft", mode="trl", length=65536, error="out of memory"))
    s = G.summarize(rows, cap_gb=78.0, host_cap_gb=120.0, modes=["trl", "ours"])
    ours = s["sft/ours"]
    assert ours["longest_measured"] == 32768 and abs(ours["extrapolated_gpu_limit"] - 580_000) <= 1  # (78-20)/1e-4
    assert ours["extrapolated_max_length"] == ours["extrapolated_gpu_limit"] and "NOT a measurement" in ours["note"]
    assert s["sft/trl"]["failed"] == {65536: "out of memory"}
    assert s["sft/goal"].startswith("extrapolated only")  # 580k >= 500k, but only by the fit
    assert s["sft/step_time_ours_vs_trl"] == {16384: 1.2, 32768: 1.2} and s["sft/step_time_goal"].startswith("met")
    assert "dpo/goal" in s and s["dpo/goal"].startswith("not met")

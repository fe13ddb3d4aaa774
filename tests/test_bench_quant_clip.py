"""scripts/bench_quant_clip.py: the sweep behind recipes/tiny/quant.yaml's clip_zscore."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts/bench_quant_clip.py"


def test_a_clip_of_zero_sigmas_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path), "--zscore", "4", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --zscore: every clip must be > 0 standard deviations, got [4.0, 0.0]"


def test_missing_runs_are_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path), "--seeds", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path}/seed0/dpo: missing; run scripts/bench_demo.py first"

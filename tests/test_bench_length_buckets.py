"""scripts/bench_length_buckets.py: its padding count and its bad inputs (the timed runs are the benchmark's)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts/bench_length_buckets.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_length_buckets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_padded_tokens_count_each_batch_at_its_longest_row():
    lengths = [10, 100, 20, 30]
    # batches [10, 100] and [20, 30]: 2 x 100 + 2 x 30 computed, 160 real, over 4 rows
    assert _module().padded_tokens(lengths, [0, 1, 2, 3], 2, 2) == (65.0, 40.0)
    assert _module().padded_tokens(lengths, [0, 2, 3, 1], 2, 1) == (20.0, 15.0)  # the first batch only


def test_bad_edges_and_steps_are_one_line_and_exit_2(tmp_path):
    for extra, line in ((["--edges", "[0]"], "error: --edges must be a JSON list of token lengths >= 1, got [0]"),
                        (["--edges", "256"], "error: --edges must be a JSON list of token lengths >= 1, got 256"),
                        (["--steps", "0"], "error: --steps and --repeats must be >= 1")):
        r = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), *extra], capture_output=True,
                           text=True)
        assert r.returncode == 2 and r.stderr.strip() == line

"""A stage for the runner's tests. With --pid_file: writes its pid (and its child's), then sleeps. With --exit N:
prints a long line and exits with N. With --seconds S: sleeps S seconds, then writes its start and end times and the
OMP_NUM_THREADS and niceness it was given to <output_dir>/times.json and its stage_result.json."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _autogroup_nice():
    try:
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if "--exit" in args:
        print("a long line from the stage " + "x" * 150)
        raise SystemExit(int(args["--exit"]))
    if "--seconds" in args:
        from pipeline.io import write_stage_result

        start = time.time()
        time.sleep(float(args["--seconds"]))
        out = Path(args["--output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "times.json").write_text(json.dumps({"start": start, "end": time.time(),
                                                    "threads": os.environ.get("OMP_NUM_THREADS"),
                                                    "nice": os.nice(0), "autogroup": _autogroup_nice()}))
        write_stage_result(out, "sleepy", {"slept": float(args["--seconds"])})
        raise SystemExit(0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # like accelerate's workers
    Path(args["--pid_file"]).write_text(f"{Path('/proc/self').resolve().name} {child.pid}\n")
    time.sleep(120)

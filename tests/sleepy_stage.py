"""A stage for the runner's tests. With --pid_file: writes its pid (and its child's), then sleeps. With --exit N:
prints a long line and exits with N. With --seconds S: sleeps S seconds, then writes its start and end times and the
OMP_NUM_THREADS and niceness it was given to <output_dir>/times.json and its stage_result.json (exits 1 instead if
SLEEPY_FAIL names its output_dir). With --probe FILE: writes what it sees of its process (argv, cwd, environment,
torch's threads, where its output goes) to FILE, prints to stdout and stderr, and exits with --code (0: after its
stage_result.json in --output_dir; an atexit handler appends to FILE first)."""

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
    if "--probe" in args:
        import atexit

        import torch

        probe = Path(args["--probe"])
        probe.write_text(json.dumps({
            "argv": sys.argv[1:], "argv0": Path(sys.argv[0]).name, "cwd": os.getcwd(), "path0": sys.path[0],
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "PROBE_VAR", "HF_HUB_OFFLINE")},
            "torch_threads": torch.get_num_threads(), "nice": os.nice(0), "session_leader": os.getsid(0) == os.getpid(),
            "stdout": os.path.realpath(f"/proc/self/fd/{sys.stdout.fileno()}"),
            "stderr": os.path.realpath(f"/proc/self/fd/{sys.stderr.fileno()}")}) + "\n")
        atexit.register(lambda: probe.write_text(probe.read_text() + "atexit\n"))
        print("probe: to stdout")
        print("probe: to stderr", file=sys.stderr)
        if int(args.get("--code", 0)) == 0:
            from pipeline.io import write_stage_result

            write_stage_result(Path(args["--output_dir"]), "probe", {})
        raise SystemExit(int(args.get("--code", 0)))
    if "--exit" in args:
        print("a long line from the stage " + "x" * 150)
        raise SystemExit(int(args["--exit"]))
    if "--seconds" in args:
        from pipeline.io import write_stage_result

        if os.environ.get("SLEEPY_FAIL") == Path(args["--output_dir"]).name:  # a failure no recipe key records
            raise SystemExit(1)

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

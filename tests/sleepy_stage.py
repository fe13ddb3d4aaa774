"""A stage for the runner's tests. With --pid_file: writes its pid (and its child's), then sleeps. With --exit N:
prints a long line and exits with N."""

import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if "--exit" in args:
        print("a long line from the stage " + "x" * 150)
        raise SystemExit(int(args["--exit"]))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # like accelerate's workers
    Path(args["--pid_file"]).write_text(f"{Path('/proc/self').resolve().name} {child.pid}\n")
    time.sleep(120)

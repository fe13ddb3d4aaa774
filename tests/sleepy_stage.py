"""A stage for the runner's kill tests: writes its pid (and its child's) to --pid_file, then sleeps."""

import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # like accelerate's workers
    Path(args["--pid_file"]).write_text(f"{Path('/proc/self').resolve().name} {child.pid}\n")
    time.sleep(120)

"""Generation throughput against a loopback OpenAI-compatible endpoint with a fixed latency.

Rows/s of the real client path (OpenAITeacher + request cache + progress bar) at concurrency 1..64,
as a ratio of the ideal concurrency / latency. The server runs in its own process.

    OMP_NUM_THREADS=1 python scripts/bench_generate.py [--latency_s 1.0,0.2] [--waves 5] [--repeats 2]
Writes benchmarks/generate.json and benchmarks/generate.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.generation.teachers import OpenAITeacher, Request, RequestCache, run_requests  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to show where the time per row goes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(base_url: str, concurrency: int, n: int, tag: str) -> tuple[float, float]:
    """(rows/s, client CPU ms per row) for n requests at this concurrency."""
    teacher = OpenAITeacher(base_url=base_url, model="bench", concurrency=concurrency, timeout_s=30)
    reqs = [Request(f"{tag}-{concurrency}-{i}", ({"role": "user", "content": f"question {i}"},), seed=i)
            for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = RequestCache(Path(tmp) / "cache.jsonl")
        start, cpu = time.perf_counter(), time.process_time()
        replies = run_requests(teacher, reqs, cache, desc=f"c={concurrency}")
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        cache.close()
    assert len(replies) == n and all(replies.values())
    return n / elapsed, 1000 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency_s", default="1.0,0.2", help="comma-separated server latencies (seconds)")
    ap.add_argument("--waves", type=int, default=5, help="requests per level = concurrency x waves")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=2, help="best of N per level (the machine is shared)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate"))
    args = ap.parse_args()

    series = {}
    for latency in [float(x) for x in args.latency_s.split(",")]:
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency_s",
                                   str(latency)], stdout=subprocess.PIPE, text=True)
        try:
            base_url = server.stdout.readline().strip()
            measure(base_url, 4, 8, "warmup")
            rows = []
            for c in [int(x) for x in args.levels.split(",")]:
                n = max(c * args.waves, 20)
                server_cpu = cpu_seconds(server.pid)
                runs = [measure(base_url, c, n, f"{latency}-{r}") for r in range(args.repeats)]
                server_ms = 1000 * (cpu_seconds(server.pid) - server_cpu) / (n * args.repeats)
                best, cpu_ms = max(runs)
                ideal = c / latency
                rows.append({"concurrency": c, "requests": n, "rows_per_s": round(best, 2),
                             "rows_per_s_all": [round(r, 2) for r, _ in runs], "ideal_rows_per_s": round(ideal, 2),
                             "ratio_to_ideal": round(best / ideal, 3), "client_cpu_ms_per_row": round(cpu_ms, 3),
                             "server_cpu_ms_per_row": round(server_ms, 3)})
                print(json.dumps({"latency_s": latency, **rows[-1]}), flush=True)
        finally:
            server.kill()
            server.wait()
        series[str(latency)] = rows

    result = {"waves": args.waves, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
                         f"(load average at the end: {os.getloadavg()[0]:.1f})",
              "python": platform.python_version(),
              "command": "OMP_NUM_THREADS=1 python scripts/bench_generate.py " + " ".join(sys.argv[1:]),
              "results_by_latency_s": series}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (latency, rows) in enumerate(series.items()):
        cs = [r["concurrency"] for r in rows]
        color = f"C{i}"
        a.plot(cs, [r["ideal_rows_per_s"] for r in rows], "--", color=color, alpha=0.6)
        a.plot(cs, [r["rows_per_s"] for r in rows], "o-", color=color, label=f"{float(latency) * 1000:.0f} ms (dashed: ideal)")
        b.plot(cs, [r["ratio_to_ideal"] for r in rows], "o-", color=color, label=f"{float(latency) * 1000:.0f} ms latency")
    a.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="rows / s",
          title="generate vs loopback OpenAI-compatible endpoint")
    b.axhline(0.9, color="r", ls=":", label="goal: 0.9x ideal at 32")
    b.set(xscale="log", ylim=(0, 1.05), xlabel="concurrent requests", ylabel="measured / (concurrency / latency)")
    for ax in (a, b):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

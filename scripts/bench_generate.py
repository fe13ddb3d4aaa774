"""Generation throughput against a loopback OpenAI-compatible endpoint with a fixed latency and injected faults.

Rows/s of the real client path (OpenAITeacher + request cache + progress bar) at concurrency 1..64,
as a ratio of the ideal concurrency / latency (a fault-free server, no retries). The server runs in its own
process. A fault rate f splits evenly over HTTP 429, HTTP 500, a hang of --hang_s and a reply whose JSON is
cut in half; every faulted request is retried (default client settings: backoff 0.5 s doubling, hedging after
2x the 95th percentile latency).

    OMP_NUM_THREADS=1 python scripts/bench_generate.py [--latency_s 1.0,0.2] [--fault_rates 0,0.2] [--waves 10]
Writes benchmarks/generate.json and benchmarks/generate.png.
"""

from __future__ import annotations

import argparse
import json
import math
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


def measure(base_url: str, concurrency: int, n: int, tag: str) -> tuple[float, float, dict]:
    """(rows/s, client CPU ms per row, client retry/hedge counts) for n requests at this concurrency."""
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
    return n / elapsed, 1000 * cpu / n, dict(teacher.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency_s", default="1.0,0.2", help="comma-separated server latencies (seconds)")
    ap.add_argument("--fault_rates", default="0,0.2", help="comma-separated fraction of requests that fail once")
    ap.add_argument("--hang_s", type=float, default=5.0, help="how long a hung request hangs")
    ap.add_argument("--waves", type=int, default=5, help="requests per level >= concurrency x waves")
    ap.add_argument("--min_seconds", type=float, default=0.0,
                    help="and >= enough requests for this many ideal seconds (so the last retries' tail is amortised "
                    "as in a long generation run)")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=2, help="best of N per level (the machine is shared)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate"))
    args = ap.parse_args()

    series = {}
    for latency in [float(x) for x in args.latency_s.split(",")]:
        for rate in [float(x) for x in args.fault_rates.split(",")]:
            kinds = ("429", "500", "timeout", "truncated")
            faults = [a for k in kinds for a in (f"--fault_{k}", str(rate / len(kinds)))] if rate else []
            server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency_s",
                                       str(latency), "--hang_s", str(args.hang_s), *faults],
                                      stdout=subprocess.PIPE, text=True)
            try:
                base_url = server.stdout.readline().strip()
                measure(base_url, 4, 8, f"warmup-{rate}")
                rows = []
                for c in [int(x) for x in args.levels.split(",")]:
                    n = max(c * args.waves, 20, math.ceil(args.min_seconds * c / latency))
                    server_cpu = cpu_seconds(server.pid)
                    runs = [measure(base_url, c, n, f"{latency}-{rate}-{r}") for r in range(args.repeats)]
                    server_ms = 1000 * (cpu_seconds(server.pid) - server_cpu) / (n * args.repeats)
                    best, cpu_ms, stats = max(runs, key=lambda x: x[0])
                    ideal = c / latency
                    rows.append({"concurrency": c, "requests": n, "rows_per_s": round(best, 2),
                                 "rows_per_s_all": [round(r[0], 2) for r in runs],
                                 "ideal_rows_per_s": round(ideal, 2), "ratio_to_ideal": round(best / ideal, 3),
                                 "client_retries": stats.get("retries", 0), "client_hedged": stats.get("hedged", 0),
                                 "client_cpu_ms_per_row": round(cpu_ms, 3), "server_cpu_ms_per_row": round(server_ms, 3)})
                    print(json.dumps({"latency_s": latency, "fault_rate": rate, **rows[-1]}), flush=True)
            finally:
                server.kill()
                server.wait()
            series[f"{latency}s latency, {rate:.0%} faults"] = rows

    result = {"waves": args.waves, "min_seconds": args.min_seconds, "repeats": args.repeats, "hang_s": args.hang_s,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
                         f"(load average at the end: {os.getloadavg()[0]:.1f})",
              "python": platform.python_version(),
              "command": "OMP_NUM_THREADS=1 python scripts/bench_generate.py " + " ".join(sys.argv[1:]),
              "results": series}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, rows) in enumerate(series.items()):
        cs = [r["concurrency"] for r in rows]
        color = f"C{i}"
        a.plot(cs, [r["ideal_rows_per_s"] for r in rows], "--", color=color, alpha=0.6)
        a.plot(cs, [r["rows_per_s"] for r in rows], "o-", color=color, label=f"{name} (dashed: ideal)")
        b.plot(cs, [r["ratio_to_ideal"] for r in rows], "o-", color=color, label=name)
    a.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="rows / s",
          title="generate vs loopback OpenAI-compatible endpoint")
    b.axhline(0.9, color="r", ls=":", label="goals at 32: 0.9x ideal, 0.7x with 20% faults")
    b.axhline(0.7, color="r", ls=":")
    b.set(xscale="log", ylim=(0, 1.05), xlabel="concurrent requests", ylabel="measured / (concurrency / latency)")
    for ax in (a, b):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

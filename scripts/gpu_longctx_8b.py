"""The full 32-layer Llama-3.1-8B architecture (built from config, random weights, bf16) on one GPU under DeepSpeed
ZeRO-3 with the optimizer offloaded to host memory: the longest SFT and DPO length that trains a step, TRL's
defaults vs ours, and step time at equal length, inside a fixed wall-time budget (default 540 s, for a 10-minute
slot). Writes $OUT/gpu_longctx_8b.{json,png} (OUT unset: outputs/gpu_longctx_8b/) after every configuration.

    python scripts/gpu_longctx_8b.py                  # one H100/H200; ~9 min
    python scripts/gpu_longctx_8b.py --tiny           # CPU smoke test of the same path: 2-layer model, tiny lengths

"trl" is TRL's SFTTrainer / DPOTrainer with its defaults (activation checkpointing, padded rows); "ours" adds the
long-context switches (tiled MLP, lean RMSNorm, LM-head vocabulary chunks, padding-free rows incl. DPO):
scripts/bench_longctx.py's "ours" mode, whose child process this script runs, one per (stage, mode), through torchrun
(DeepSpeed wants torch.distributed, even for one process). `--checkpoint-offload` also offloads the activation
checkpoints to host memory ("ours_offload"): off by default, because at 256 KB per token they would share the lent
H200's 128 GiB host with the ~60 GiB offloaded optimizer (about 250k tokens at most), while its GPU holds more.
A child trains one step per length of a ladder (16k, 32k, 64k, ...; the first length twice, as its first step builds
the optimizer state), records each step's torch.cuda.max_memory_allocated, host peak RSS and time, and stops before a
length whose predicted step time would overrun its share of the budget, or at the first out-of-memory. At 512k tokens
one 8B step takes over 10 minutes (attention is quadratic), so the longest length that fits a GPU is also given by a
straight-line fit of peak memory vs length (linear with SDPA/flash attention and checkpointing) to the GPU's memory
and to host memory (the optimizer state and offloaded checkpoints live there): clearly marked as extrapolated.
Order: ours SFT, ours DPO, TRL SFT, TRL DPO, so a cut-off run still has the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_longctx as B  # noqa: E402

GOALS = {"sft": 500_000, "dpo": 250_000}  # tokens per sequence (DPO: each of chosen and rejected)
STEP_RATIO_GOAL = 1.3  # ours / TRL step time at an equal length
ALST_SFT = 500_000  # DeepSpeed ALST (arXiv 2506.13996): Llama-8B SFT at 500K tokens on one H100 80GB
K = 1024
LADDERS = {  # lengths a (stage, mode) run climbs until out of memory or out of its share of the budget
    "gpu": {"sft": [16 * K, 32 * K, 64 * K, 128 * K, 256 * K, 512 * K], "dpo": [16 * K, 32 * K, 64 * K, 128 * K,
                                                                              256 * K]},
    "tiny": {"sft": [256, 512, 1024], "dpo": [128, 256, 512]},
}
# Guesses of a run's fixed cost (start to first step) and of one step at the ladder's first length, used only to
# reserve time for the runs still to come; replaced by what the first run of a stage measured.
GUESS = {"gpu": {"startup": {"sft": 75.0, "dpo": 110.0}, "step": {"sft": 12.0, "dpo": 30.0}},
         "tiny": {"startup": {"sft": 15.0, "dpo": 20.0}, "step": {"sft": 1.0, "dpo": 2.0}}}
SHARE = {("sft", "ours"): 3.0, ("dpo", "ours"): 2.5, ("sft", "trl"): 1.5, ("dpo", "trl"): 1.0}  # of the slack


def ds_config(cuda: bool, cpu_adam: bool, fp32_master: bool) -> dict:
    """ZeRO-3, optimizer offloaded to host memory. With DeepSpeedCPUAdam (built from the config's optimizer section)
    the master weights, gradients and Adam moments there are bf16 like the model (16 bytes per parameter would be
    ~120 GiB of host memory for 8B); without it (it did not build), torch's AdamW on fp32 master weights."""
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "steps_per_print": 10**9,
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": cuda},
                                 "contiguous_gradients": True, "overlap_comm": False},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
           "bf16": {"enabled": "auto"}}
    if not cpu_adam:
        cfg["optimizer"]["params"]["torch_adam"] = True
        cfg["zero_force_ds_cpu_optimizer"] = False
    elif cuda and not fp32_master:
        cfg["bf16"] |= {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return cfg


def host_bytes_per_param(cpu_adam: bool, fp32_master: bool) -> int:
    """Host memory of the offloaded optimizer per parameter: master weights, gradients, two Adam moments."""
    return 8 if cpu_adam and not fp32_master else 16


def host_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


class Budget:
    """Wall time left, and the deadline of the next run: its share of what the later runs do not need."""

    def __init__(self, total_s: float, start: float | None = None):
        self.start, self.total = start if start is not None else time.time(), total_s

    def left(self, now: float | None = None) -> float:
        return self.total - ((now if now is not None else time.time()) - self.start)

    def deadline(self, need_now: float, later_needs: list[float], share: float, later_shares: list[float],
                 now: float | None = None) -> float | None:
        """Absolute time by which this run should end, or None if even its minimum `need_now` does not fit."""
        now = now if now is not None else time.time()
        slack = self.left(now) - need_now - sum(later_needs)
        if slack < 0:
            # later runs cannot all fit anyway: this one (more important) still runs if its minimum fits
            return now + need_now if self.left(now) >= need_now else None
        return now + need_now + slack * share / (share + sum(later_shares))


def verdict(measured: int | None, extrapolated: int | None, goal: int) -> str:
    if measured and measured >= goal:
        return f"met: {measured} tokens measured"
    if extrapolated and extrapolated >= goal:
        return f"extrapolated only: the straight-line fit gives {extrapolated} >= {goal} (longest measured {measured})"
    return f"not met: longest measured {measured}, extrapolated {extrapolated} < {goal}"


def summarize(results: list[dict], cap_gb: float, host_cap_gb: float | None, modes: list[str]) -> dict:
    ours = modes[1]
    out: dict = {"cap_gb": round(cap_gb, 1), "host_cap_gb": host_cap_gb and round(host_cap_gb, 1)}
    for stage in GOALS:
        for mode in modes:
            ok = sorted((r for r in results if r["stage"] == stage and r["mode"] == mode and "error" not in r),
                        key=lambda r: r["length"])
            if not ok and not any(r["stage"] == stage and r["mode"] == mode for r in results):
                continue
            gpu_fit = B.fit_max_length([(r["length"], r["peak_gb"]) for r in ok], cap_gb)
            host_fit = B.fit_max_length([(r["length"], r["host_peak_gb"]) for r in ok], host_cap_gb) \
                if host_cap_gb else None
            both = [x for x in (gpu_fit, host_fit) if x]
            errors = {r["length"]: r["error"] for r in results if r["stage"] == stage and r["mode"] == mode
                      and "error" in r}
            out[f"{stage}/{mode}"] = {
                "longest_measured": ok[-1]["length"] if ok else None,
                "measured_lengths": [r["length"] for r in ok],
                "failed": errors,
                "extrapolated_max_length": min(both) if both else None,
                "extrapolated_gpu_limit": gpu_fit, "extrapolated_host_limit": host_fit,
                "extrapolated_at_80gb": B.fit_max_length([(r["length"], r["peak_gb"]) for r in ok], 80.0 - 2.0),
                "note": f"extrapolated = straight line through the {len(ok)} measured peaks, to the GPU cap and to "
                        "host memory, the lower; NOT a measurement" if len(ok) > 1 else "fewer than 2 points: no fit"}
        mine = out.get(f"{stage}/{ours}", {})
        out[f"{stage}/goal"] = verdict(mine.get("longest_measured"), mine.get("extrapolated_max_length"),
                                       GOALS[stage])
        base = {r["length"]: r for r in results if r["stage"] == stage and r["mode"] == "trl" and "error" not in r}
        ratios = {r["length"]: round(r["step_s"] / base[r["length"]]["step_s"], 3) for r in results
                  if r["stage"] == stage and r["mode"] == ours and "error" not in r and r["length"] in base}
        out[f"{stage}/step_time_ours_vs_trl"] = ratios
        out[f"{stage}/tokens_per_s"] = {f"{r['mode']}@{r['length']}": round(r["tokens_per_s"]) for r in results
                                        if r["stage"] == stage and "error" not in r and r["length"] in ratios}
        if ratios:
            top = max(ratios)
            out[f"{stage}/step_time_goal"] = (f"{'met' if ratios[top] <= STEP_RATIO_GOAL else 'not met'}: "
                                              f"{ratios[top]}x TRL at {top} tokens (goal <= {STEP_RATIO_GOAL}x)")
    sft = out.get(f"sft/{ours}", {})
    out["vs_alst"] = (f"ALST (published): {ALST_SFT} tokens SFT, Llama-8B, one H100 80GB (its host had far more "
                      f"memory). Ours here: {sft.get('longest_measured')} measured, "
                      f"{sft.get('extrapolated_max_length')} extrapolated on this GPU and host, "
                      f"{sft.get('extrapolated_at_80gb')} extrapolated to 78 GB of GPU memory")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 540; --tiny: 170)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer tiny Llama, tiny lengths")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else outputs/gpu_longctx_8b)")
    p.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--checkpoint-offload", action="store_true",
                   help="ours with checkpoint_offload (the activation checkpoints in host memory)")
    p.add_argument("--cap-gb", type=float, default=None,
                   help="GPU memory cap for the fit (default: the GPU's memory less 2 GB for context and allocator)")
    p.add_argument("--host-cap-gb", type=float, default=None, help="host memory cap (default: MemTotal less 8 GB)")
    p.add_argument("--fp32-master", action="store_true",
                   help="fp32 master weights and Adam moments on the host (16 bytes per parameter: ~120 GiB for 8B)")
    p.add_argument("--torch-adam", action="store_true", help="skip DeepSpeedCPUAdam: torch's AdamW on the host")
    a = p.parse_args()

    kind = "tiny" if a.tiny else "gpu"
    device = "cpu" if a.tiny else "cuda"
    budget = Budget(a.budget_s or (170.0 if a.tiny else 540.0))
    out = Path(a.out or os.environ.get("OUT") or "outputs/gpu_longctx_8b") / "gpu_longctx_8b"
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # a ladder reuses one allocator
    if a.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not _cuda_visible():
        sys.exit("gpu_longctx_8b: no CUDA device (nvidia-smi found none); --tiny runs the CPU smoke test")
    preset = "tiny-2l" if a.tiny else "llama8b"
    geometry = B.PRESETS[preset]
    modes = ["trl", "ours_offload" if a.checkpoint_offload else "ours"]

    # DeepSpeedCPUAdam is a C++ extension built at first use (about a minute): build it once, in its own process
    # (no CUDA context in this one), before the timed runs; if it fails, torch's AdamW takes the host.
    t0 = time.time()
    cpu_adam, build_error = not a.torch_adam, None
    if cpu_adam:
        rc, text = _run_group([sys.executable, "-c", "from deepspeed.ops.op_builder import CPUAdamBuilder; "
                               "CPUAdamBuilder().load()"], timeout=max(30, min(300, budget.left() - 60)))
        cpu_adam = rc == 0
        build_error = None if cpu_adam else text.strip()[-1500:] or f"exit {rc}"
    print(f"DeepSpeedCPUAdam: {'built' if cpu_adam else 'NOT available: ' + str(build_error)[-300:]} "
        f"({time.time() - t0:.0f} s)", flush=True)
    ds = ds_config(not a.tiny, cpu_adam, a.fp32_master)
    host_cap = a.host_cap_gb or ((host_total_gb() or 0) - 8.0) or None
    params = B.n_params(geometry)
    optimizer_host_gb = params * host_bytes_per_param(cpu_adam, a.fp32_master and not a.tiny) / 2**30

    tok_dir = tempfile.mkdtemp(prefix="gpu_longctx_8b_tok_")
    from pipeline.tiny import TinyModelSpec, train_tokenizer

    train_tokenizer(TinyModelSpec(vocab_size=400, max_position_embeddings=1 << 20)).save_pretrained(tok_dir)
    runs = [(stage, mode) for mode in reversed(modes) for stage in ("sft", "dpo") if stage in a.stages]  # ours first
    results: list[dict] = []
    notes: list[str] = []
    if build_error:
        notes.append("DeepSpeedCPUAdam did not build: the offloaded optimizer is torch's AdamW with fp32 master "
                     f"weights ({optimizer_host_gb:.0f} GiB of host memory for the optimizer); error: "
                     f"{build_error[-300:]}")
    if host_cap and optimizer_host_gb > host_cap:
        notes.append(f"the offloaded optimizer needs ~{optimizer_host_gb:.0f} GiB of host memory, over the host cap "
                     f"{host_cap:.0f} GiB: expect the runs to be killed for host memory")
    cap = a.cap_gb or (4.0 if a.tiny else None)  # CPU: peak RSS against a 4 GB cap, as bench_longctx
    measured_startup: dict[str, float] = {}

    def need(stage: str) -> float:  # a run's minimum: start-up, the warm-up step and one timed step at the first length
        g = GUESS[kind]
        return measured_startup.get(stage, g["startup"][stage] + 2 * g["step"][stage]) + 10.0

    def save() -> None:
        meta = dict(command=" ".join(["python"] + sys.argv), device=device, preset=preset, geometry=geometry,
                    n_params=params, tile_tokens=geometry["hidden_size"], modes=modes, deepspeed=ds,
                    cpu_adam=cpu_adam, optimizer_host_gib_estimate=round(optimizer_host_gb, 1),
                    budget_s=budget.total, elapsed_s=round(budget.total - budget.left()), notes=notes,
                    versions=B.versions(), memory="GPU: torch.cuda.max_memory_allocated per step (CPU: peak RSS); "
                    "host_peak_gb: the child's peak RSS (pinned offload buffers included)")
        B.write(out, meta, results, a.stages, modes, cap or 1.0)  # per-mode fits, ratios vs TRL, the plot
        data = json.loads(out.with_suffix(".json").read_text())
        data["goals"] = summarize(results, cap or 1.0, host_cap, modes)
        from pipeline.io import atomic_write_json

        atomic_write_json(out.with_suffix(".json"), data)

    for i, (stage, mode) in enumerate(runs):
        later = runs[i + 1:]
        deadline = budget.deadline(need(stage), [need(s) for s, _ in later], SHARE[(stage, mode.split("_")[0])],
                                   [SHARE[(s, m.split("_")[0])] for s, m in later])
        if deadline is None:
            notes.append(f"{stage}/{mode}: skipped, {budget.left():.0f} s of the budget left, it needs ~"
                         f"{need(stage):.0f} s")
            print(notes[-1], flush=True)
            continue
        spec = dict(stage=stage, mode=mode, device=device, preset=preset, tile_tokens=geometry["hidden_size"],
                    tokenizer=tok_dir, sp=1, ladder=LADDERS[kind][stage], deadline=deadline, deepspeed=ds)
        print(f"{stage}/{mode}: ladder {spec['ladder']}, until {deadline - budget.start:.0f} s of "
            f"{budget.total:.0f}", flush=True)
        started = time.time()
        # hard stop: a step in flight past the deadline (a bad guess) is killed at the budget's end
        records, error, tail = B.launch(spec, timeout=max(10.0, budget.left() - 5))
        rows = records[0]["ladder"] if records else []
        if rows and rows[0].get("startup_s") is not None and stage not in measured_startup:
            measured_startup[stage] = rows[0]["startup_s"] + rows[0]["first_step_s"] + rows[0]["step_s"]
        done = {r["length"] for r in rows}
        results.extend(rows)
        nxt = next((n for n in spec["ladder"] if n not in done), None)
        if error and nxt is not None:  # the length that was running when it failed
            results.append(dict(stage=stage, mode=mode, device=device, preset=preset, length=nxt, error=error,
                                **({"log_tail": tail[-2000:]} if error != "out of memory" else {})))
        elif nxt is not None:
            notes.append(f"{stage}/{mode}: stopped before {nxt} tokens, its predicted step would overrun this run's "
                         "share of the budget")
        cap = cap or next((r["gpu_total_gb"] - 2.0 for r in rows if "gpu_total_gb" in r), None)
        for r in rows:
            print(f"  {r['length']:>7} tokens: peak {r['peak_gb']:.2f} GB, host {r['host_peak_gb']:.1f} GB, "
                f"{r['step_s']:.2f} s/step, {r['tokens_per_s']:.0f} tok/s", flush=True)
        if error:
            print(f"  {nxt}: {error}", flush=True)
        print(f"  ({time.time() - started:.0f} s)", flush=True)
        save()
    if not a.tiny and cap is None:
        cap = 80.0 - 2.0
        notes.append("no run reported the GPU's memory: the fit's cap is 78 GB")
    save()
    data = json.loads(out.with_suffix(".json").read_text())
    print(json.dumps({"notes": notes, **data["goals"]}, indent=1))
    print(f"wrote {out.with_suffix('.json')} and .png in {budget.total - budget.left():.0f} s")


def _run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run `cmd` in its own process group; on a timeout kill the whole group (a JIT build's ninja and compilers
    too) and remove the build lock it left, which would make every later load wait forever."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), proc.stdout.read()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        lock = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "cpu_adam" / "lock"
        if lock.exists() and lock.stat().st_mtime >= start:
            lock.unlink()
        return None, f"timed out after {timeout:.0f} s"


def _cuda_visible() -> bool:
    """Whether a CUDA device exists, asked of nvidia-smi: this process stays without a CUDA context (GPU memory)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    main()

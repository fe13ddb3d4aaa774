"""Peak memory and step time of one SFT and one DPO step vs sequence length: TRL 1.16 defaults vs ours.

    python scripts/bench_longctx.py                                   # CPU, ~10 min on 2 shared cores
    python scripts/bench_longctx.py --device cuda --preset llama8b-4l --lengths 16384 32768 65536 131072 \
        --cap-gb 80 --out benchmarks/longctx_h100

Every configuration runs in its own child process (`--steps` optimizer steps, default 2, on a model built from a
config: no download), which reports its peak memory (CPU: peak RSS of the process; CUDA:
torch.cuda.max_memory_allocated) and the median time of the steps after the first; the modes run interleaved per
length. "trl" is TRL's SFTTrainer / DPOTrainer with its defaults (activation checkpointing, chunked fused
LM head, padded rows); "ours" adds the long-context switches at their defaults (tiled MLP in tiles of --tile-tokens,
lean RMSNorm, the LM head's vocabulary in chunks of --tile-tokens instead of TRL's 32768, padding-free rows incl.
DPO); "ours_offload" also offloads the activation checkpoints to host memory (CUDA only); "ours_sp2" shards every
sequence over 2 processes (torchrun, DDP; memory is per process); "ours_z3sp2" does so under DeepSpeed ZeRO-3, which
also shards the weights, gradients and optimizer state over the 2 processes (accelerate_configs/zero3.yaml's settings,
with DeepSpeed's live-parameter budget scaled to the model as an 8B model sees the default: `zero3_config`).
`--ours KEY=VALUE` changes a switch of the ours* modes (an ablation).
A DPO "length" is the length of each of the chosen and rejected sequences (prompt = half of it).
The longest sequence under `--cap-gb` comes from a straight-line fit of peak memory vs length (attention here is
SDPA/flash, so memory is linear in length) over the measured lengths; it is marked as extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.time()  # a child's start, near enough (its heavy imports come later)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("trl", "ours", "ours_offload", "ours_sp2", "ours_z3sp2")
SP2 = ("ours_sp2", "ours_z3sp2")  # the modes that run on 2 processes
PRESETS = {  # realistic widths and vocabularies, few layers (memory per layer is what the switches change)
    # Qwen2-0.5B's width (hidden 896, MLP 4864, 14/2 heads), one layer: with checkpointing, the per-layer peak
    # (what the switches change) is that of one layer anyway, and 2 shared CPU cores allow no more.
    "qwen2-0.5b-1l": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                          num_hidden_layers=1, vocab_size=32000),
    "llama8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=4, vocab_size=128256),
    # the whole Llama-3.1-8B architecture (8.03B parameters; scripts/gpu_longctx_8b.py, under ZeRO-3 + offload)
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0),
    # a CPU smoke test of the paths above (gpu_longctx_8b.py --tiny)
    "tiny-2l": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=512),
}


# ------------------------------------------------------------------------------------------------ child


def child(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from pipeline.longctx import LongContextArguments, long_context_trainer

    cuda = spec["device"] == "cuda"
    if cuda:  # one GPU per process under torchrun (ours_sp2)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    bf16 = spec.get("bf16", cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    # "ladder": one optimizer step per length, ascending, the first length twice (its first step warms up), each
    # step's peak memory and time recorded: one process start (8B under ZeRO-3: about a minute) for many lengths.
    ladder = spec.get("ladder")
    lengths = [ladder[0], *ladder] if ladder else [spec["length"]] * spec.get("steps", 2)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = LlamaConfig(**PRESETS[spec["preset"]], max_position_embeddings=max(max(lengths) * 2, 4096),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         attn_implementation="sdpa")

    def model():
        torch.manual_seed(0)
        with torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    # Digits tokenize one per token, so a string of n digits is n tokens.
    rng = torch.Generator().manual_seed(0)
    digits = lambda n: "".join(map(str, torch.randint(0, 10, (n,), generator=rng).tolist()))  # noqa: E731
    stage, mode = spec["stage"], spec["mode"]
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=len(lengths), per_device_train_batch_size=1,
                  learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none", max_length=None,
                  bf16=bf16, use_cpu=not cuda, padding_free=mode != "trl", disable_tqdm=True, dataloader_num_workers=0,
                  train_sampling_strategy="sequential",  # the ladder's order
                  # a DeepSpeed config dict (ZeRO-3 + optimizer offload): the model below is then built under
                  # zero.Init, as the TrainingArguments that carry it exist first
                  **({"deepspeed": spec["deepspeed"]} if spec.get("deepspeed") else {}))
    if stage == "sft":
        rows = [{"prompt": digits(n // 2), "completion": digits(n - n // 2 - 1)} for n in lengths]
        args, cls, extra = SFTConfig(**common), SFTTrainer, {}
    else:
        rows = [{"prompt": digits(n // 2), "chosen": digits(n - n // 2 - 1), "rejected": digits(n - n // 2 - 1)}
                for n in lengths]
        # LoRA: the reference is the base with the adapter disabled (no second model)
        args, cls, extra = DPOConfig(**common), DPOTrainer, {} if spec.get("lora") else {"ref_model": model()}
    if spec.get("lora"):  # the 8B long-context recipes' setting: frozen base, no full gradients or optimizer state
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if mode != "trl":
        # "ours": every memory switch on (the switches are opt-in; "trl" is TRL's own trainer class)
        lc = dict(tiled_mlp=True, lean_rmsnorm=True, tiled_mlp_tile_tokens=spec["tile_tokens"],
                  loss_vocab_chunk=spec["tile_tokens"], checkpoint_offload=mode == "ours_offload",
                  sequence_parallel_size=spec.get("sp", 1), gradient_as_bucket_view=mode != "ours_z3sp2")
        overrides = dict(spec.get("ours_overrides") or {})
        args.padding_free = overrides.pop("padding_free", args.padding_free)
        cls = long_context_trainer(cls, LongContextArguments(**(lc | overrides)), args)
    assert args.gradient_checkpointing, "TRL's default is activation checkpointing on"

    times, peaks, hosts = [], [], []
    host_gb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # noqa: E731
    gpu = dict(gpu_name=torch.cuda.get_device_name(), gpu_total_gb=torch.cuda.get_device_properties(0).total_memory
               / 2**30) if cuda else {}

    first_begin = None

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            nonlocal first_begin
            first_begin = first_begin or time.time()
            if cuda:
                torch.cuda.synchronize()
                if ladder:
                    torch.cuda.reset_peak_memory_stats()
            times.append(-time.perf_counter())

        def on_step_end(self, args_, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1] += time.perf_counter()
            if not ladder:
                return
            peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else host_gb())
            hosts.append(host_gb())
            rows_ = ladder_results(spec, lengths, times, peaks, hosts, gpu, round(first_begin - PROCESS_START, 1))
            write_rank_result({"ladder": rows_})  # after every step: an OOM or a kill later keeps these
            step = len(times)
            if step < len(lengths) and spec.get("deadline"):
                timed = [(r["length"], r["step_s"]) for r in rows_]
                if time.time() + predict_step_s(timed, lengths[step]) > spec["deadline"]:
                    control.should_training_stop = True  # the next length would overrun this run's share

    trainer = cls(model=model(), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  callbacks=[StepTimer()], **extra)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts here; ru_maxrss keeps the lifetime peak
    breakdown = cuda and spec.get("memory_breakdown")
    if breakdown:
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    trainer.train()
    if ladder:
        return {"ladder": ladder_results(spec, lengths, times, peaks, hosts, gpu,
                                         round(first_begin - PROCESS_START, 1) if times else None)}
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_peak = peak if cuda else vm_hwm()
    if breakdown:
        breakdown = peak_breakdown(torch.cuda.memory._snapshot(), baseline)
        torch.cuda.memory._record_memory_history(enabled=None)
    tokens = spec["length"] * (1 if stage == "sft" else 2)  # DPO: chosen + rejected
    step_s = statistics.median(times[1:])  # the first step also builds the optimizer state and warms up
    return {**spec, "peak_gb": peak / 2**30, "train_peak_gb": train_peak / 2**30 if train_peak else None,
            "step_s": step_s, "tokens_per_s": tokens / step_s,
            "steps": len(times), "step_times": times, "world_size": trainer.args.world_size,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
            **({"memory_breakdown": breakdown} if breakdown else {})}


def vm_hwm() -> int | None:
    """Bytes of this process' peak RSS since the last reset through /proc/self/clear_refs (Linux), else None."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def ladder_results(spec: dict, lengths: list[int], times: list[float], peaks: list[float], hosts: list[float],
                   gpu: dict, overhead_s: float | None) -> list[dict]:
    """One record per length of a ladder run so far. The first length ran twice: its peak is the larger of the two
    steps, its time the second's (the first also builds the optimizer state); every later step is already warm."""
    spec = {k: v for k, v in spec.items() if k not in ("ladder", "deadline", "deepspeed", "tokenizer", "result_dir")}
    per_token = 1 if spec["stage"] == "sft" else 2  # DPO: chosen + rejected
    out = []
    for i in range(1, len(times)):
        n = lengths[i]
        peak = max(peaks[:2]) if i == 1 else peaks[i]
        out.append({**spec, "length": n, "peak_gb": peak, "host_peak_gb": hosts[i], "step_s": times[i],
                    "tokens_per_s": n * per_token / times[i], **gpu,
                    # the fixed cost of a run: process start to the first step (imports, model, DeepSpeed init)
                    **({"first_step_s": times[0], "startup_s": overhead_s} if i == 1 else {})})
    return out


def predict_step_s(timed: list[tuple[int, float]], length: int, safety: float = 1.2) -> float:
    """A conservative guess of one step's time at `length` from the measured (length, step_s) points: a local power
    law through the last two lengths, its exponent clipped to [1, 2] (linear layers ... quadratic attention), or
    quadratic from a single point; times `safety`."""
    if not timed:
        return 0.0
    (l2, t2), exponent = timed[-1], 2.0
    if len(timed) > 1 and timed[-2][0] < l2:
        import math

        l1, t1 = timed[-2]
        exponent = min(2.0, max(1.0, math.log(max(t2, 1e-9) / max(t1, 1e-9)) / math.log(l2 / l1)))
    return safety * t2 * (length / l2) ** exponent


def write_rank_result(result: dict) -> None:
    from pipeline.io import atomic_write_json

    atomic_write_json(Path(os.environ["BENCH_RESULT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json", result)


def peak_breakdown(snapshot: dict, baseline: int, top: int = 25) -> dict:
    """What is live at the peak of a CUDA memory-history recording, grouped by the innermost allocating line of the
    pipeline, TRL, transformers or this script (diagnosis only: the recording slows the steps)."""
    import torch

    events = snapshot["device_traces"][torch.cuda.current_device()]
    total, best, at = 0, 0, -1
    for i, e in enumerate(events):  # pass 1: when is the peak (blocks freed but allocated before recording count)
        if e["action"] == "alloc":
            total += e["size"]
        elif e["action"] == "free_completed":
            total -= e["size"]
        if total > best:
            best, at = total, i
    live = {}
    for e in events[: at + 1]:  # pass 2: the blocks live at that moment
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    mine = ("/pipeline/", "/trl/", "/transformers/", "bench_longctx", "/peft/")
    groups: dict[str, int] = {}
    for e in live.values():
        frame = next((f for f in e.get("frames", []) if any(m in f["filename"] for m in mine)), None)
        where = "(no python frame)" if frame is None else \
            f"{'/'.join(frame['filename'].split('/')[-2:])}:{frame['line']} {frame['name']}"
        groups[where] = groups.get(where, 0) + e["size"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    return {"peak_gb": round((baseline + best) / 2**30, 3), "before_recording_gb": round(baseline / 2**30, 3),
            "peak_event": at, "events": len(events),
            "live_at_peak_gb": {k: round(v / 2**30, 3) for k, v in ranked[:top]},
            "other_gb": round(sum(v for _, v in ranked[top:]) / 2**30, 3)}


def saved_activations(spec: dict) -> dict:
    """Bytes of the tensors autograd saves in one forward with the long-context switches (no checkpointing, so all
    of them; parameters excluded), per rank: what sequence parallelism divides, without allocator noise."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.longctx.fused_forward import wrap_fused_forward
    from pipeline.longctx.tiled_mlp import patch_tiled_mlp
    from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION

    group = None
    if spec["sp"] > 1:
        dist.init_process_group("gloo")
        group = dist.new_group(list(range(spec["sp"])))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS[spec["preset"]], attn_implementation="sdpa",
                                                         max_position_embeddings=max(spec["length"], 4096)))
    add_fused_lm_head(model)
    patch_tiled_mlp(model, spec["tile_tokens"])
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    wrap_fused_forward(model, pack=False, sp_group=group)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, PRESETS[spec["preset"]]["vocab_size"], (1, spec["length"]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False)
    mb = sum(seen.values()) / 2**20
    return {**spec, "saved_mb": mb, "saved_kb_per_token": mb * 1024 / spec["length"]}


# ------------------------------------------------------------------------------------------------ parent


def launch(spec: dict, timeout: float, glibc_malloc: bool = False) -> tuple[list[dict], str | None, str]:
    """Run `child(spec)` in a fresh process (torchrun for SP and DeepSpeed); -> (the results its ranks wrote, an
    error or None, the tail of its stderr). On a timeout the whole process group is killed, so no worker lingers
    with GPU memory into the next configuration."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if spec["device"] == "cpu":  # DeepSpeed (ours_z3sp2) on the CPU; its op compiles once into the cache
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    if not glibc_malloc:
        # glibc otherwise raises its mmap threshold as large blocks are freed and keeps them in the heap, so peak
        # RSS would count memory already freed; a fixed threshold returns large blocks at once (RSS ~ live tensors)
        env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")
    launcher = [sys.executable]
    if spec["mode"] == "ours_z3sp2":
        launcher += ["-m", "accelerate.commands.launch", "--config_file", zero3_config(spec["preset"]),
                     "--num_processes", str(spec["sp"])]
    elif spec.get("sp", 1) > 1 or spec.get("deepspeed"):  # DeepSpeed wants torch.distributed's env, even for 1 process
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.get("sp", 1))]
    start = time.time()
    result_dir = Path(tempfile.mkdtemp(prefix="bench_longctx_result_"))  # one file per rank: stdout lines interleave
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(launcher + [__file__, "--child", json.dumps({**spec, "result_dir": str(result_dir)})],
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            rc, error = proc.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc, error = proc.wait(), f"timeout after {timeout:.0f} s"
        out.seek(0)
        log = out.read()
    results = [json.loads(f.read_text()) for f in sorted(result_dir.glob("rank*.json"))]
    if error is None and (rc or not results):
        lines = log.strip().splitlines() or ["?"]
        # the worker's own exception, not torchrun's summary after it
        tail = [ln for ln in lines if "Error" in ln and "ChildFailedError" not in ln] or lines
        oom = "out of memory" in log.lower() or rc in (-9, 137)
        error = "out of memory" if oom else tail[-1][-300:]
    return results, error, log[-12000:]


def n_params(geometry: dict) -> int:
    """Parameters of a Llama of this geometry with untied embeddings."""
    h, i, v, n = (geometry[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    kv = h // geometry["num_attention_heads"] * geometry["num_key_value_heads"]
    return 2 * v * h + h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def zero3_config(preset: str) -> str:
    """accelerate_configs/zero3.yaml's settings, with DeepSpeed's live-parameter budget (stage3_max_live_parameters /
    _reuse_distance, 1e9 by default) scaled to this model as an 8B model sees the default: a model smaller than the
    budget would otherwise stay gathered whole through the step, which no 8B run does."""
    budget = max(1, round(1e9 * n_params(PRESETS[preset]) / 8.03e9))
    folder = Path(tempfile.mkdtemp(prefix="bench_longctx_zero3_"))
    ds = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": budget, "stage3_max_reuse_distance": budget,
                                "stage3_gather_16bit_weights_on_model_save": True,
                                # accelerate sizes these from the hidden size, as it does for zero3.yaml
                                "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"},
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    (folder / "ds.json").write_text(json.dumps(ds))
    (folder / "accelerate.yaml").write_text(json.dumps({  # JSON is YAML
        "distributed_type": "DEEPSPEED", "compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
        "rdzv_backend": "static", "same_network": True, "use_cpu": False, "main_training_function": "main",
        "deepspeed_config": {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": True}}))
    return str(folder / "accelerate.yaml")


def run_config(spec: dict, timeout: int, glibc_malloc: bool = False) -> dict:
    start = time.time()
    results, error, _ = launch(spec, timeout, glibc_malloc)
    if error:
        return {**spec, "error": error}
    if spec.get("saved"):
        return max(results, key=lambda r: r["saved_mb"])  # the worse rank
    if spec.get("fit_peak") == "train":  # the training steps' peak is the one compared and fitted
        for r in results:
            r["process_peak_gb"], r["peak_gb"] = r["peak_gb"], r.get("train_peak_gb") or r["peak_gb"]
    # With SP, memory and time are those of the worst rank.
    best = max(results, key=lambda r: r["peak_gb"])
    step_s = max(r["step_s"] for r in results)
    return {**best, "step_s": step_s, "tokens_per_s": best["tokens_per_s"] * best["step_s"] / step_s,
            "wall_s": round(time.time() - start, 1)}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of peak memory vs length."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def fit_max_length(points: list[tuple[int, float]], cap_gb: float) -> int | None:
    """Longest length whose fitted peak memory (least squares line over the points) stays under the cap."""
    line = fit_line(points)
    return int((cap_gb - line[1]) / line[0]) if line and line[0] > 0 else None


def plot(results: list[dict], out: Path, cap_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("sft", "dpo") if any(r["stage"] == s for r in results)]
    fig, axes = plt.subplots(2, len(stages), figsize=(5.5 * len(stages), 7.5), squeeze=False)
    for col, stage in enumerate(stages):
        for mode, style in (("trl", "o-"), ("ours", "s-"), ("ours_offload", "d-"), ("ours_sp2", "^--"),
                            ("ours_z3sp2", "v--")):
            pts = sorted((r["length"], r) for r in results if r["stage"] == stage and r["mode"] == mode
                         and "error" not in r)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [r["peak_gb"] for _, r in pts], style, label=mode)
            axes[1][col].plot(xs, [r["step_s"] for _, r in pts], style, label=mode)
        ooms = sorted(r["length"] for r in results if r["stage"] == stage and r.get("error") == "out of memory")
        if ooms:
            axes[0][col].plot(ooms, [cap_gb] * len(ooms), "kx", ms=9, label="out of memory (any mode)")
        axes[0][col].axhline(cap_gb, color="grey", lw=0.8, ls=":", label=f"cap {cap_gb:g} GB")
        axes[0][col].set_title(f"{stage.upper()}: peak memory per process (GB)")
        axes[1][col].set_title(f"{stage.upper()}: step time (s)")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("sequence length (tokens)")
            axes[row][col].legend()
            axes[row][col].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: qwen2-0.5b-1l (cpu), llama8b-4l (cuda)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--modes", nargs="+", default=["trl", "ours"], choices=list(MODES))
    p.add_argument("--tile-tokens", type=int, default=None,
                   help="tokens per tiled-MLP (and RMSNorm) tile and vocabulary columns per LM-head chunk; default: "
                        "the hidden size (ALST's rule)")
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap for the longest-sequence estimate")
    p.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    p.add_argument("--fit-peak", default="process", choices=["process", "train"],
                   help="CPU: the peak RSS compared and fitted: of the whole child process (default), or of the "
                        "training steps only (model and DeepSpeed initialisation excluded; both are recorded)")
    p.add_argument("--steps", type=int, default=2,
                   help="optimizer steps per configuration; step time = median of all but the first")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 16, all linear layers) on a frozen base")
    p.add_argument("--out", default="benchmarks/longctx")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="keep glibc's default (dynamic) mmap threshold: peak RSS then also counts freed blocks "
                        "glibc keeps (how runs before the fixed threshold measured)")
    p.add_argument("--saved-activations", action="store_true",
                   help="instead of training steps: bytes autograd saves in one forward, per rank (ours, ours_sp2)")
    p.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override long-context switches of the ours* modes (LongContextArguments keys, or "
                        "padding_free), e.g. --ours tiled_mlp=false: an ablation")
    p.add_argument("--memory-breakdown", action="store_true",
                   help="CUDA: record allocations and report what is live at the peak, by allocating line (works "
                        "for trl; with our autograd functions torch 2.11's recorder fails inside Function.apply)")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the summary and plot of an existing --out JSON (e.g. for another --cap-gb)")
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        os.environ["BENCH_RESULT_DIR"] = spec.pop("result_dir")
        write_rank_result(saved_activations(spec) if spec.get("saved") else child(spec))
        return

    from pipeline.tiny import TinyModelSpec, train_tokenizer

    preset = a.preset or ("llama8b-4l" if a.device == "cuda" else "qwen2-0.5b-1l")
    cap = a.cap_gb or (80.0 if a.device == "cuda" else 4.0)
    tile = a.tile_tokens or PRESETS[preset]["hidden_size"]
    out = Path(a.out)
    start = time.time()
    if a.resummarize:
        previous = json.loads(out.with_suffix(".json").read_text())
        results, meta = previous["results"], previous["meta"]
        a.stages = sorted({r["stage"] for r in results}, reverse=True)
        a.modes = [m for m in MODES if any(r["mode"] == m for r in results)]
        write(out, meta | {"cap_gb": cap}, results, a.stages, a.modes, cap)
        print(json.dumps(json.loads(out.with_suffix(".json").read_text())["summary"], indent=1))
        return
    overrides = parse_overrides(a.ours)
    tok_dir = tempfile.mkdtemp(prefix="bench_longctx_tok_")
    train_tokenizer(TinyModelSpec(vocab_size=400, max_position_embeddings=1 << 20)).save_pretrained(tok_dir)
    results = []
    if a.saved_activations:
        for mode in [m for m in a.modes if m in ("ours", "ours_sp2")]:
            for length in a.lengths:
                spec = dict(mode=mode, length=length, device="cpu", preset=preset, tile_tokens=tile,
                            sp=2 if mode == "ours_sp2" else 1, saved=True)
                results.append(run_config(spec, a.timeout))
                print(json.dumps(results[-1]), flush=True)
        from pipeline.io import atomic_write_json

        atomic_write_json(out.with_suffix(".json"), {"meta": dict(command=" ".join(["python"] + sys.argv),
                          preset=preset, geometry=PRESETS[preset], tile_tokens=tile, versions=versions(),
                          memory="bytes of the tensors autograd saves in one forward, parameters excluded, per rank"),
                          "results": results})
        return
    for stage in a.stages:
        for length in a.lengths:
            for mode in a.modes:  # modes interleaved per length: a change in the machine's load hits them alike
                spec = dict(stage=stage, mode=mode, length=length, device=a.device, preset=preset, tile_tokens=tile,
                            tokenizer=tok_dir, sp=2 if mode in SP2 else 1, steps=a.steps, lora=a.lora,
                            fit_peak=a.fit_peak,
                            **({"ours_overrides": overrides} if overrides and mode != "trl" else {}),
                            **({"memory_breakdown": True} if a.memory_breakdown else {}))
                r = run_config(spec, a.timeout, a.glibc_malloc)
                r.pop("tokenizer", None)
                results.append(r)
                print(json.dumps(r), flush=True)
                meta = dict(command=" ".join(["python"] + sys.argv), device=a.device, preset=preset,
                            geometry=PRESETS[preset], tile_tokens=tile, cap_gb=cap, total_s=round(time.time() - start),
                            versions=versions(),
                            memory=("peak RSS of the child process" +
                                    (" during the training steps (VmHWM reset before train(); peak over the whole "
                                     "process: process_peak_gb)" if a.fit_peak == "train" else "") + (" (glibc's default mmap threshold)" if a.glibc_malloc
                                                                         else " (mmap threshold fixed at 64 KB)"))
                            if a.device == "cpu"
                            else "torch.cuda.max_memory_allocated")
                write(out, meta, results, a.stages, a.modes, cap)  # after every configuration: partial runs count


def parse_overrides(items: list[str]) -> dict:
    """--ours KEY=VALUE pairs -> the LongContextArguments (or padding_free) values they set, checked by the recipes'
    strict parser (an unknown key, a bad value: one-line exit)."""
    import dataclasses

    from pipeline.config import RecipeError, parse
    from pipeline.longctx import LongContextArguments

    @dataclasses.dataclass
    class Packing:  # TRL's key, set on the trainer's config rather than on LongContextArguments
        padding_free: bool = False

    argv = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--ours {item!r}: expected KEY=VALUE")
        argv += [f"--{key}", value]
    try:
        return parse([LongContextArguments, Packing], argv)[1]
    except RecipeError as e:
        sys.exit(f"--ours: {e}")


def versions() -> dict:
    import torch
    import transformers
    import trl

    return dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__)


def write(out: Path, meta: dict, results: list[dict], stages, modes, cap: float) -> None:
    from pipeline.io import atomic_write_json

    summary = {}
    for stage in stages:
        for mode in modes:
            pts = [(r["length"], r["peak_gb"]) for r in results
                   if r["stage"] == stage and r["mode"] == mode and "error" not in r]
            line = fit_line(pts)
            summary[f"{stage}/{mode}"] = {"max_length_under_cap_fit": fit_max_length(pts, cap),
                                          "fit_gb_per_1k_tokens": round(line[0] * 1000, 4) if line else None,
                                          "fit_gb_at_0": round(line[1], 3) if line else None}
        # Every other mode against TRL's defaults, and the extra switches (offload, SP) against plain "ours".
        for ref in ("trl", "ours"):
            base = {r["length"]: r for r in results if r["stage"] == stage and r["mode"] == ref and "error" not in r}
            for r in results:
                if (r["stage"] == stage and r["mode"] not in ("trl", ref) and "error" not in r
                        and r["length"] in base):
                    b = base[r["length"]]
                    r[f"peak_ratio_vs_{ref}"] = round(r["peak_gb"] / b["peak_gb"], 3)
                    r[f"step_time_ratio_vs_{ref}"] = round(r["step_s"] / b["step_s"], 3)
            ref_max = summary.get(f"{stage}/{ref}", {}).get("max_length_under_cap_fit")
            for mode in modes:
                mode_max = summary[f"{stage}/{mode}"]["max_length_under_cap_fit"]
                if mode not in ("trl", ref) and ref_max and mode_max:
                    summary[f"{stage}/{mode}"][f"max_length_ratio_vs_{ref}"] = round(mode_max / ref_max, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "summary": summary, "results": results})
    try:
        plot(results, out, cap)
    except ImportError:  # e.g. a GPU box without matplotlib: re-plot later with --resummarize
        pass


if __name__ == "__main__":
    main()

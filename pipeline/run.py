"""Run a staged recipe: stages in order, each one's output feeding the next, finished stages skipped.

    python -m pipeline.run --config recipes/tiny/pipeline.yaml
    python -m pipeline.run --config recipes/tiny/pipeline.yaml --rerun sft     # sft and every later stage

Each stage runs as its own process (`python -m <module>` or `accelerate launch`), logging to
`<output_dir>/logs/<stage>.log`. A `python` stage's process is forked from a server that imported torch,
transformers, peft and trl's trainers once (multiprocessing's fork server; `preload: false` starts a fresh
interpreter instead): a stage's own work is the same, without its ~5 s of imports. A stage is done when its
`stage_result.json` exists and its recipe is unchanged; a killed run picks up where it stopped (stages resume from
their own checkpoints). The report (`<output_dir>/report.md`) gathers every stage's metrics. Neighbouring stages
with the same `parallel: <label>` run at the same time, the threads of OMP_NUM_THREADS (default: every core) shared
out between them; they must not read each other's outputs. `nice: <0-19>` lowers a stage's CPU priority, so the
longest stage of a group can keep a core while the others share what is left.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from pipeline.config import RecipeError, cli, load_yaml, parse
from pipeline.io import atomic_write_json, atomic_write_text, read_stage_result

console = Console(highlight=False, soft_wrap=True)  # a message is one line, also when not on a terminal


@dataclasses.dataclass
class Stage:
    name: str
    module: str
    config: str
    args: dict = dataclasses.field(default_factory=dict)
    launcher: str = "python"  # or "accelerate"
    accelerate_config: str | None = None
    num_processes: int | None = None
    # Neighbouring stages with the same label run at the same time, the CPU threads shared out between them
    # (a tiny model's decoding gains little from a second thread; two processes keep both cores busy).
    parallel: str | None = None
    # Niceness of the stage's processes (0-19). In a parallel group the OS shares the cores equally between the
    # stages; a higher value for the stages beside the longest one lets that one run at full speed, so the group ends
    # sooner. It changes no result, so it is not part of the fingerprint.
    nice: int = 0


@dataclasses.dataclass
class PipelineRecipe:
    name: str = "pipeline"
    output_dir: str = "outputs/pipeline"
    stages: list[dict] = dataclasses.field(default_factory=list)
    env: dict = dataclasses.field(default_factory=dict, metadata={"help": "Environment for every stage."})
    rerun: list[str] = dataclasses.field(default_factory=list, metadata={"help": "Stages to redo (and all later)."})
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "Print the stage commands and exit."})
    preload: bool = dataclasses.field(default=True, metadata={
        "help": "Fork `python` stages from a server that imported torch, transformers, peft and trl's trainers once "
                "(~5 s less per stage); false: a fresh `python -m` process each. Same results either way."})


def load_stages(recipe: PipelineRecipe, source: str) -> list[Stage]:
    stages, names = [], set()
    valid = [f.name for f in dataclasses.fields(Stage)]
    for i, raw in enumerate(recipe.stages):
        if not isinstance(raw, dict):
            raise RecipeError(f"{source}: stages[{i}] must be a mapping")
        for key in raw:
            if key not in valid:
                raise RecipeError(f"{source}: unknown key 'stages[{i}].{key}' (valid: {', '.join(valid)})")
        try:
            stage = Stage(**raw)
        except TypeError:
            raise RecipeError(f"{source}: stages[{i}] needs 'name', 'module' and 'config'") from None
        if stage.name in names:
            raise RecipeError(f"{source}: stages[{i}]: duplicate stage name '{stage.name}'")
        if stage.parallel is not None and not isinstance(stage.parallel, str):
            raise RecipeError(f"{source}: stages[{i}].parallel must be a label (a string), got {stage.parallel!r}")
        if isinstance(stage.nice, bool) or not isinstance(stage.nice, int) or not 0 <= stage.nice <= 19:
            raise RecipeError(f"{source}: stages[{i}].nice must be a whole number from 0 to 19, got {stage.nice!r}")
        if stage.launcher not in ("python", "accelerate"):
            raise RecipeError(f"{source}: stages[{i}].launcher must be 'python' or 'accelerate'")
        if not Path(stage.config).is_file():
            raise RecipeError(f"{source}: stages[{i}].config: {stage.config} not found")
        names.add(stage.name)
        stages.append(stage)
    unknown = [r for r in recipe.rerun if r not in names]
    if unknown:
        raise RecipeError(f"{source}: --rerun {unknown[0]}: no such stage (stages: {', '.join(sorted(names))})")
    return stages


# The dataclasses each known stage module parses its recipe into ("module:attribute"), so the runner can check
# every stage's recipe (keys, types, ranges) before it runs the first one. Other modules: checked for existence.
RECIPE_TYPES: dict[str, tuple[str, ...]] = {
    "pipeline.sft": ("pipeline.config:DataArguments", "trl:SFTConfig", "pipeline.config:ModelArguments",
                     "pipeline.longctx:LongContextArguments"),
    "pipeline.dpo": ("pipeline.config:DataArguments", "trl:DPOConfig", "pipeline.config:ModelArguments",
                     "pipeline.longctx:LongContextArguments"),
    "pipeline.cppo": ("pipeline.cppo:CPPOArguments", "pipeline.rl.cppo_trainer:CPPOConfig",
                      "pipeline.config:ModelArguments"),
    "pipeline.generate": ("pipeline.generate:GenerateArguments",),
    "pipeline.evaluate": ("pipeline.evaluate:EvalArguments",),
    "pipeline.evoprompt": ("pipeline.evoprompt:EvoPromptArguments",),
    "pipeline.tiny": ("pipeline.tiny:TinyModelSpec",),
    "pipeline.niah": ("pipeline.niah:NiahArguments",),
    "pipeline.quant.plant": ("pipeline.quant.plant:PlantArguments",),
    "pipeline.quant.compare": ("pipeline.quant.compare:CompareArguments",),
    "pipeline.kv.detect": ("pipeline.kv.detect:DetectArguments",),
}


def check_stages(stages: list[Stage], source: str) -> None:
    """Every stage checked before the first one runs: its module exists, its accelerate config is a readable
    YAML mapping, and its recipe plus the pipeline's overrides parse (keys, types, ranges, output_dir)."""
    for i, stage in enumerate(stages):
        where = f"{source}: stages[{i}] ({stage.name})"
        try:
            found = importlib.util.find_spec(stage.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise RecipeError(f"{where}: key 'module': no module named '{stage.module}'")
        if stage.accelerate_config:
            if not Path(stage.accelerate_config).is_file():
                raise RecipeError(f"{where}: key 'accelerate_config': file {stage.accelerate_config} not found")
            load_yaml(stage.accelerate_config)
        if stage.num_processes is not None and stage.num_processes < 1:
            raise RecipeError(f"{where}: key 'num_processes' must be >= 1, got {stage.num_processes}")
        types = [getattr(importlib.import_module(ref.split(":")[0]), ref.split(":")[1])
                 for ref in RECIPE_TYPES.get(stage.module, ())]
        if types:
            try:
                parse(types, command(stage)[command(stage).index("--config"):], prog=stage.module)
            except RecipeError as e:
                raise RecipeError(f"stage '{stage.name}': {e}") from None


def _flag_values(value) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if value is None:
        return ["null"]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def stage_argv(stage: Stage) -> list[str]:
    """The stage module's own arguments: its recipe, then its `args` as flags."""
    args = ["--config", stage.config]
    for key, value in stage.args.items():
        args += [f"--{key}", *_flag_values(value)]
    return args


def command(stage: Stage) -> list[str]:
    args = stage_argv(stage)
    if stage.launcher == "accelerate":
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if stage.accelerate_config:
            launch += ["--config_file", stage.accelerate_config]
        if stage.num_processes:
            launch += ["--num_processes", str(stage.num_processes)]
        return launch + ["-m", stage.module] + args
    return [sys.executable, "-m", stage.module] + args


def stage_output_dir(stage: Stage) -> str:
    out = stage.args.get("output_dir") or load_yaml(stage.config).get("output_dir")
    if not out:
        raise RecipeError(f"{stage.config}: stage '{stage.name}' needs an 'output_dir'")
    return str(out)


def fingerprint(stage: Stage) -> str:
    """What a stage runs with: its module, args, launch, and its recipe's parsed settings (an edited comment
    is not a change)."""
    h = hashlib.sha256()
    h.update(json.dumps([stage.module, stage.args, stage.launcher, stage.accelerate_config,
                         stage.num_processes, load_yaml(stage.config)], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def legacy_fingerprint(stage: Stage) -> str:
    """The fingerprint earlier versions wrote to run_state.json (the recipe file's bytes): accepted, so a finished
    stage is not redone after an upgrade; the state is then rewritten with fingerprint()."""
    h = hashlib.sha256()
    h.update(json.dumps([stage.module, stage.args, stage.launcher, stage.accelerate_config,
                         stage.num_processes], sort_keys=True, default=str).encode())
    h.update(Path(stage.config).read_bytes())
    return h.hexdigest()[:16]


def _summary(metrics: dict, limit: int = 4) -> str:
    keys = [k for k in ("accuracy/mean", "train_loss") if k in metrics] + [k for k in metrics if "accuracy" in k]
    keys = list(dict.fromkeys(keys + list(metrics)))
    shown = [f"{k}={_fmt(metrics[k])}" for k in keys[:limit]]
    return ", ".join(shown)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stage_logs(stage: Stage, report_dir: Path) -> str:
    """Links to the stage's console log and, if it wrote one, its TensorBoard log directory (transformers
    writes `<output_dir>/runs/<date>_<host>/` unless TENSORBOARD_LOGGING_DIR says otherwise)."""
    links = []
    log = report_dir / "logs" / f"{stage.name}.log"
    if log.is_file():
        links.append(f"[console](logs/{stage.name}.log)")
    tb = Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(stage_output_dir(stage)) / "runs")
    if tb.is_dir() and any(tb.iterdir()):
        rel = os.path.relpath(tb, report_dir)
        links.append(f"[TensorBoard]({rel}) (`tensorboard --logdir {tb}`)")
    return ", ".join(links) or "-"


def write_report(recipe: PipelineRecipe, stages: list[Stage], state: dict, path: Path) -> None:
    lines = [f"# {recipe.name}: staged run report", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}. Re-run: `python -m pipeline.run --config "
             f"{state.get('_source', '')}`.", "",
             "| stage | status | wall time | output | logs | key metrics |", "|---|---|---|---|---|---|"]
    accuracy_rows, panels = [], {}
    for stage in stages:
        s = state.get(stage.name, {})
        result = read_stage_result(stage_output_dir(stage)) or {}
        metrics = result.get("metrics", {})
        secs = f"{s['seconds']:.0f} s" if "seconds" in s else "-"
        lines.append(f"| {stage.name} | {s.get('status', 'pending')} | {secs} | `{stage_output_dir(stage)}` | "
                     f"{stage_logs(stage, path.parent)} | {_summary(metrics)} |")
        acc = {k: v for k, v in metrics.items() if "accuracy" in k and isinstance(v, (int, float))}
        if acc:
            accuracy_rows.append((stage.name, acc))
        # NIAH accuracy and KV bytes per cache policy: the chart's KV panel (their names hold no "accuracy")
        panels.update({k: v for k, v in metrics.items() if k.startswith(("kv_bytes_ratio@", "niah_acc/"))})
    if accuracy_rows:
        # The table: held-out accuracy per task (columns) after each stage that reports one; the other accuracies
        # (EvoPrompt's test scores, quantization variants, token accuracy) are in the stages' metrics below.
        cols = sorted({k for _, acc in accuracy_rows for k in acc})
        per_task = [c for c in cols if c.startswith("accuracy/") and not c.startswith("accuracy/test_")]
        task_rows = [(name, acc) for name, acc in accuracy_rows if any(c in acc for c in per_task)]
        if task_rows:
            lines += ["", "## Held-out accuracy after each stage", "",
                      "| stage | " + " | ".join(c.split("/", 1)[1] for c in per_task) + " |",
                      "|---" * (len(per_task) + 1) + "|"]
            for name, acc in task_rows:
                lines.append(f"| {name} | " + " | ".join(_fmt(acc[c]) if c in acc else "-" for c in per_task) + " |")
        every = {k: v for _, acc in accuracy_rows for k, v in acc.items()} | panels
        if per_task and plot_accuracy(accuracy_rows, per_task, path.with_suffix(".png"), every):
            lines += ["", f"![held-out accuracy by task after each stage]({path.with_suffix('.png').name})"]
    lines += ["", "## All metrics", ""]
    for stage in stages:
        result = read_stage_result(stage_output_dir(stage))
        if result:
            lines.append(f"### {stage.name}")
            lines += [f"- {k}: {_fmt(v)}" for k, v in result["metrics"].items()]
            lines += [f"- artifact `{k}`: `{v}`" for k, v in result.get("artifacts", {}).items()]
            lines.append("")
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_accuracy(rows: list[tuple[str, dict]], tasks: list[str], path: Path, metrics: dict | None = None) -> bool:
    """Grouped bars: held-out accuracy per task (x) after each stage (one bar colour per stage). Beside it, where the
    run has them: NIAH accuracy against the KV bytes kept (`niah_acc/<policy>`, `kv_bytes_ratio@<len>/<policy>`)
    and accuracy per quantization variant (`quant_accuracy/<variant>`)."""
    rows = [(n, a) for n, a in rows if any(t in a for t in tasks)]
    metrics = metrics or {}
    niah = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("niah_acc/")}
    quant = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("quant_accuracy/")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    extra = [p for p in (niah, quant) if p]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(1.4 * len(tasks) + 2 + 3.5 * len(extra), 3.5),
                             gridspec_kw={"width_ratios": [1.4 * len(tasks) + 2] + [3.5] * len(extra)}, squeeze=False)
    ax, panels = axes[0][0], list(axes[0][1:])
    if niah:
        pax = panels.pop(0)
        for i, (policy, acc) in enumerate(niah.items()):
            ratio = next((v for k, v in metrics.items() if k.startswith("kv_bytes_ratio@") and k.endswith("/" + policy)),
                         1.0)  # the full cache keeps every byte
            pax.scatter([ratio], [acc], s=30)
            pax.annotate(policy, (ratio, acc), fontsize=7, xytext=(3, 3 + 9 * i), textcoords="offset points")
        pax.set(xlim=(0, 1.1), ylim=(-0.05, 1.05), xlabel="KV bytes kept (fraction of full)", ylabel="NIAH accuracy")
    if quant:
        qax = panels.pop(0)
        qax.bar(range(len(quant)), list(quant.values()), color="tab:gray")
        qax.set_xticks(range(len(quant)), list(quant), rotation=30, ha="right", fontsize=7)
        qax.set(ylim=(0, 1), ylabel="held-out accuracy (quantized)")
    width = 0.8 / max(len(rows), 1)
    for i, (name, acc) in enumerate(rows):
        ax.bar([j + i * width for j in range(len(tasks))], [acc.get(t, 0.0) for t in tasks], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [t.split("/", 1)[1] for t in tasks])
    ax.set(ylim=(0, 1), ylabel="held-out accuracy")
    ax.legend(fontsize=7, ncol=4, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)  # above the bars
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _in_stage_process(nice: int = 0) -> None:
    """Run in the stage's process before it starts (Linux): get SIGTERM when the runner dies, even by kill -9;
    take the stage's niceness."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if nice:
        os.nice(nice)
        # The stage has its own session, hence (with sched_autogroup) its own scheduling group, between which a
        # process's niceness counts for nothing: the group's niceness is what the CPU is shared by.
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
        except OSError:
            pass


# What a stage spends its first ~5 s importing (`import trl` alone is lazy: its trainers pull in transformers' Trainer,
# peft, accelerate, datasets). A module missing here is imported by the stage itself, as without a server.
PRELOAD = ("torch", "transformers", "peft", "trl", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer",
           "trl.trainer.grpo_trainer")


def _stage_server(env: dict):
    """multiprocessing's fork server, started once per runner process: it imports PRELOAD under the stages'
    environment (some libraries read it at import: HF_HUB_OFFLINE), its own output (import warnings) discarded; each
    `python` stage is then forked from it (`_forked_stage`). None where there is no fork server (not POSIX), and where
    a CUDA device is visible: CUDA cannot run in a process forked from one that initialised it, which some of the
    preloaded libraries' imports may do; there every stage starts fresh, as with `preload: false`."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    import torch

    if torch.cuda.is_available():  # the runner itself never forks, so asking here is safe
        return None
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs
    saved_env, saved_fds = dict(os.environ), (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.environ.update(env)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        forkserver.ensure_running()  # the server inherits the environment and fds 1 and 2 now
    finally:
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(saved_env)
    return ctx


def _forked_stage(module: str, args: list[str], env: dict, cwd: str, log_path: str, nice: int) -> None:
    """In a process forked from the fork server: what `python -m <module> <args>` would do, in its own session
    with the stage's niceness, environment, working directory and thread count, its output appended to its log."""
    os.setsid()
    _in_stage_process(nice)
    # The fork server outlives the runner while any stage it forked runs, so PR_SET_PDEATHSIG (from the server) is
    # no use here: the runner's end (kill -9 too) closes the parent sentinel multiprocessing gives each child.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (multiprocessing.connection.wait([parent.sentinel]),
                                         os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(log)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:  # torch read it at import, in the server
        sys.modules["torch"].set_num_threads(int(threads))
    if sys.path[:1] != [cwd]:  # as `python -m` puts it
        sys.path.insert(0, cwd)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)  # its SystemExit is the exit code
    finally:
        # What the interpreter's exit runs (multiprocessing ends the process with os._exit); a private function of
        # atexit: test_forked_stage_sees_what_a_fresh_python_m_process_sees checks that handlers run.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


class _Forked:
    """A forked stage with the part of Popen's interface the runner uses (pid, poll, wait)."""

    def __init__(self, process):
        self.process, self.pid = process, process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("stage", timeout)
        return self.process.exitcode


def _end_group(proc, grace_s: float = 10.0) -> None:
    """End a stage's whole process group (accelerate's workers too): SIGTERM, then SIGKILL after `grace_s`.
    `proc`: a Popen or a _Forked."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # a forked stage not yet in its own session: the process itself
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                return
        except PermissionError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _exit_on_signal(signum, frame):  # a killed runner ends its stages (their `finally`), then exits
    raise SystemExit(128 + signum)


class StageFailed(RuntimeError):
    def __init__(self, message: str, error_line: str | None = None):
        super().__init__(message)
        self.error_line = error_line


def run_stage(stage: Stage, index: int, total: int, log_path: Path, env: dict, running: list | None = None,
              server=None) -> float:
    """Run one stage to its end: forked from `server` (the fork server) if given and the stage is `python -m`, else
    a fresh process. `running` (stages run together): the process is registered there so the runner can end it, and
    the console shows no live status line (one live display at a time)."""
    cmd = command(stage)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()

    try:
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    proc = None
    try:
        status = console.status(f"[{index}/{total}] {stage.name}: running") if running is None else nullcontext()

        def show(line: str) -> None:
            tail = line.strip().replace("[", "(")[-90:]
            if tail and running is None:
                status.update(f"[{index}/{total}] {stage.name} ({time.time() - start:.0f} s): {tail}")

        with open(log_path, "a") as log, status:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            if server is not None and stage.launcher == "python":
                process = server.Process(target=_forked_stage, name=stage.name, args=(
                    stage.module, stage_argv(stage), env, os.getcwd(), str(log_path), stage.nice))
                try:
                    process.start()
                    proc = _Forked(process)
                except (OSError, EOFError) as e:  # the server is gone: this stage starts fresh
                    log.write(f"(the preload server could not start it: {e!r}; a fresh process instead)\n")
                    log.flush()
            if proc is not None:
                if running is not None:
                    running.append(proc)
                with open(log_path) as follow:  # the stage writes its log itself: follow it for the status line
                    follow.seek(0, os.SEEK_END)
                    while proc.poll() is None:
                        proc.process.join(0.5)
                        for line in follow.read().splitlines()[-1:]:
                            show(line)
                code = proc.wait()
            else:
                # Its own process group (session): the runner can end the stage and everything it started.
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                        bufsize=1, start_new_session=True,
                                        preexec_fn=functools.partial(_in_stage_process, stage.nice))
                if running is not None:
                    running.append(proc)
                for line in proc.stdout:
                    log.write(line)
                    show(line)
                code = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            _end_group(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        lines = log_path.read_text().splitlines()
        errors = [line for line in lines[-50:] if line.startswith("error: ")]
        if code == 2 and errors:  # the stage's own one-line error says it all
            raise StageFailed(f"stage '{stage.name}' failed (exit 2); full log: {log_path}", errors[-1][7:])
        console.print("\n".join(lines[-25:]), markup=False)
        raise StageFailed(f"stage '{stage.name}' failed (exit {code}); full log: {log_path}")
    return time.time() - start


def run_group(group: list[tuple[int, Stage, str]], total: int, log_dir: Path, env: dict, server=None) -> list[tuple]:
    """Run the stages of `group` (one, or neighbours sharing a `parallel` label) to their ends; returns
    (index, stage, fingerprint, seconds or StageFailed) for each, in order. Stages run together share the
    threads of OMP_NUM_THREADS (default: every core); a killed runner ends them all."""
    def attempt(future):
        try:
            return future.result()
        except StageFailed as e:
            return e

    if len(group) == 1:
        i, stage, fp = group[0]
        try:
            return [(i, stage, fp, run_stage(stage, i, total, log_dir / f"{stage.name}.log", env, server=server))]
        except StageFailed as e:
            return [(i, stage, fp, e)]
    threads = max(1, int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // len(group))  # checked in main
    console.print(f"running together, {threads} thread(s) each: "
                  + ", ".join(f"[{i}/{total}] {stage.name}" for i, stage, _ in group))
    running: list = []  # Popen or _Forked
    pool, futures = ThreadPoolExecutor(len(group)), []
    try:
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    except ValueError:  # not the main thread
        previous = None
    try:
        futures = [pool.submit(run_stage, stage, i, total, log_dir / f"{stage.name}.log",
                               {**env, "OMP_NUM_THREADS": str(threads)}, running, server) for i, stage, _ in group]
        return [(i, stage, fp, attempt(f)) for (i, stage, fp), f in zip(group, futures)]
    finally:  # after a kill or Ctrl-C: end the stages still running (they resume on the next run), also one
        pool.shutdown(wait=False, cancel_futures=True)  # whose process was starting just then
        while not all(f.done() for f in futures):
            for proc in list(running):
                if proc.poll() is None:
                    _end_group(proc)
            time.sleep(0.1)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> dict:
    (recipe,), _, source = parse([PipelineRecipe], argv, prog="python -m pipeline.run")
    stages = load_stages(recipe, source)
    out = Path(recipe.output_dir)
    env = {**os.environ, **{k: str(v) for k, v in recipe.env.items()}}
    if any(s.parallel for s in stages) and not (env.get("OMP_NUM_THREADS") or "1").isdigit():
        raise RecipeError(f"{source}: OMP_NUM_THREADS={env['OMP_NUM_THREADS']!r} (env or key 'env'): parallel stages "
                          "share it out, it must be a whole number")
    server = None  # the fork server: its imports run while check_stages does its own (both cores busy)
    if recipe.preload and not recipe.dry_run and any(s.launcher == "python" and (
            recipe.rerun or read_stage_result(stage_output_dir(s)) is None) for s in stages):
        server = _stage_server(env)
    check_stages(stages, source)
    state_path, report_path = out / "run_state.json", out / "report.md"
    if recipe.dry_run:
        for i, stage in enumerate(stages, 1):
            print(f"[{i}/{len(stages)}] {stage.name} -> {stage_output_dir(stage)}\n    {' '.join(command(stage))}")
        return {}
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state["_source"] = source

    # --rerun: that stage's output and every later one's go now, not as the run reaches them: a run killed or failed
    # before then would otherwise leave the later stages' results, made from the old outputs, to be skipped next time.
    rerun_from = min((i for i, s in enumerate(stages) if s.name in recipe.rerun), default=None)
    for stage in stages[rerun_from:] if rerun_from is not None else ():
        if Path(stage_output_dir(stage)).exists():
            shutil.rmtree(stage_output_dir(stage))
    started = time.time()
    console.print(f"[bold]{recipe.name}[/bold]: {len(stages)} stages -> {out}  (logs in {out / 'logs'})")

    def record(i: int, stage: Stage, fp: str, outcome: float | StageFailed) -> None:
        if isinstance(outcome, StageFailed):
            state[stage.name] = {"status": "failed", "fingerprint": fp}
            atomic_write_json(state_path, state)
            write_report(recipe, stages, state, report_path)
            if outcome.error_line:
                raise RecipeError(f"stage '{stage.name}': {outcome.error_line} "
                                  f"(log: {out / 'logs' / f'{stage.name}.log'})")
            console.print(f"[red]✗[/red] {outcome}")
            raise SystemExit(1)
        result = read_stage_result(stage_output_dir(stage))
        if result is None:
            raise RecipeError(f"stage '{stage.name}' exited 0 but wrote no stage_result.json in "
                              f"{stage_output_dir(stage)}")
        state[stage.name] = {"status": "done", "fingerprint": fp, "seconds": round(outcome, 1)}
        atomic_write_json(state_path, state)
        console.print(f"[green]✓[/green] [{i}/{len(stages)}] {stage.name} ({outcome:.0f} s): "
                      f"{_summary(result['metrics'])}")

    group: list[tuple[int, Stage, str]] = []  # stages to run now: one, or a `parallel` group
    for i, stage in enumerate(stages, 1):
        stage_out, fp = stage_output_dir(stage), fingerprint(stage)
        done = read_stage_result(stage_out)
        if done is not None:
            if state.get(stage.name, {}).get("fingerprint") not in (None, fp, legacy_fingerprint(stage)):
                raise RecipeError(f"{source}: stage '{stage.name}': its recipe changed since {stage_out} was made; "
                                  f"pass --rerun {stage.name} to redo it and the stages after it")
            console.print(f"[green]✓[/green] [{i}/{len(stages)}] {stage.name}: already done, skipped "
                          f"({_summary(done['metrics'])})")
            state.setdefault(stage.name, {}).update(status="done (skipped)", fingerprint=fp)
        else:
            group.append((i, stage, fp))
        if group and (stage.parallel is None or i == len(stages) or stages[i].parallel != stage.parallel):
            outcomes = run_group(group, len(stages), out / "logs", env, server)
            # Stages that finished are recorded before a failed one of the same group ends the run.
            for i_, stage_, fp_, outcome in sorted(outcomes, key=lambda o: isinstance(o[3], StageFailed)):
                record(i_, stage_, fp_, outcome)
            group = []
    atomic_write_json(state_path, state)
    write_report(recipe, stages, state, report_path)
    console.print(f"\nAll stages done in {time.time() - started:.0f} s. Report: {report_path}\n")
    console.print(report_path.read_text(), markup=False)
    return state


if __name__ == "__main__":
    cli(main)

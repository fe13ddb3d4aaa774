"""What every trainer-based stage does around TRL: logging, the dry-run plan, resume, save, stage result."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from pipeline.config import DataArguments, ModelArguments, RecipeError, check_training, parse, zero_stage
from pipeline.io import STAGE_RESULT, atomic_write_json, read_stage_result, write_stage_result

logger = logging.getLogger("pipeline")


def setup_logging(training_args) -> None:
    import datasets
    import transformers

    main = training_args.process_index == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout,
                        level=logging.INFO if main else logging.WARNING, force=True)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    if not main:
        datasets.disable_progress_bars()


def parse_stage(stage: str, config_cls, argv: list[str] | None):
    """Parse a trainer stage's recipe (data, TRL config, model, long-context switches), check it and print its
    plan. Returns (data_args, training_args, model_args, lc_args, source), or None after a --dry_run."""
    from pipeline.longctx import LongContextArguments, check_switches

    (data_args, training_args, model_args, lc_args), values, source = parse(
        [DataArguments, config_cls, ModelArguments, LongContextArguments], argv, prog=f"pipeline/{stage}.py")
    check_training(model_args, training_args, data_args, source)
    if stage != "sft" and data_args.length_buckets:
        raise RecipeError(f"{source}: key 'length_buckets' is an SFT key (a preference row's chosen and rejected "
                          "lengths differ)")
    problem = check_switches(lc_args, training_args, zero_stage(training_args, data_args))
    if problem:
        raise RecipeError(f"{source}: {problem}")
    summary = plan(stage, source, data_args, training_args, model_args, lc_args)
    if data_args.dry_run:  # the recipe only: its model and data may be outputs of earlier stages
        print(summary)
        return None
    setup_logging(training_args)
    logger.info("\n%s", summary)
    check_resume(stage, data_args, training_args, model_args, values, source)
    return data_args, training_args, model_args, lc_args, source


def check_inputs(stage: str, data_args: DataArguments, model_args: ModelArguments, source: str,
                 hub_cache: bool = True) -> None:
    """The data files and model paths a trainer stage will read, checked before anything loads."""
    from pipeline.data import check_data_files
    from pipeline.modeling import check_model_path

    check_data_files(data_args, stage, source)
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError(f"{source}: missing required key 'model_name_or_path'")
    if Path(name).exists() or not model_args.tiny_model:  # a missing path with tiny_model builds the tiny base
        check_model_path(name, source, hub_cache=hub_cache)
    elif not Path(model_args.tiny_model).is_file():
        raise RecipeError(f"{source}: key 'tiny_model': file {model_args.tiny_model} not found")
    if model_args.ref_model_name_or_path:
        check_model_path(model_args.ref_model_name_or_path, source, "ref_model_name_or_path", tokenizer=False,
                         hub_cache=hub_cache)


def finished(training_args) -> dict | None:
    """The metrics of a stage that already finished in output_dir (its stage_result.json), else None. Called right
    after parsing, before anything loads."""
    done = read_stage_result(training_args.output_dir)
    if done is None:
        return None
    logger.warning("%s is already complete (%s exists): delete it or choose another output_dir to retrain",
                   training_args.output_dir, STAGE_RESULT)
    return done["metrics"]


# ---------------------------------------------------------------------------------------------
# Resume: which checkpoint, and whether it belongs to this recipe
# ---------------------------------------------------------------------------------------------

FINGERPRINT = "recipe_fingerprint.json"
# Keys that do not change what is trained: logging, saving, evaluation, output paths, reporting.
_NOT_TRAINING = {"output_dir", "logging_dir", "report_to", "run_name", "dry_run", "resume_from_checkpoint",
                 "overwrite_output_dir", "push_to_hub", "disable_tqdm", "accelerate_config",
                 "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                 "dataloader_prefetch_factor", "per_device_eval_batch_size", "eval_accumulation_steps",
                 "include_num_input_tokens_seen", "torch_empty_cache_steps", "dataset_test_split",
                 "super_weight_registry"}
_NOT_TRAINING_PREFIXES = ("logging_", "save_", "hub_", "eval_", "push_to_hub", "load_best_model", "metric_for_best")
_TRAINING_ANYWAY = {"eval_split_size"}  # decides which rows are trained on


def training_keys(values: dict) -> dict:
    """The recipe keys (as set by recipe and command line) that decide the trained model."""
    keep = {k: v for k, v in values.items() if k in _TRAINING_ANYWAY
            or (k not in _NOT_TRAINING and not k.startswith(_NOT_TRAINING_PREFIXES))}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def _checkpoint_state(path: Path) -> dict | None:
    """A checkpoint's trainer state if the checkpoint is complete, else None. Trainer._save_checkpoint writes
    trainer_state.json last (after weights, optimizer, scheduler and RNG state), so a parsable one whose
    global_step matches the directory name marks a finished write."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if not isinstance(state, dict) or (m and state.get("global_step") != int(m.group(1))):
        return None
    return state


def resume_point(args, where: str | None = None, clean: bool = False) -> str | None:
    """The checkpoint to resume from: the recipe's `resume_from_checkpoint` (a path, or true = the last one in
    output_dir), else the last complete checkpoint in output_dir, else None. Incomplete checkpoints (a write
    that was killed) are never chosen; with `clean` the main process deletes them."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    where = where or str(args.output_dir)
    explicit = args.resume_from_checkpoint
    if isinstance(explicit, str) and explicit.strip().lower() in ("true", "false", ""):
        explicit = explicit.strip().lower() == "true"
    if isinstance(explicit, str):
        if _checkpoint_state(Path(explicit)) is None:
            raise RecipeError(f"{where}: key 'resume_from_checkpoint': {explicit} is not a complete checkpoint "
                              "(a checkpoint-N directory with a valid trainer_state.json)")
        return explicit
    out = Path(args.output_dir)
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-(\d+)", d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d, _checkpoint_state(d) is not None))
    complete = [d for _, d, ok in sorted(found) if ok]
    partial = [d for _, d, ok in found if not ok]
    if partial:
        logger.warning("incomplete checkpoint(s) %s (a killed write): never resumed%s", [str(d) for d in partial],
                       "; deleting them" if clean else "")
        if clean and args.process_index == 0:
            for d in partial:
                shutil.rmtree(d, ignore_errors=True)
    if explicit is True and not complete:
        raise RecipeError(f"{where}: key 'resume_from_checkpoint: true': no complete checkpoint in {out}")
    return str(complete[-1]) if complete else None


def check_resume(stage: str, data_args, training_args, model_args, values: dict, source: str) -> None:
    """Before anything loads: a finished output_dir belongs to this recipe; the inputs exist; the checkpoint a
    resume would use is complete and made by this recipe (same training keys). Records the recipe's training
    keys in output_dir/recipe_fingerprint.json when training starts afresh."""
    out = Path(training_args.output_dir)
    keys = training_keys(values)
    recorded = json.loads((out / FINGERPRINT).read_text())["keys"] if (out / FINGERPRINT).is_file() else None
    if read_stage_result(out) is not None:
        if recorded is not None and recorded != keys:
            raise RecipeError(f"{source}: key 'output_dir': {out} holds a finished run of a different recipe "
                              f"({_differences(recorded, keys)}); delete it or choose another output_dir")
        return
    check_inputs(stage, data_args, model_args, source)
    resume = resume_point(training_args, source, clean=True)
    if resume is not None:
        made_by = Path(resume).parent / FINGERPRINT
        theirs = json.loads(made_by.read_text())["keys"] if made_by.is_file() else None
        if theirs is None:
            logger.warning("%s has no %s (made by an older version): resuming without checking its recipe",
                           resume, FINGERPRINT)
        elif theirs != keys:
            raise RecipeError(f"{source}: key 'output_dir': {resume} was made by a different recipe "
                              f"({_differences(theirs, keys)}); resuming would mix two runs: delete the "
                              "checkpoints, choose another output_dir, or set those keys back")
        if Path(resume).parent == out:
            return
    if training_args.process_index == 0:
        atomic_write_json(out / FINGERPRINT, {"stage": stage, "keys": keys})


def _differences(before: dict, now: dict) -> str:
    from pipeline.validation import shown

    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    parts = [f"{k}: {shown(before.get(k, '(default)'))} -> {shown(now.get(k, '(default)'))}" for k in diff[:6]]
    return "keys that differ: " + "; ".join(parts) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")


def plan(stage: str, source: str, data_args: DataArguments, training_args, model_args: ModelArguments,
         lc_args=None) -> str:
    """A human-readable summary of what the recipe will do (printed by --dry_run and at startup)."""
    if model_args.use_peft:
        bits = "4-bit " if model_args.load_in_4bit else "8-bit " if model_args.load_in_8bit else ""
        method = f"{'Q' if bits else ''}LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}, " \
                 f"targets={model_args.lora_target_modules or 'model default'}) on a {bits or 'full-precision '}base"
    else:
        method = "full fine-tuning"
    data = [data_args.dataset_name] if data_args.dataset_name else [d["path"] for d in data_args.datasets]
    stage_z = zero_stage(training_args, data_args)
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    steps = f"max_steps={training_args.max_steps}" if training_args.max_steps > 0 else \
        f"epochs={training_args.num_train_epochs}"
    lines = [
        f"stage:        {stage} ({source})",
        f"model:        {model_args.model_name_or_path}" + (f" (tiny fallback: {model_args.tiny_model})"
                                                            if model_args.tiny_model else ""),
        f"method:       {method}",
        f"data:         {', '.join(data)}" + (f" (batches by token length, bucket edges {data_args.length_buckets})"
                                                if data_args.length_buckets else ""),
        f"schedule:     {steps}, lr={training_args.learning_rate}, per-device batch="
        f"{training_args.per_device_train_batch_size} x grad-accum {training_args.gradient_accumulation_steps}",
        f"precision:    {precision}; activation checkpointing {checkpointing(training_args, lc_args)}; "
        f"DeepSpeed ZeRO={stage_z if stage_z is not None else 'off'}",
        f"output_dir:   {training_args.output_dir}",
    ]
    if stage == "dpo":
        ref = model_args.ref_model_name_or_path or ("base with adapters disabled" if model_args.use_peft
                                                     else "a frozen copy of the initial policy")
        lines.append(f"reference:    {ref}{' (log-probs precomputed)' if training_args.precompute_ref_log_probs else ''}"
                     f"; beta={training_args.beta}, loss={training_args.loss_type}")
    if lc_args is not None:
        on = lc_args.active(training_args)
        if not on:
            lines.append("long context: no switch on (plain TRL)")
        else:
            described = {
                "tiled_mlp": f"tiled MLP ({lc_args.tiled_mlp_tile_tokens}-token tiles)",
                "lean_rmsnorm": f"lean RMSNorm ({lc_args.tiled_mlp_tile_tokens}-token tiles)",
                "loss_vocab_chunk": f"LM-head vocabulary chunks of {lc_args.loss_vocab_chunk}",
                "checkpoint_offload": "checkpoints offloaded to host memory",
                "padding_free": "chosen + rejected packed padding-free",
                "sequence_parallel_size": f"sequence parallel over {lc_args.sequence_parallel_size} processes",
                "gradient_as_bucket_view": "DDP gradients as bucket views",
                "streaming_heads": f"streaming heads (top {lc_args.streaming_full_heads} KV heads of "
                                   f"{lc_args.streaming_heads} whole, sink {lc_args.streaming_sink} + window "
                                   f"{lc_args.streaming_window} for the rest)"}
            lines.append("long context: " + ", ".join(described[name] for name in on))
    if data_args.accelerate_config:
        lines.append(f"launch:       accelerate launch --config_file {data_args.accelerate_config} "
                     f"pipeline/{stage}.py --config {source}")
    return "\n".join(lines)


def checkpointing(training_args, lc_args=None) -> str:
    """What the Trainer will run: it reads activation_checkpointing(_kwargs), not the deprecated aliases."""
    if not training_args.activation_checkpointing:
        return "off"
    kwargs = training_args.activation_checkpointing_kwargs or {}
    mode = "reentrant" if kwargs.get("use_reentrant") else "non-reentrant"
    offload = ", checkpoints offloaded" if lc_args is not None and lc_args.checkpoint_offload else ""
    return f"on ({mode}{offload})"


def _logged_loss(log_history: list[dict], upto: int) -> tuple[float, int]:
    """(sum of per-step losses, last step covered) from the logged losses up to step `upto`: each logged loss
    is the mean over the steps since the previous log, as Trainer computes train_loss."""
    total, prev = 0.0, 0
    for h in log_history:
        if "loss" in h and prev < h.get("step", 0) <= upto:
            total += h["loss"] * (h["step"] - prev)
            prev = h["step"]
    return total, prev


def _train(trainer, resume: str | None) -> dict:
    """trainer.train, resumed from `resume`; returns train metrics that cover the whole run. A checkpoint that
    already holds the end of the schedule (killed after the last step) is loaded, not trained on: training from
    it would run one step past max_steps."""
    from transformers import TrainerState

    state = json.loads((Path(resume) / "trainer_state.json").read_text()) if resume else None
    start = state["global_step"] if state else 0
    if state and state.get("max_steps", 0) > 0 and start >= state["max_steps"]:
        logger.info("%s is the end of training (step %d of %d): loading it, not training", resume, start,
                    state["max_steps"])
        trainer._load_from_checkpoint(resume)  # the stock loader of Trainer.train(resume_from_checkpoint=...)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        metrics = {"total_flos": trainer.state.total_flos}
    else:
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = dict(result.metrics)
        if not start:
            return metrics
        # Trainer.train's train_loss covers only the steps of this call: add the logged steps before the resume.
        metrics["train_loss"] = result.training_loss * (trainer.state.global_step - start)
    before, covered = _logged_loss(trainer.state.log_history, start)
    if covered < start:
        logger.warning("train_loss: steps %d-%d before the resume were not logged (logging_steps does not divide "
                       "save_steps); it covers the logged steps", covered + 1, start)
    steps = covered + trainer.state.global_step - start
    metrics["train_loss"] = (metrics.get("train_loss", 0.0) + before) / max(steps, 1)
    if "train_runtime" not in metrics:
        trainer.state.log_history.append({**metrics, "step": trainer.state.global_step})
    return metrics


def _test_kill_hook(trainer) -> None:
    """Test-only (PIPELINE_TEST_KILL=step:N | save:N | end): SIGKILL this process after step N, during the
    write of checkpoint-N (after its weights, before its optimizer state), or after the last step's checkpoint
    (before the stage result), so that the kill tests hit those moments deterministically."""
    spec = os.environ.get("PIPELINE_TEST_KILL")
    if not spec:
        return
    import torch
    from transformers import TrainerCallback

    what, _, n = spec.partition(":")

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if what == "save":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if str(f).endswith(f"checkpoint-{n}{os.sep}optimizer.pt"):
                die()
            return real_save(obj, f, *a, **k)

        torch.save = save

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if what == "step" and state.global_step == int(n):
                die()

        def on_train_end(self, args, state, control, **kwargs):
            if what == "end":
                die()

    trainer.add_callback(Kill())


def train_and_save(trainer, stage: str, data_args: DataArguments | None = None, end: bool = True) -> dict:
    """Train (resuming from the last complete checkpoint in output_dir, or the recipe's resume_from_checkpoint),
    save model + metrics, mark the stage done. `end`: then `trainer.end()` (trackers finished, process group
    destroyed), as TRL's scripts do; a stage that trains again or evaluates across processes afterwards passes False
    and ends later."""
    args = trainer.args
    if (done := finished(args)) is not None:  # CPPO's tasks reach here; SFT and DPO checked before loading
        if end:
            trainer.end()
        return done
    resume = resume_point(args, clean=True)
    if resume:
        logger.info("resuming from %s", resume)
    from pipeline.modeling import keep_adapter_dtype_on_resume

    keep_adapter_dtype_on_resume(trainer.model)
    _test_kill_hook(trainer)
    metrics = _train(trainer, resume)
    trainer.save_model(args.output_dir)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics.update(first_logged_loss=losses[0], last_logged_loss=losses[-1])
    metrics.update(global_step=trainer.state.global_step, world_size=args.world_size)
    if data_args is not None and data_args.eval_tasks:
        # Each rank decodes its share and the rows are gathered (padded shares keep ZeRO-3's forwards in step).
        from pipeline.evaluate import evaluate

        metrics.update(evaluate(trainer.model, trainer.processing_class, data_args.eval_tasks,
                                data_args.eval_examples, system_prompt=data_args.eval_system_prompt,
                                state=trainer.accelerator))
    registry = Path(args.output_dir) / "super_weights.json"  # written by a preserve_super_weights load
    if registry.is_file():
        metrics["super_weights_kept_exact"] = len(json.loads(registry.read_text())["super_weights"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(args.output_dir)
        write_stage_result(args.output_dir, stage, metrics, {"model": str(Path(args.output_dir))})
    if end:
        # Every rank reaches the end before any destroys its process group: a rank that tears gloo down while
        # rank 0 is still writing the stage result died at exit now and then ("terminate called without an active
        # exception", SIGABRT), and the launcher then killed rank 0.
        trainer.accelerator.wait_for_everyone()
        trainer.end()
    return metrics

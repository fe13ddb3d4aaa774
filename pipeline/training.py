"""What every trainer-based stage does around TRL: logging, the dry-run plan, resume, save, stage result."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import DataArguments, ModelArguments, check_training, parse, zero_stage
from pipeline.io import STAGE_RESULT, read_stage_result, write_stage_result

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
    from pipeline.longctx import LongContextArguments

    (data_args, training_args, model_args, lc_args), _, source = parse(
        [DataArguments, config_cls, ModelArguments, LongContextArguments], argv, prog=f"pipeline/{stage}.py")
    check_training(model_args, training_args, data_args, source)
    summary = plan(stage, source, data_args, training_args, model_args, lc_args)
    if data_args.dry_run:
        print(summary)
        return None
    setup_logging(training_args)
    logger.info("\n%s", summary)
    return data_args, training_args, model_args, lc_args, source


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
        f"data:         {', '.join(data)}",
        f"schedule:     {steps}, lr={training_args.learning_rate}, per-device batch="
        f"{training_args.per_device_train_batch_size} x grad-accum {training_args.gradient_accumulation_steps}",
        f"precision:    {precision}; checkpointing={'on' if training_args.gradient_checkpointing else 'off'}; "
        f"DeepSpeed ZeRO={stage_z if stage_z is not None else 'off'}",
        f"output_dir:   {training_args.output_dir}",
    ]
    if stage == "dpo":
        ref = model_args.ref_model_name_or_path or ("base with adapters disabled" if model_args.use_peft
                                                     else "a frozen copy of the initial policy")
        lines.append(f"reference:    {ref}{' (log-probs precomputed)' if training_args.precompute_ref_log_probs else ''}"
                     f"; beta={training_args.beta}, loss={training_args.loss_type}")
    if lc_args is not None:
        packing = "on" if getattr(training_args, "padding_free", False) else "off"
        lines.append(f"long context: tiled MLP {'on' if lc_args.tiled_mlp else 'off'} "
                     f"({lc_args.tiled_mlp_tile_tokens}-token tiles), lean RMSNorm {'on' if lc_args.lean_rmsnorm else 'off'}, "
                     f"LM-head vocabulary chunks {lc_args.loss_vocab_chunk}, "
                     f"padding-free {packing}, sequence parallel {lc_args.sequence_parallel_size}, "
                     f"checkpoint offload {'on' if lc_args.checkpoint_offload else 'off'}, optimizer state "
                     f"{'sharded over DDP processes' if lc_args.shard_optimizer_state else 'whole in every process'}")
    if data_args.accelerate_config:
        lines.append(f"launch:       accelerate launch --config_file {data_args.accelerate_config} "
                     f"pipeline/{stage}.py --config {source}")
    return "\n".join(lines)


def last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def train_and_save(trainer, stage: str, data_args: DataArguments | None = None, end: bool = True) -> dict:
    """Train (resuming from the last checkpoint in output_dir), save model + metrics, mark the stage done.
    `end`: then `trainer.end()` (trackers finished, process group destroyed), as TRL's scripts do; a stage
    that trains again or evaluates across processes afterwards passes False and ends later."""
    args = trainer.args
    done = read_stage_result(args.output_dir)
    if done is not None:  # resuming a finished run would train one step past max_steps
        logger.warning("%s is already complete (%s exists): delete it or choose another output_dir to retrain",
                       args.output_dir, STAGE_RESULT)
        if end:
            trainer.end()
        return done["metrics"]
    resume = last_checkpoint(args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    metrics = dict(result.metrics)
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
                                data_args.eval_examples, state=trainer.accelerator))
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
        trainer.end()
    return metrics

"""Supervised fine-tuning (full, LoRA or QLoRA) on TRL's SFTTrainer.

    accelerate launch pipeline/sft.py --config recipes/tiny/sft.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml pipeline/sft.py \
        --config recipes/llama-3.1-8b/sft.yaml --learning_rate 1e-5
    python -m pipeline.sft --config recipes/tiny/sft.yaml --dry_run

Every recipe key can be overridden on the command line. A run resumes from the last checkpoint in
`output_dir`. The model (or LoRA adapter) is saved to `output_dir` in the standard formats. Long
sequences: tiled MLP / lean RMSNorm / packing / sequence parallelism / checkpoint offload switches
(pipeline/longctx).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/sft.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import SFTConfig, SFTTrainer  # noqa: E402

from pipeline.config import cli  # noqa: E402
from pipeline.data import batch_by_length, load_train_data, report_truncation  # noqa: E402
from pipeline.longctx import long_context_trainer  # noqa: E402
from pipeline.modeling import (check_model_switches, load_model, load_tokenizer, peft_config,  # noqa: E402
                               resolve_model_path)
from pipeline.training import finished, parse_stage, train_and_save  # noqa: E402


def main(argv: list[str] | None = None) -> dict | None:
    parsed = parse_stage("sft", SFTConfig, argv)
    if parsed is None:  # --dry_run
        return None
    data_args, training_args, model_args, lc_args, source = parsed
    if (done := finished(training_args)) is not None:  # before anything loads
        return done

    # Model & tokenizer
    path = resolve_model_path(model_args, source)
    check_model_switches(path, model_args, lc_args, source)  # before any weights load
    tokenizer = load_tokenizer(path, model_args)
    model = load_model(path, model_args, training_args)

    # Data
    train, evaluation = load_train_data(data_args, "sft", source, seed=training_args.seed)

    # Training
    trainer_cls = long_context_trainer(SFTTrainer, lc_args, training_args)  # plain TRL if no switch is on
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer, peft_config=peft_config(model_args))
    report_truncation(trainer, len(train), source)
    if data_args.length_buckets:
        batch_by_length(trainer, data_args.length_buckets, source)
    return train_and_save(trainer, "sft", data_args)


if __name__ == "__main__":
    cli(main)

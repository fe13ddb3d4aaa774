"""Direct preference optimisation (full, LoRA or QLoRA) on TRL's DPOTrainer.

    accelerate launch pipeline/dpo.py --config recipes/tiny/dpo.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml pipeline/dpo.py \
        --config recipes/llama-3.1-8b/dpo.yaml --beta 0.05
    python -m pipeline.dpo --config recipes/tiny/dpo.yaml --dry_run

The reference model is, in order: `ref_model_name_or_path` if given; with LoRA, the base with the
adapter disabled; otherwise a frozen copy of the initial policy. `precompute_ref_log_probs: true`
computes the reference log-probs once up front and keeps no reference model in memory. Long
sequences: `padding_free: true` packs chosen and rejected rows (exact per-sequence log-probs, which
TRL 1.16 does not offer for DPO), plus the other switches of pipeline/longctx.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/dpo.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import DPOConfig, DPOTrainer  # noqa: E402

from pipeline.config import cli  # noqa: E402
from pipeline.data import load_train_data  # noqa: E402
from pipeline.longctx import long_context_trainer  # noqa: E402
from pipeline.modeling import (check_model_switches, load_model, load_tokenizer, peft_config,  # noqa: E402
                               resolve_model_path, resolve_ref_path)
from pipeline.training import finished, parse_stage, train_and_save  # noqa: E402


def main(argv: list[str] | None = None) -> dict | None:
    parsed = parse_stage("dpo", DPOConfig, argv)
    if parsed is None:  # --dry_run
        return None
    data_args, training_args, model_args, lc_args, source = parsed
    if (done := finished(training_args)) is not None:  # before anything loads
        return done

    # Model, reference & tokenizer
    path = resolve_model_path(model_args, source)
    check_model_switches(path, model_args, lc_args, source)  # before any weights load
    tokenizer = load_tokenizer(path, model_args)
    model = load_model(path, model_args, training_args)
    ref_path = resolve_ref_path(model_args, source)
    ref_model = load_model(ref_path, model_args, training_args) if ref_path else None

    # Data
    train, evaluation = load_train_data(data_args, "dpo", source, seed=training_args.seed)

    # Training
    trainer_cls = long_context_trainer(DPOTrainer, lc_args, training_args)  # plain TRL if no switch is on
    trainer = trainer_cls(model=model, ref_model=ref_model, args=training_args, train_dataset=train,
                          eval_dataset=evaluation, processing_class=tokenizer, peft_config=peft_config(model_args))
    return train_and_save(trainer, "dpo", data_args)


if __name__ == "__main__":
    cli(main)

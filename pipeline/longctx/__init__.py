"""Memory-efficient long-context training for the SFT and DPO stages (see docs/longctx.md)."""

from pipeline.longctx.trainer import LongContextArguments, check_model, check_switches, long_context_trainer

__all__ = ["LongContextArguments", "check_model", "check_switches", "long_context_trainer"]

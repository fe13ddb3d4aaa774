"""Long-context switches for the SFT and DPO stages, and the trainer class that applies them."""

from __future__ import annotations

import dataclasses
import logging

import torch
import trl.trainer.utils as trl_utils
from torch.distributed.optim import ZeroRedundancyOptimizer
from transformers import TrainerCallback

from pipeline.longctx.fused_forward import wrap_fused_forward
from pipeline.longctx.offload import offload_saved_tensors
from pipeline.longctx.rmsnorm import patch_rmsnorm
from pipeline.longctx.tiled_mlp import patch_tiled_mlp
from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION, check_heads

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LongContextArguments:
    """Recipe switches for long sequences. Padding-free packing is TRL's own `padding_free` key (SFT: TRL's
    implementation; DPO, where TRL 1.16 disables it: ours, exact per-sequence log-probs)."""

    tiled_mlp: bool = dataclasses.field(
        default=True,
        metadata={"help": "Run each decoder MLP over the sequence in tiles of tiled_mlp_tile_tokens tokens, "
                  "recomputed in backward (ALST). Exact; inputs of at most one tile take the plain path."})
    tiled_mlp_tile_tokens: int = dataclasses.field(
        default=4096, metadata={"help": "Tokens per MLP tile (smaller: less memory, more kernel launches)."})
    lean_rmsnorm: bool = dataclasses.field(
        default=True,
        metadata={"help": "RMSNorm saves only its input and the inverse RMS for backward and recomputes the float32 "
                  "normalisation in tiles of tiled_mlp_tile_tokens (transformers' saves a float32 and a bf16 copy "
                  "of the hidden state per norm). Llama, Mistral, Qwen2/3; other norms are kept as they are. "
                  "Exact up to float rounding order; inputs of at most one tile take the plain path."})
    loss_vocab_chunk: int = dataclasses.field(
        default=4096,
        metadata={"help": "Vocabulary columns per tile of TRL's fused LM head + log-prob. TRL 1.16 already tiles "
                  "the tokens (4096 per tile, never the full logits) and the vocabulary by 32768 columns: a "
                  "[4096, 32768] logits buffer in forward and another in backward (0.5 GB each in float32), and "
                  "without Triton (CPU) several more temporaries of that size. Smaller: smaller buffers, more and "
                  "smaller matrix products. Exact."})
    checkpoint_offload: bool = dataclasses.field(
        default=False,
        metadata={"help": "Turn on activation checkpointing (reentrant) and keep the checkpoints (each layer's input) "
                  "and the LM head's saved hidden states in pinned host memory between forward and backward "
                  "(pipeline/longctx/offload.py). GPU only: on CPU activations already live in host memory. Off by "
                  "default: it costs transfer time and pays when GPU memory is the limit (many layers, long rows)."})
    sequence_parallel_size: int = dataclasses.field(
        default=1,
        metadata={"help": "Shard every sequence across this many processes (Ulysses all-to-all attention on "
                  "torch.distributed, SDPA kernels). Must divide the world size and the (KV) head counts."})

    shard_optimizer_state: bool = dataclasses.field(
        default=True,
        metadata={"help": "With DDP over several processes, each keeps the optimizer state (AdamW: 2 floats per "
                  "parameter) of only 1/world of the parameters (ZeRO stage 1 with torch's "
                  "ZeroRedundancyOptimizer; exact). The state is gathered to rank 0 for checkpoints. No effect on "
                  "one process or under DeepSpeed/FSDP, which shard on their own."})

    def __post_init__(self):
        if self.tiled_mlp_tile_tokens < 1:
            raise ValueError("key 'tiled_mlp_tile_tokens' must be >= 1")
        if self.loss_vocab_chunk < 1:
            raise ValueError("key 'loss_vocab_chunk' must be >= 1")
        if self.sequence_parallel_size < 1:
            raise ValueError("key 'sequence_parallel_size' must be >= 1")


def _base(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ShardedOptimizer(ZeroRedundancyOptimizer):
    """ZeRO-1 for DDP runs. accelerate's `prepare` round-trips `state_dict()` on every rank to place the state on the
    device; before the first step there is nothing to gather, so answer with the (empty) global state."""

    def state_dict(self):
        if not self.optim.state:
            return torch.optim.Optimizer.state_dict(self)
        return super().state_dict()


class _ConsolidateOptimizerState(TrainerCallback):
    """Before a checkpoint, gather the sharded optimizer state to rank 0, which writes it (every rank must call)."""

    def __init__(self, optimizer: ZeroRedundancyOptimizer):
        self.optimizer = optimizer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.optimizer.consolidate_state_dict(to=0)


def long_context_trainer(trainer_cls, lc_args: LongContextArguments):
    """`trainer_cls` (TRL's SFTTrainer or DPOTrainer) with the long-context switches of `lc_args` applied."""

    class LongContextTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            training_args = kwargs["args"]
            if lc_args.checkpoint_offload:
                # Reentrant checkpointing saves each layer's input through the saved-tensor hooks that offload it.
                training_args.gradient_checkpointing = True
                training_args.gradient_checkpointing_kwargs = {
                    **(training_args.gradient_checkpointing_kwargs or {}), "use_reentrant": True}
            # Padding-free rows go through our forward (per-sequence attention, no [T, T] mask). TRL 1.16's
            # DPOTrainer ignores padding_free (with a warning): there the packing itself is ours.
            self._pack = getattr(training_args, "padding_free", False)
            if self._pack and hasattr(training_args, "beta"):
                training_args.padding_free = False
            sp = lc_args.sequence_parallel_size
            if sp > 1:
                check_heads(kwargs["model"].config, sp)
            super().__init__(*args, **kwargs)
            # DDP keeps a second copy of every gradient in its all-reduce buckets unless gradients are views of
            # them: one gradient-sized buffer less per process (exact; applied before `train` wraps the model).
            if self.accelerator.ddp_handler is not None:
                self.accelerator.ddp_handler.gradient_as_bucket_view = True
            # TRL exposes no argument for its fused LM head's vocabulary chunk; this module constant is read at
            # every call.
            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = lc_args.loss_vocab_chunk

            self._sp_group, self._sp_on = None, False
            if sp > 1:
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                if world % sp:
                    raise ValueError(f"sequence_parallel_size {sp} must divide the number of processes ({world}); "
                                     "launch with torchrun --nproc_per_node or a MULTI_GPU accelerate config")
                if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                    raise ValueError("sequence_parallel_size > 1 runs on DDP (or one process per group), not "
                                     "DeepSpeed/FSDP: see docs/longctx.md for DeepSpeed's ALST Ulysses path")
                self._sp_group, _ = torch.distributed.new_subgroups(group_size=sp)
            models = [self.model] + ([self.ref_model] if getattr(self, "ref_model", None) is not None else [])
            for model in models:
                base = _base(model)
                if lc_args.tiled_mlp:
                    patch_tiled_mlp(base, lc_args.tiled_mlp_tile_tokens)
                if lc_args.lean_rmsnorm:
                    patch_rmsnorm(base, lc_args.tiled_mlp_tile_tokens)
                if sp > 1 or (self._pack and base.config._attn_implementation == "sdpa"):
                    base.set_attn_implementation(ATTN_IMPLEMENTATION)  # SDPA, per packed sequence / sharded
                if self._pack or sp > 1:
                    wrap_fused_forward(base, pack=self._pack, sp_group=self._sp_group,
                                       sp_active=lambda: self._sp_on)

        def create_optimizer(self, model=None):
            built = self.optimizer is not None
            optimizer = super().create_optimizer(model)
            multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
            if (built or not lc_args.shard_optimizer_state or not multi or self.is_deepspeed_enabled
                    or self.is_fsdp_enabled):
                return optimizer
            cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, self.model if model is None else model)
            if type(optimizer) is not cls or not cls.__module__.startswith("torch.optim") or \
                    {"params", "model", "optimizer_dict"} & set(kwargs):
                logger.warning("shard_optimizer_state: %s is not a plain torch.optim optimizer; kept unsharded",
                               type(optimizer).__name__)
                return optimizer
            if self.args.save_on_each_node:  # the state can be gathered to one rank only, not to one per node
                logger.warning("shard_optimizer_state: save_on_each_node is set; optimizer state kept unsharded")
                return optimizer
            # Same class, arguments and param groups (the trainer's weight-decay split); the state of each
            # parameter lives on one rank, which broadcasts the updated parameter after the step.
            self.optimizer = ShardedOptimizer([dict(g) for g in optimizer.param_groups], optimizer_class=cls,
                                              **kwargs)
            self.add_callback(_ConsolidateOptimizerState(self.optimizer))
            return self.optimizer

        def compute_loss(self, model, inputs, *args, **kwargs):
            if not lc_args.checkpoint_offload:
                return super().compute_loss(model, inputs, *args, **kwargs)
            with offload_saved_tensors():  # forward only: backward unpacks what was saved here
                return super().compute_loss(model, inputs, *args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._sp_group is None:
                return super().training_step(model, inputs, num_items_in_batch)
            # The group works through the micro-batches of all its ranks in turn, each sharded along the sequence,
            # so a step sees the same samples, and (with DDP's averaging) the same gradient as plain data parallel.
            batches = [None] * torch.distributed.get_world_size(self._sp_group)
            local = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
            torch.distributed.all_gather_object(batches, local, group=self._sp_group)
            losses = []
            self._sp_on = True
            try:
                for batch in batches:
                    losses.append(super().training_step(model, batch, num_items_in_batch))
            finally:
                self._sp_on = False
            return torch.stack(losses).mean()

    LongContextTrainer.__name__ = LongContextTrainer.__qualname__ = f"LongContext{trainer_cls.__name__}"
    return LongContextTrainer

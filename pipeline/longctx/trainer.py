"""Long-context switches for the SFT and DPO stages, and the trainer class that applies the ones a recipe turns on.

Every switch is off by default, and with every switch off `long_context_trainer` returns TRL's own trainer class
unchanged: a stage is then plain TRL. Each switch is one opt-in piece:

- `tiled_mlp`: the decoder MLPs run over the sequence in tiles, recomputed in backward (tiled_mlp.py)
- `lean_rmsnorm`: RMSNorm saves its input and one float per token, not float32 copies (rmsnorm.py)
- `loss_vocab_chunk`: TRL's fused LM head tiles the vocabulary in chunks of this many columns (`_vocab_chunk`)
- `checkpoint_offload`: activation checkpoints and the LM head's saved states in host memory (offload.py)
- `padding_free` (DPO): chosen and rejected packed into one row, exact per-sequence scores (fused_forward.py)
- `sequence_parallel_size`: every sequence sharded over this many processes, DeepSpeed's Ulysses attention (ulysses.py),
  under DDP or any DeepSpeed ZeRO stage
- `gradient_as_bucket_view`: DDP's gradients are views of its all-reduce buckets (here)
- `streaming_heads`: train with the attention a head-level KV cache serves: a registry's top heads see everything,
  the others a sink and a recent window (pipeline/kv/streaming_heads.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from pathlib import Path

import torch
import trl.trainer.utils as trl_utils
from transformers.integrations import is_deepspeed_zero3_enabled

from pipeline.kv.streaming_heads import registry_heads, use_streaming_heads
from pipeline.longctx.fused_forward import wrap_fused_forward
from pipeline.longctx.offload import offload_decoder, offload_saved_tensors
from pipeline.longctx.rmsnorm import SUPPORTED as RMSNORM_CLASSES
from pipeline.longctx.rmsnorm import patch_rmsnorm
from pipeline.longctx.tiled_mlp import SUPPORTED_MODEL_TYPES, patch_tiled_mlp
from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION, check_heads

# TRL exposes no argument for its fused LM head's vocabulary chunk; its forward reads this module global at every call
# (pinned by tests/test_longctx_contracts.py).
VOCAB_CHUNK_GLOBAL = "_CHUNKED_LOGPROB_CHUNK_SIZE"


@dataclasses.dataclass
class LongContextArguments:
    """Recipe switches for long sequences, all off by default. Padding-free packing is TRL's own `padding_free` key
    (SFT: TRL's implementation; DPO, where TRL 1.16 ignores it: ours, with exact per-sequence log-probs)."""

    tiled_mlp: bool = dataclasses.field(
        default=False,
        metadata={"help": "Run each decoder MLP over the sequence in tiles of tiled_mlp_tile_tokens tokens, "
                  "recomputed in backward (ALST). Exact (dropout masks are replayed); sequences of at most one tile "
                  "take the plain path. Under DeepSpeed ZeRO-3 the tiles run through DeepSpeed's TiledMLP."})
    tiled_mlp_tile_tokens: int = dataclasses.field(
        default=4096, metadata={"help": "Tokens per MLP / RMSNorm tile (smaller: less memory, more kernel launches)."})
    lean_rmsnorm: bool = dataclasses.field(
        default=False,
        metadata={"help": "RMSNorm saves only its input and the inverse RMS for backward and recomputes the float32 "
                  "normalisation in tiles of tiled_mlp_tile_tokens (transformers' saves a float32 and a bf16 copy "
                  "of the hidden state per norm). Llama, Mistral, Qwen2/3. Exact up to float rounding order; "
                  "sequences of at most one tile take the plain path."})
    loss_vocab_chunk: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Vocabulary columns per tile of TRL's fused LM head + log-prob (null: TRL's 32768). TRL 1.16 "
                  "already tiles the tokens (4096 per tile, never the full logits); a [4096, 32768] logits buffer in "
                  "forward and another in backward are 0.5 GB each in float32, and without Triton (CPU) there are "
                  "several more temporaries of that size. Smaller: smaller buffers, more and smaller matrix "
                  "products. Exact. Set only around this trainer's own forwards."})
    checkpoint_offload: bool = dataclasses.field(
        default=False,
        metadata={"help": "Keep the activation checkpoints (each layer's input, in either checkpointing mode) and the "
                  "LM head's saved hidden states in pinned host memory between forward and backward "
                  "(pipeline/longctx/offload.py). Needs activation checkpointing (gradient_checkpointing: true), "
                  "whose mode the recipe keeps. GPU only: on CPU activations already live in host memory."})
    sequence_parallel_size: int = dataclasses.field(
        default=1,
        metadata={"help": "Shard every sequence across this many processes (DeepSpeed's Ulysses all-to-all attention, "
                  "SDPA per packed sequence in between). Must divide the world size and the query and KV head counts. "
                  "Under DDP or DeepSpeed ZeRO-1/2/3 (with offload), which shard the model states as well."})
    streaming_heads: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A retrieval-head registry (JSON, from pipeline.kv.detect on this model or the one it is "
                  "fine-tuned from): train with the attention HeadKVCache(prefill: local) serves. Its top "
                  "streaming_full_heads KV heads attend to everything, every other KV head only to the first "
                  "streaming_sink and last streaming_window positions, so long-range reads are learnt through "
                  "the heads whose K/V the cache keeps (pipeline/kv/streaming_heads.py)."})
    streaming_full_heads: int = dataclasses.field(default=4, metadata={"help": "KV heads kept whole (count)."})
    streaming_sink: int = dataclasses.field(default=16, metadata={"help": "Sink positions of a streaming head."})
    streaming_window: int = dataclasses.field(default=64, metadata={"help": "Recent positions of a streaming head."})
    gradient_as_bucket_view: bool = dataclasses.field(
        default=False,
        metadata={"help": "DDP: gradients are views of DDP's all-reduce buckets instead of a second copy (one "
                  "gradient-sized buffer less per process; exact)."})

    def __post_init__(self):
        if self.tiled_mlp_tile_tokens < 1:
            raise ValueError("key 'tiled_mlp_tile_tokens' must be >= 1")
        if self.loss_vocab_chunk is not None and self.loss_vocab_chunk < 1:
            raise ValueError("key 'loss_vocab_chunk' must be >= 1")
        if self.sequence_parallel_size < 1:
            raise ValueError("key 'sequence_parallel_size' must be >= 1")
        if self.streaming_full_heads < 0 or self.streaming_sink < 0 or self.streaming_window < 1:
            raise ValueError("keys 'streaming_full_heads' and 'streaming_sink' must be >= 0, 'streaming_window' >= 1")

    def active_on_model(self) -> bool:
        """Whether a switch depends on the model's architecture (checked from its config before loading)."""
        return self.tiled_mlp or self.lean_rmsnorm or self.sequence_parallel_size > 1 or bool(self.streaming_heads)

    def active(self, training_args) -> list[str]:
        """The switches this recipe turns on (DPO's padding_free is ours: TRL 1.16 ignores it)."""
        on = [name for name in ("tiled_mlp", "lean_rmsnorm", "checkpoint_offload", "gradient_as_bucket_view")
              if getattr(self, name)]
        if self.loss_vocab_chunk is not None:
            on.append("loss_vocab_chunk")
        if self.sequence_parallel_size > 1:
            on.append("sequence_parallel_size")
        if self.streaming_heads:
            on.append("streaming_heads")
        if getattr(training_args, "padding_free", False) and hasattr(training_args, "beta"):
            on.append("padding_free")
        return on


def check_switches(lc_args: LongContextArguments, training_args, zero_stage: int | None) -> str | None:
    """The first problem with the recipe's switches, or None. Runs at parse time, before anything loads."""
    sp = lc_args.sequence_parallel_size
    if lc_args.checkpoint_offload and not training_args.activation_checkpointing:
        return ("key 'checkpoint_offload' offloads activation checkpoints: it needs 'gradient_checkpointing: true' "
                "(or activation_checkpointing: true)")
    if sp > 1 and importlib.util.find_spec("deepspeed") is None:
        return ("key 'sequence_parallel_size' > 1 runs on DeepSpeed's Ulysses attention, which is not installed: "
                "pip install 'longctx-align-pipeline[deepspeed]'")
    if sp > 1 and int(os.environ.get("PARALLELISM_CONFIG_SP_SIZE", "1")) > 1:  # set by an accelerate config
        return ("key 'sequence_parallel_size' and the accelerate config's parallelism_config sp_size both shard the "
                "sequence: keep one (docs/longctx.md, 'Which pieces are DeepSpeed's')")
    if sp > 1 and not training_args.average_tokens_across_devices:
        return ("key 'sequence_parallel_size' > 1 needs 'average_tokens_across_devices: true': the ranks of a "
                "sequence-parallel group must scale the shared loss by the same token count")
    if lc_args.streaming_heads and (sp > 1 or getattr(training_args, "padding_free", False)):
        return ("key 'streaming_heads' sets its own attention: it does not combine with padding_free or "
                "sequence_parallel_size > 1 yet")
    if lc_args.streaming_heads and not Path(lc_args.streaming_heads).is_file():
        return f"key 'streaming_heads': registry {lc_args.streaming_heads} not found"
    if lc_args.gradient_as_bucket_view and zero_stage is not None:
        return f"key 'gradient_as_bucket_view' is for DDP: DeepSpeed ZeRO-{zero_stage} keeps its own buffers (drop it)"
    return None


def check_model(config, lc_args: LongContextArguments) -> str | None:
    """The first switch that cannot work on a model with this config, or None (before the weights load)."""
    text = config.get_text_config()
    if (lc_args.tiled_mlp or lc_args.lean_rmsnorm) and text.model_type not in SUPPORTED_MODEL_TYPES:
        key = "tiled_mlp" if lc_args.tiled_mlp else "lean_rmsnorm"
        return (f"key '{key}' supports {', '.join(SUPPORTED_MODEL_TYPES)} models (gated MLP, "
                f"{'/'.join(RMSNORM_CLASSES)}), not model_type '{text.model_type}': set {key}: false")
    if lc_args.sequence_parallel_size > 1:
        try:
            check_heads(config, lc_args.sequence_parallel_size)
        except ValueError as e:
            return f"key 'sequence_parallel_size': {e}"
    if lc_args.streaming_heads:
        from pipeline.kv.detect import load_registry

        try:
            reg = load_registry(lc_args.streaming_heads)
        except ValueError as e:
            return f"key 'streaming_heads': {e}"
        shape = (text.num_hidden_layers, text.num_key_value_heads)
        if (reg["num_layers"], reg["num_kv_heads"]) != shape:
            return (f"key 'streaming_heads': {lc_args.streaming_heads} scores {reg['num_layers']} layers x "
                    f"{reg['num_kv_heads']} KV heads, the model has {shape[0]} x {shape[1]}")
        if not 0 <= lc_args.streaming_full_heads <= shape[0] * shape[1]:
            return f"key 'streaming_full_heads': {lc_args.streaming_full_heads} is not in [0, {shape[0] * shape[1]}]"
    return None


def _base(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _vocab_chunk(size: int | None):
    """TRL's fused-head vocabulary chunk set to `size` for the forwards inside (TRL passes the value it read to its
    autograd function, so backward uses the same), then restored: nothing else in the process sees it."""
    if size is None:
        yield
        return
    previous = getattr(trl_utils, VOCAB_CHUNK_GLOBAL)
    setattr(trl_utils, VOCAB_CHUNK_GLOBAL, size)
    try:
        yield
    finally:
        setattr(trl_utils, VOCAB_CHUNK_GLOBAL, previous)


def long_context_trainer(trainer_cls, lc_args: LongContextArguments, training_args):
    """`trainer_cls` (TRL's SFTTrainer or DPOTrainer) with the switches of `lc_args` that are on; `trainer_cls` itself
    when none is."""
    if not lc_args.active(training_args):
        return trainer_cls

    class LongContextTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            args_ = kwargs["args"]
            # DPO: TRL 1.16 ignores padding_free (with a warning); the packing is ours.
            self._pack = getattr(args_, "padding_free", False)
            if self._pack and hasattr(args_, "beta"):
                args_.padding_free = False
            self._sp_group, self._sp_on = None, False
            sp = lc_args.sequence_parallel_size
            if sp > 1:
                check_heads(kwargs["model"].config, sp)
                world = args_.world_size  # sets up torch.distributed
                if world % sp:
                    raise ValueError(f"sequence_parallel_size {sp} must divide the number of processes ({world}); "
                                     "launch with torchrun --nproc_per_node or a MULTI_GPU accelerate config")
                self._sp_group, _ = torch.distributed.new_subgroups(group_size=sp)
            self._patch(kwargs["model"], kwargs.get("ref_model"), wrap=False)  # before a DPO precompute in __init__
            super().__init__(*args, **kwargs)
            self._patch(self.model, getattr(self, "ref_model", None))  # a reference TRL built, the PEFT wrapper
            if lc_args.gradient_as_bucket_view and self.accelerator.ddp_handler is not None:
                self.accelerator.ddp_handler.gradient_as_bucket_view = True  # read when `train` wraps the model

        def _patch(self, *models, wrap: bool = True):
            """Apply the model switches (idempotent). `wrap`: also the packing / sharding layer, which goes around
            TRL's fused LM head and so only once TRL has added it (in its __init__)."""
            for model in models:
                if model is None:
                    continue
                base = _base(model)
                if lc_args.tiled_mlp:
                    patch_tiled_mlp(base, lc_args.tiled_mlp_tile_tokens)
                if lc_args.lean_rmsnorm:
                    patch_rmsnorm(base, lc_args.tiled_mlp_tile_tokens)
                if lc_args.streaming_heads and not getattr(base, "_streaming_set", False):
                    heads = registry_heads(lc_args.streaming_heads, base, lc_args.streaming_full_heads)
                    use_streaming_heads(base, heads, lc_args.streaming_sink, lc_args.streaming_window,
                                        registry=lc_args.streaming_heads)
                    base._streaming_set = True
                if lc_args.checkpoint_offload and is_deepspeed_zero3_enabled():
                    offload_decoder(base)
                if wrap and (self._sp_group is not None or self._pack) and not getattr(base, "_longctx_wrapped", False):
                    if base.config._attn_implementation == "sdpa" or self._sp_group is not None:
                        base.set_attn_implementation(ATTN_IMPLEMENTATION)  # SDPA, per packed sequence / sharded
                    wrap_fused_forward(base, pack=self._pack, sp_group=self._sp_group, sp_active=lambda: self._sp_on)
                    base._longctx_wrapped = True

        # DPO precomputes reference log-probs inside __init__, after TRL adds its fused LM head: apply the packing /
        # sharding layer there first, so the reference pass runs like training (pinned: tests/test_longctx_contracts).
        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._patch(self.model, self.ref_model)
            with _vocab_chunk(lc_args.loss_vocab_chunk):
                return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model, inputs):  # DPO's reference pass (precompute or evaluation)
            if self._sp_group is None:
                return super().compute_ref_log_probs(model, inputs)
            # Like training_step: the group scores every rank's batch, sharded, and each rank keeps its own.
            results = self._each_group_batch(inputs, lambda batch: super(LongContextTrainer, self)
                                             .compute_ref_log_probs(model, batch))
            return results[torch.distributed.get_rank(self._sp_group)]

        def _each_group_batch(self, inputs, fn):
            batches = [None] * torch.distributed.get_world_size(self._sp_group)
            local = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
            torch.distributed.all_gather_object(batches, local, group=self._sp_group)
            device = next(v.device for v in inputs.values() if torch.is_tensor(v))
            self._sp_on = True
            try:
                return [fn({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                        for batch in batches]
            finally:
                self._sp_on = False

        def compute_loss(self, model, inputs, *args, **kwargs):
            offload = offload_saved_tensors() if lc_args.checkpoint_offload and not is_deepspeed_zero3_enabled() \
                else contextlib.nullcontext()
            with _vocab_chunk(lc_args.loss_vocab_chunk), offload:  # forward only: backward unpacks what was saved
                return super().compute_loss(model, inputs, *args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._sp_group is None:
                return super().training_step(model, inputs, num_items_in_batch)
            # The group works through the micro-batches of all its ranks in turn, each sharded along the sequence,
            # so a step sees the same samples, and (with DDP's or ZeRO's averaging) the same gradient as plain data
            # parallel. DeepSpeed's engine steps at every backward that accelerate marks as a boundary: only the last
            # of the group's backwards may be one (pinned: tests/test_longctx_contracts.py).
            state, boundary = self.accelerator.gradient_state, self.accelerator.sync_gradients
            count = torch.distributed.get_world_size(self._sp_group)

            left = count

            def step(batch):
                nonlocal left
                left -= 1
                state._set_sync_gradients(boundary and left == 0)
                return super(LongContextTrainer, self).training_step(model, batch, num_items_in_batch)

            try:
                losses = self._each_group_batch(inputs, step)
            finally:
                state._set_sync_gradients(boundary)
            return torch.stack(losses).mean()

    LongContextTrainer.__name__ = LongContextTrainer.__qualname__ = f"LongContext{trainer_cls.__name__}"
    return LongContextTrainer

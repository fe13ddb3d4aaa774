"""Offload the activation checkpoints to host memory (ALST's checkpoint offload).

Under activation checkpointing what stays on the GPU between forward and backward is each decoder layer's input
(one hidden state per token per layer: 32 x 8 KB per token for an 8B model, 32 GB at 128k tokens), plus what the
final norm and the LM head save. Both checkpointing modes save the layer input through autograd's saved-tensor hooks
(reentrant: `ctx.save_for_backward`; non-reentrant: the inputs it keeps for the recomputation; tested), so hooks that
copy those tensors to pinned host memory in forward and back in backward move the checkpoints off the GPU. Inside a
checkpointed layer nothing else is kept; the recomputation in backward runs outside the hooks.

Why not the library's: transformers 5.23's `activation_checkpointing_kwargs={"offload": True}` wraps each checkpoint
in torch's `save_on_cpu`, but (1) TRL's DPOTrainer re-enables checkpointing after every reference pass with the args'
kwargs dict, which then hands `offload` on to `torch.utils.checkpoint` ("Unexpected keyword arguments: offload"), and
(2) `save_on_cpu(pin_memory=True)` fails on a machine without an accelerator; it also leaves the LM head's saved
states on the GPU. TRL's `activation_offloading` offloads every saved activation with side streams and a stash of
tensors kept alive for overlap; measured on an H100 it raised the peak (45.8 vs 27.2 GB at 128k tokens). This one
copies on the compute stream: simple and lean, at the price of the transfer time. torch's `save_on_cpu` around the
whole forward would copy every saved tensor, the parameters included (the 1 GB LM-head weight of an 8B model there and
back every step).
"""

from __future__ import annotations

import torch

MIN_BYTES = 1 << 20  # smaller tensors are not worth a transfer
DEVICE_TYPES = ("cuda", "xpu")  # where activations are worth moving to host memory


def offload_saved_tensors(device_types: tuple[str, ...] | None = None, min_bytes: int = MIN_BYTES):
    """Context manager: tensors autograd saves inside it on `device_types`, of at least `min_bytes`, live in host
    memory until backward needs them. Parameters stay where they are (they are not activations)."""
    device_types = DEVICE_TYPES if device_types is None else device_types
    pin = torch.cuda.is_available()

    def pack(t: torch.Tensor):
        if (t.device.type not in device_types or isinstance(t, torch.nn.Parameter)
                or t.numel() * t.element_size() < min_bytes):
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin and t.device.type != "cpu")
        host.copy_(t, non_blocking=True)  # stream-ordered: the GPU block is reused only after the copy
        return t.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True) if device != host.device else host.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def offload_decoder(model) -> None:
    """Offload only what the decoder stack saves (its checkpoints, the final norm), not the LM head's saved tensors:
    under ZeRO-3 the LM head saves its partitioned weight, and a tensor that went through saved-tensor hooks comes back
    as a new tensor without DeepSpeed's attributes, which TRL's fused head needs to gather the weight in backward.
    Idempotent."""
    decoder = model.get_decoder()
    if getattr(decoder, "_longctx_offloaded", False):
        return
    inner = decoder.forward

    def forward(*args, **kwargs):
        with offload_saved_tensors():
            return inner(*args, **kwargs)

    decoder.forward, decoder._longctx_offloaded = forward, True

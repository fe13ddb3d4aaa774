"""Tiled MLP (as in DeepSpeed ALST): the gated MLP runs over the sequence in tiles of `tile_tokens` tokens and keeps
no intermediate activations; backward recomputes each tile and backpropagates it on its own.

At long context the MLP's intermediates (gate, up, act(gate) * up: 3-4 tensors of tokens x intermediate_size, and as
many gradients) are the largest per-layer buffers, larger than attention's with SDPA/flash. Tiling bounds them by
`tile_tokens` instead of the sequence length. The MLP is token-wise, so tiles are exact (same math, same kernels).
"""

from __future__ import annotations

import types

import torch

GATED_MLP = ("gate_proj", "up_proj", "down_proj")  # Llama, Mistral, Qwen2 (and their relatives)


class TiledMLPFunction(torch.autograd.Function):
    """y = mlp(x) computed tile by tile with no saved intermediates; backward recomputes one tile at a time.

    The MLP's trainable parameters are inputs of the function, and their gradients, summed over the tiles, are its
    outputs: autograd then accumulates each parameter's gradient once per backward, as DDP's hooks expect.
    """

    @staticmethod
    def forward(ctx, x, mlp_forward, tile_tokens, *params):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *params)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([mlp_forward(tile) for tile in flat.split(tile_tokens)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(flat) if want_x else None
        grad_params = [None] * len(params)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        for start in range(0, flat.shape[0], ctx.tile_tokens):
            stop = start + ctx.tile_tokens
            tile = flat[start:stop].requires_grad_(want_x)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                out = ctx.mlp_forward(tile)
            grads = torch.autograd.grad(out, ([tile] if want_x else []) + params, grad_flat[start:stop],
                                        allow_unused=True)
            if want_x:
                grad_x[start:stop], grads = grads[0], grads[1:]
            grad_params = [g if acc is None else acc if g is None else acc.add_(g)
                           for acc, g in zip(grad_params, grads)]
        grad_x = grad_x.view_as(x) if want_x else None
        return (grad_x, None, None, *grad_params)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (plain, PEFT-wrapped or DDP/DeepSpeed-wrapped)."""
    inner = model
    while hasattr(inner, "module"):  # DDP / DeepSpeed engine
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__}: no decoder layers found for the long-context patches")
    return list(layers)


def patch_tiled_mlp(model, tile_tokens: int) -> int:
    """Make every decoder layer's gated MLP tiled (`tile_tokens` tokens per tile); returns the number patched.

    Only the MLP instances' `forward` is replaced, so parameter names, checkpoints and PEFT targeting are unchanged.
    Inputs of at most `tile_tokens` tokens take the original path.
    """
    patched = 0
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, name) for name in GATED_MLP):
            raise ValueError(f"tiled_mlp: layer {i} has no gated MLP ({'/'.join(GATED_MLP)}): supported are "
                             "Llama, Mistral and Qwen2-style models; set tiled_mlp: false for this model")
        if getattr(mlp, "_longctx_tiled", False):
            continue
        original = mlp.forward  # the class's forward, bound to this instance

        def tiled_forward(self, x, original=original):
            if x.numel() // x.shape[-1] <= tile_tokens:
                return original(x)
            params = [p for p in self.parameters() if p.requires_grad]
            return TiledMLPFunction.apply(x, original, tile_tokens, *params)

        mlp.forward = types.MethodType(tiled_forward, mlp)
        mlp._longctx_tiled = True
        patched += 1
    return patched

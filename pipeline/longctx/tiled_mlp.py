"""Tiled MLP (as in DeepSpeed ALST): the gated MLP runs over the sequence in tiles of `tile_tokens` tokens and keeps
no intermediate activations; backward recomputes each tile and backpropagates it on its own.

At long context the MLP's intermediates (gate, up, act(gate) * up: 3-4 tensors of tokens x intermediate_size, and as
many gradients) are the largest per-layer buffers, larger than attention's with SDPA/flash. Tiling bounds them by
`tile_tokens` instead of the sequence length. The MLP is token-wise, so tiles are exact (same math, same kernels).

Dropout inside the MLP (LoRA's `lora_dropout` on gate/up/down) draws random masks: each tile's recomputation replays the
RNG state its forward started from (as `torch.utils.checkpoint(preserve_rng_state=True)` does), so backward sees the
forward's masks. Under DeepSpeed ZeRO-3 the parameters are partitioned outside their module's forward, so there the
tiles run through DeepSpeed's own `TiledMLP`, which accumulates the gradients into the partitioned parameters and
tells ZeRO when they are ready; every rank then agrees on the number of tiles, since each tile gathers parameters
collectively.
"""

from __future__ import annotations

import contextlib
import types

import torch

GATED_MLP = ("gate_proj", "up_proj", "down_proj")  # Llama, Mistral, Qwen2/3 (and their relatives)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _TileRNG:
    """The RNG state before each tile's forward, replayed for that tile's recomputation in backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: list = []

    def record(self) -> None:
        accel = self.device.type != "cpu" and hasattr(torch, self.device.type)
        self.states.append((torch.get_rng_state(),
                            getattr(torch, self.device.type).get_rng_state(self.device) if accel else None))

    @contextlib.contextmanager
    def replay(self, i: int):
        cpu_state, device_state = self.states[i]
        devices = [self.device] if device_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                getattr(torch, self.device.type).set_rng_state(device_state, self.device)
            yield


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
        ctx.rng = _TileRNG(x.device)
        ctx.save_for_backward(x, *params)
        flat = x.reshape(-1, x.shape[-1])
        outs = []
        with torch.no_grad():
            for tile in flat.split(tile_tokens):
                ctx.rng.record()
                outs.append(mlp_forward(tile))
        out = torch.cat(outs)
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
        for i, start in enumerate(range(0, flat.shape[0], ctx.tile_tokens)):
            stop = start + ctx.tile_tokens
            tile = flat[start:stop].requires_grad_(want_x)
            with ctx.rng.replay(i), torch.enable_grad(), \
                    torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                out = ctx.mlp_forward(tile)
            grads = torch.autograd.grad(out, ([tile] if want_x else []) + params, grad_flat[start:stop],
                                        allow_unused=True)
            if want_x:
                grad_x[start:stop], grads = grads[0], grads[1:]
            grad_params = [g if acc is None else acc if g is None else acc.add_(g)
                           for acc, g in zip(grad_params, grads)]
        grad_x = grad_x.view_as(x) if want_x else None
        return (grad_x, None, None, *grad_params)


def _agreed_tiles(mlp, x, tile_tokens: int) -> tuple[int, bool]:
    """(tiles, zero3). Under ZeRO-3 (partitioned parameters) every tile gathers the MLP's weights collectively, so all
    ranks must run the same number of tiles: they take the largest."""
    tiles = -(-x.shape[-2] // tile_tokens)
    zero3 = any(hasattr(p, "ds_id") for p in mlp.parameters())
    if zero3 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        agreed = torch.tensor(tiles, device=x.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        tiles = int(agreed)
    return tiles, zero3


def _zero3_tiled(mlp, original, x, tiles: int):
    """DeepSpeed's TiledMLP (ZeRO-3 aware) over `tiles` sequence tiles, replaying each tile's RNG state."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    rng, calls = _TileRNG(x.device), [0]

    def fn(module, tile):  # called once per tile in forward (no grad), then once per tile in backward, in order
        if not torch.is_grad_enabled():
            rng.record()
            return original(tile)
        i, calls[0] = calls[0], calls[0] + 1
        with rng.replay(i):
            return original(tile)

    params = [p for p in mlp.parameters() if p.requires_grad]
    # DeepSpeed splits with torch.chunk, which gives fewer than `tiles` pieces unless the length is a multiple of it
    # (9 tokens in 4 tiles: 3 pieces); every rank must run exactly `tiles`, so pad with zero rows, sliced off after
    # (their gradient is zero).
    length = x.shape[-2]
    pad = -length % tiles
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    out = TiledMLP.apply(fn, mlp, x, tiles, params)
    return out[..., :length, :] if pad else out


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
    Sequences of at most `tile_tokens` tokens take the original path (the decision is per sequence, i.e. on the
    row length, not batch x length: short rows in a large batch stay on the plain path).
    """
    patched = 0
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, name) for name in GATED_MLP):
            raise ValueError(f"tiled_mlp: layer {i} has no gated MLP ({'/'.join(GATED_MLP)}): supported are "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} models; set tiled_mlp: false for this model")
        if getattr(mlp, "_longctx_tiled", False):
            continue
        original = mlp.forward  # the class's forward, bound to this instance

        def tiled_forward(self, x, original=original):
            tiles, zero3 = _agreed_tiles(self, x, tile_tokens)
            if tiles <= 1:
                return original(x)
            if not torch.is_grad_enabled():  # a reference pass, evaluation, a reentrant checkpoint's first pass
                # exactly `tiles` calls (some empty if this rank's sequence is shorter): ZeRO-3 ranks stay in step
                return torch.cat([original(tile) for tile in x.tensor_split(tiles, dim=-2)], dim=-2)
            if zero3:
                return _zero3_tiled(self, original, x, tiles)
            params = [p for p in self.parameters() if p.requires_grad]
            return TiledMLPFunction.apply(x, original, tile_tokens, *params)

        mlp.forward = types.MethodType(tiled_forward, mlp)
        mlp._longctx_tiled = True
        patched += 1
    return patched

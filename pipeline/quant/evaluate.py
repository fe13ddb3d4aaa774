"""Tiny models with a planted super weight, and the fidelity measures used to judge quantization.

Super weights do not emerge in models trained for minutes on CPU, so we build the mechanism by hand, the
way it looks in Llama: the first token (BOS) carries a flag that a layer's MLP turns into one huge
intermediate activation (gate_proj/up_proj rows `col`), and one large down_proj weight [row, col] writes
it into residual dimension `row` (the super activation). The model is then trained on a copy task WITH the
mechanism held in place, so its later layers learn in its presence. Whether they come to depend on it is
measured (zeroing it vs a magnitude-matched null), not assumed.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.quant.detect import down_projs, mean_kl
from pipeline.quant.registry import SuperWeight


@dataclasses.dataclass(frozen=True)
class Plant:
    layer: int = 0
    row: int = 17  # residual dimension of the super activation
    col: int = 100  # intermediate channel of the huge activation
    flag: int = 5  # residual dimension that marks BOS
    flag_value: float = 10.0  # its embedding value on BOS (0 on every other token)
    norm_gain: float = 20.0  # post_attention_layernorm weight on the flag dimension
    gate: float = 0.12  # gate/up weights reading the flag (RMSNorm makes the one-hot flag ~sqrt(hidden) x
    #                     norm_gain large, so wider models want a smaller value)
    value: float = 32.0  # the super weight (~100x the largest other weights of a trained tiny model)


@torch.no_grad()
def plant_super_weight(model, bos_id: int, p: Plant) -> SuperWeight:
    """Write (or re-impose, after an optimizer step) the BOS -> super activation circuit."""
    emb = model.get_input_embeddings().weight
    emb[:, p.flag] = 0
    emb[bos_id] = 0  # BOS is the flag alone, so its normalized size cannot be diluted by training
    emb[bos_id, p.flag] = p.flag_value
    layer = model.model.layers[p.layer]
    layer.post_attention_layernorm.weight[p.flag] = p.norm_gain
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
        proj.weight[:, p.flag] = 0  # only channel `col` may read the amplified flag (else training
        proj.weight[p.col] = 0      # grows a second, spread-out spike from it)
        proj.weight[p.col, p.flag] = p.gate
    layer.mlp.down_proj.weight[p.row, p.col] = p.value
    return SuperWeight(p.layer, p.row, p.col, float(layer.mlp.down_proj.weight[p.row, p.col]))


def copy_task_ids(tokenizer, n: int, digits: int = 12, seed: int = 0) -> torch.Tensor:
    """(n, 2*digits+2) ids of `BOS d1..dk = d1..dk`: the second half is predictable only by attending back."""
    vocab = tokenizer.convert_tokens_to_ids(list("0123456789="))
    if any(v is None or v == tokenizer.unk_token_id for v in vocab):
        raise ValueError("tokenizer has no single-character digit tokens")
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(vocab[:10])[torch.randint(0, 10, (n, digits), generator=g)]
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    eq = torch.full((n, 1), vocab[10])
    return torch.cat([bos, d, eq, d], 1)


def train_lm(model, ids: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 32, seed: int = 0,
             after_step=None, log_every: int = 0, probe=None) -> list[dict]:
    """A plain AdamW loop on next-token loss. `after_step()` runs after every update (re-imposes a plant);
    `probe()` -> dict is logged every `log_every` steps."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    log = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, ids.shape[0], (batch,), generator=g).to(ids.device)
        loss = model(input_ids=ids[idx], labels=ids[idx]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        if log_every and (step % log_every == 0 or step == steps):
            log.append({"step": step, "loss": loss.item()} | (probe() if probe else {}))
    model.eval()
    return log


@torch.no_grad()
def super_activation(model, ids: torch.Tensor, sw: SuperWeight) -> float:
    """Mean over sequences of the super weight layer's down_proj output at (token 0, row)."""
    got = {}

    def hook(module, args, out):
        got["y"] = out[:, 0, sw.row]

    h = down_projs(model)[sw.layer].register_forward_hook(hook)
    try:
        model(input_ids=ids.to(model.device))
    finally:
        h.remove()
    return got["y"].float().mean().item()


@torch.no_grad()
def fidelity(model, ids: torch.Tensor, ref_logits: torch.Tensor | None = None, sw: SuperWeight | None = None,
             ref_sa: float | None = None) -> dict:
    """NLL, copy accuracy (second half, greedy next-token), KL to reference logits, super-activation error."""
    ids = ids.to(model.device)
    logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    half = (ids.shape[1] - 2) // 2
    pred = logits[:, -half - 1:-1].argmax(-1)
    out = {"nll": nll.item(), "copy_acc": (pred == ids[:, -half:]).float().mean().item()}
    if ref_logits is not None:
        out["kl"] = mean_kl(ref_logits, logits)
    if sw is not None:
        sa = super_activation(model, ids, sw)
        out["super_activation"] = sa
        if ref_sa:
            out["sa_rel_err"] = abs(sa - ref_sa) / abs(ref_sa)
    return out

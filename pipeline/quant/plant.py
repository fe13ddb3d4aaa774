"""Tiny models with a planted super weight, trained with it in place.

Super weights do not emerge in models trained for minutes on CPU, and a naively planted one is not depended
on, so we build the mechanism by hand, the way it looks in Llama: the first token (BOS) carries a flag that a
layer's MLP turns into one huge intermediate activation (gate_proj/up_proj rows `col`), and one large
down_proj weight [row, col] writes it into residual dimension `row` (the super activation). The model is then
trained on a copy task WITH the circuit re-imposed after every step, so its later layers learn in its
presence. Whether they come to depend on it is measured (zeroing it vs a magnitude-matched null), not assumed.

    python -m pipeline.quant.plant --model_name_or_path outputs/tiny/base --output_dir outputs/tiny/base_sw
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.config import RecipeError, cli, parse
from pipeline.io import read_stage_result, write_stage_result
from pipeline.quant.registry import SuperWeight

logger = logging.getLogger(__name__)


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


@dataclasses.dataclass
class PlantArguments:
    model_name_or_path: str = dataclasses.field(default="", metadata={"help": "Llama-style model to plant into."})
    output_dir: str = dataclasses.field(default="", metadata={"help": "Where the planted (and trained) copy goes."})
    layer: int = dataclasses.field(
        default=0, metadata={"help": "Layer 0 is the robust choice: in deeper layers training grows BOS's residual "
                             "and dilutes the flag (seen at hidden 128)."})
    row: int = 17
    col: int = 100
    flag: int = 5
    value: float = 32.0
    gate: float = 0.12
    train_steps: int = dataclasses.field(
        default=300, metadata={"help": "Copy-task steps with the circuit held in place (0: plant only)."})
    learning_rate: float = 1.5e-3
    seed: int = 0

    def __post_init__(self):
        if not self.model_name_or_path or not self.output_dir:
            raise ValueError("keys 'model_name_or_path' and 'output_dir' are required")
        if self.row == self.flag:
            raise ValueError("key 'row' must differ from 'flag'")


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, _ = parse([PlantArguments], argv, prog="python -m pipeline.quant.plant")
    out = Path(args.output_dir)
    if read_stage_result(out) is not None:
        logger.info("%s already planted", out)
        return out
    if not Path(args.model_name_or_path).exists():
        raise RecipeError(f"key 'model_name_or_path': {args.model_name_or_path} not found (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quant.evaluate import fidelity

    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    c = model.config
    for key, limit in (("layer", c.num_hidden_layers), ("row", c.hidden_size), ("flag", c.hidden_size),
                       ("col", c.intermediate_size)):
        if not 0 <= getattr(args, key) < limit:
            raise RecipeError(f"key '{key}' = {getattr(args, key)} is outside [0, {limit}) for this model")
    plant = Plant(layer=args.layer, row=args.row, col=args.col, flag=args.flag, value=args.value, gate=args.gate)
    torch.manual_seed(args.seed)
    sw = plant_super_weight(model, tok.bos_token_id, plant)
    train_lm(model, copy_task_ids(tok, 2048, seed=args.seed), args.train_steps, lr=args.learning_rate,
             seed=args.seed, after_step=lambda: plant_super_weight(model, tok.bos_token_id, plant))
    ev = copy_task_ids(tok, 128, seed=args.seed + 1)
    intact = fidelity(model, ev, sw=sw)
    with torch.no_grad():
        model.model.layers[sw.layer].mlp.down_proj.weight[sw.row, sw.col] = 0
        zeroed = fidelity(model, ev)
        model.model.layers[sw.layer].mlp.down_proj.weight[sw.row, sw.col] = sw.value
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Training can shrink the planted spike below what detection accepts; say so here, not two stages later.
    from pipeline.quant.detect import DEFAULT_PROMPT, detect_super_weights, encode_prompt

    found, _ = detect_super_weights(model, encode_prompt(tok, DEFAULT_PROMPT))
    detected = any((f.layer, f.row, f.col) == (sw.layer, sw.row, sw.col) for f in found)
    if not detected:
        logger.warning("the planted super weight %s is not detected (detect_super_weights found %s): raise 'gate' "
                       "or 'train_steps'", (sw.layer, sw.row, sw.col), found)
    metrics = {"super_activation": intact["super_activation"], "nll": intact["nll"], "copy_acc": intact["copy_acc"],
               "nll_sw_zeroed": zeroed["nll"], "copy_acc_sw_zeroed": zeroed["copy_acc"], "detected": int(detected)}
    write_stage_result(out, "plant_super_weight", metrics, {"model": str(out)})
    logger.info("planted %s -> %s: %s", (sw.layer, sw.row, sw.col), out, metrics)
    return out


if __name__ == "__main__":
    cli(main)

"""Find retrieval heads: Wu et al.'s retrieval score, masking ablation, and the registry file.

Wu score: decode greedily with attention weights; at every step whose emitted token occurs in the
needle span, a query head scores 1/len(needle) when its top-1 attention position lies in the span and
holds that very token. Averaged over the prompts answered correctly. A KV head's score is the max over
the query heads of its group (GQA).

Ablation: a head gets uniform attention (its query is zeroed, so every allowed key scores 0), through
a forward hook on `q_proj`; no model code is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from pipeline.io import atomic_write_json, model_fingerprint
from pipeline.kv.evaluate import answer_of, prompt_text, reply_tokens


@torch.no_grad()
def head_hits(model, input_ids: list[int], needle: tuple[int, int], max_new_tokens: int, eos_id: int | None = None):
    """Greedy decode of one prompt with attention weights.

    Returns (generated ids, hits [L, H]) where hits[l, h] = sum over copy steps of 1/len(needle) for
    heads whose top-1 attention lands on the needle token just emitted.
    """
    cfg = model.config
    lo, hi = needle
    hits = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)  # on CPU, whatever the model's device
    ids = torch.tensor([input_ids], device=model.device)
    needle_ids = ids[0, lo:hi]
    cache = DynamicCache(config=cfg)
    out = model(input_ids=ids, past_key_values=cache, output_attentions=True, use_cache=True)
    generated = []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        generated.append(tok)
        if tok in needle_ids.tolist():
            for layer, att in enumerate(out.attentions):  # att: [1, H, q, kv]
                top = att[0, :, -1].argmax(-1)  # [H]
                in_span = (top >= lo) & (top < hi)
                same = ids[0, top.clamp(max=ids.shape[1] - 1)] == tok
                hits[layer] += (in_span & same).float().cpu() / (hi - lo)
        if eos_id is not None and tok == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[tok]], device=ids.device)], dim=1)
        out = model(input_ids=ids[:, -1:], past_key_values=cache, output_attentions=True, use_cache=True)
    return generated, hits


def needle_span(tokenizer, text: str, needle: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `text` and the [lo, hi) token span covering the characters of `needle` in it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(needle)
    end = start + len(needle)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return enc["input_ids"], (toks[0], toks[-1] + 1)


def wu_scores(model, tokenizer, examples, max_new_tokens: int | None = None, chat: bool = False,
              system_prompt: str | None = None) -> dict:
    """Retrieval score per (layer, query head) over `examples` (needle = the answer's text in the prompt). With
    `chat`, the prompt goes through the chat template and the reply (which may quote the needle sentence first)
    counts where it ends on the right `Answer:` line."""
    from pipeline.kv.streaming_heads import use_declared_attention

    # a model trained with streaming heads is scored with the attention it was trained for (weights included)
    if not use_declared_attention(model, weights=True) and model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # attention weights are needed
    model.eval()
    total = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads)
    n_ok = 0
    for ex in examples:
        text = prompt_text(tokenizer, ex, chat, system_prompt)
        ids, span = needle_span(tokenizer, text, ex.answer)
        n = max_new_tokens or (reply_tokens(tokenizer, ex) + 8 if chat else span[1] - span[0] + 2)
        gen, hits = head_hits(model, ids, span, n, tokenizer.eos_token_id)
        if answer_of(tokenizer.decode(gen, skip_special_tokens=True), chat) == ex.answer:
            total += hits
            n_ok += 1
    scores = total / max(n_ok, 1)
    return {"scores": scores.tolist(), "n_prompts": len(examples), "n_success": n_ok}


def kv_scores(scores: list[list[float]], num_kv_heads: int) -> list[list[float]]:
    """GQA: a KV head scores the max over its query heads."""
    out = []
    for row in scores:
        g = len(row) // num_kv_heads
        out.append([max(row[k * g:(k + 1) * g]) for k in range(num_kv_heads)])
    return out


def top_heads(kv: list[list[float]], k: int) -> list[tuple[int, int]]:
    """The k highest-scoring (layer, kv_head) pairs, best first (ties broken by position)."""
    flat = [(s, l, h) for l, row in enumerate(kv) for h, s in enumerate(row)]
    flat.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(l, h) for _, l, h in flat[:k]]


def heads_by_layer(heads: list[tuple[int, int]], num_layers: int) -> list[list[int]]:
    out = [[] for _ in range(num_layers)]
    for l, h in heads:
        out[l].append(h)
    return out


def random_heads(num_layers: int, num_kv_heads: int, k: int, seed: int, exclude=()) -> list[tuple[int, int]]:
    pool = [(l, h) for l in range(num_layers) for h in range(num_kv_heads) if (l, h) not in set(exclude)]
    return random.Random(seed).sample(pool, k)


@contextlib.contextmanager
def masked_heads(model, heads: list[tuple[int, int]]):
    """Uniform attention for the given (layer, query head) pairs while the context is open."""
    d = model.config.hidden_size // model.config.num_attention_heads
    d = getattr(model.config, "head_dim", None) or d
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    handles = []
    for l, hs in by_layer.items():
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])

        def hook(_module, _inputs, output, cols=cols):
            output = output.clone()
            output[..., cols] = 0.0
            return output
        handles.append(model.model.layers[l].self_attn.q_proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for hnd in handles:
            hnd.remove()


def query_heads_of(kv_heads: list[tuple[int, int]], groups: int) -> list[tuple[int, int]]:
    return [(l, h * groups + g) for l, h in kv_heads for g in range(groups)]


def save_registry(path, model, method: str, scores: list[list[float]], settings: dict, model_path: str = "") -> dict:
    num_kv = model.config.num_key_value_heads
    reg = {
        "format": "retrieval-heads/v1",
        "method": method,
        "model": model_path,
        "fingerprint": model_fingerprint(model),
        "num_layers": model.config.num_hidden_layers,
        "num_heads": model.config.num_attention_heads,
        "num_kv_heads": num_kv,
        "scores": scores,
        "kv_scores": kv_scores(scores, num_kv) if len(scores[0]) != num_kv else scores,
        "settings": settings,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(path, reg)
    return reg


def load_registry(path, model=None, same_weights: bool = True) -> dict:
    """Read a registry; with `model`, refuse one computed for another model (shape mismatch and, with
    `same_weights`, fingerprint mismatch: False for a model fine-tuned from the scored one)."""
    path = Path(path)
    try:
        reg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: registry file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    for key in ("format", "scores", "kv_scores", "num_layers", "num_kv_heads", "fingerprint"):
        if key not in reg:
            raise ValueError(f"{path}: key '{key}' missing (not a retrieval-heads registry)")
    if model is not None:
        cfg = model.config
        if (reg["num_layers"], reg["num_kv_heads"]) != (cfg.num_hidden_layers, cfg.num_key_value_heads):
            raise ValueError(f"{path}: key 'num_layers'/'num_kv_heads' ({reg['num_layers']}, {reg['num_kv_heads']}) "
                             f"do not match the model ({cfg.num_hidden_layers}, {cfg.num_key_value_heads})")
        if same_weights and reg["fingerprint"] != model_fingerprint(model):
            raise ValueError(f"{path}: key 'fingerprint' {reg['fingerprint']} is not this model's "
                             f"({model_fingerprint(model)}); re-run detection")
    return reg


def plot_scores(path, scores: list[list[float]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(scores[0]), 1 + 0.5 * len(scores)))
    im = ax.imshow(scores, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(scores[0])))
    ax.set_yticks(range(len(scores)))
    for l, row in enumerate(scores):
        for h, s in enumerate(row):
            ax.text(h, l, f"{s:.2f}", ha="center", va="center", color="w" if s < 0.5 * max(map(max, scores)) else "k",
                    fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# As a stage: detect on a model, compare with another model's registry (what alignment did to the heads)
#   python -m pipeline.kv.detect --model_name_or_path outputs/tiny/dpo --output_dir outputs/tiny/heads \
#       --compare_with data/models/demo-base/retrieval_heads.json
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DetectArguments:
    model_name_or_path: str = dataclasses.field(metadata={"help": "Model whose retrieval heads are scored."})
    output_dir: str = dataclasses.field(metadata={"help": "Writes retrieval_heads.json (+ .png) and stage_result.json."})
    compare_with: str | None = dataclasses.field(
        default=None, metadata={"help": "Another model's registry: report the overlap of the top_k heads."})
    top_k: int = dataclasses.field(default=4, metadata={"help": "KV heads compared (the NIAH stage's full_heads)."})
    lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512])
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5, 0.9])
    per_cell: int = 4
    key_digits: int = 5
    chat: bool = dataclasses.field(default=False, metadata={
        "help": "Ask through the chat template (an aligned chat model) instead of the raw document (a base model)."})
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "With chat: the system message."})
    stage: str = "retrieval_heads"

    def __post_init__(self):
        if self.top_k < 1 or self.per_cell < 1 or not self.lengths or min(self.lengths) < 64:
            raise ValueError("keys 'top_k' and 'per_cell' must be >= 1 and 'lengths' list lengths >= 64")


def main(argv: list[str] | None = None) -> dict:
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import RecipeError, parse
    from pipeline.io import write_stage_result
    from pipeline.kv.evaluate import prompt_text, words_for_tokens
    from pipeline.modeling import check_model_path
    from pipeline.tasks.needle import Passkey

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([DetectArguments], argv, prog="python -m pipeline.kv.detect")
    check_model_path(args.model_name_or_path, source)
    other = None
    if args.compare_with:
        try:
            other = load_registry(args.compare_with)
        except ValueError as e:
            raise RecipeError(f"{source}: key 'compare_with': {e}") from None
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    words = {n: words_for_tokens(tok, n, lambda e: prompt_text(tok, e, args.chat, args.system_prompt))
             for n in args.lengths}
    exs = [Passkey(key_digits=args.key_digits).make(random.Random(f"detect/{n}/{d}/{i}"), words[n], d)
           for n in args.lengths for d in args.depths for i in range(args.per_cell)]
    t0 = time.time()
    res = wu_scores(model, tok, exs, chat=args.chat, system_prompt=args.system_prompt)
    out = Path(args.output_dir)
    reg = save_registry(out / "retrieval_heads.json", model, "wu", res["scores"], {
        "lengths": args.lengths, "depths": args.depths, "per_cell": args.per_cell, "n_prompts": res["n_prompts"],
        "n_success": res["n_success"], "seconds": round(time.time() - t0, 1)}, args.model_name_or_path)
    plot_scores(out / "retrieval_heads.png", reg["kv_scores"], f"Wu retrieval score per KV head: {args.model_name_or_path}")
    top = top_heads(reg["kv_scores"], args.top_k)
    metrics = {"passkey_solved": res["n_success"] / res["n_prompts"], "top_score": max(map(max, reg["kv_scores"])),
               "top_heads": " ".join(f"L{l}H{h}" for l, h in top)}
    if other is not None:
        if (other["num_layers"], other["num_kv_heads"]) != (reg["num_layers"], reg["num_kv_heads"]):
            raise RecipeError(f"{source}: key 'compare_with': {args.compare_with} is for another shape")
        theirs = top_heads(other["kv_scores"], args.top_k)
        metrics[f"top{args.top_k}_overlap"] = len(set(top) & set(theirs)) / args.top_k
        metrics["compared_top_heads"] = " ".join(f"L{l}H{h}" for l, h in theirs)
    write_stage_result(out, args.stage, metrics, {"registry": str(out / "retrieval_heads.json")})
    logging.getLogger(__name__).info("retrieval heads: %s", metrics)
    return metrics


if __name__ == "__main__":
    from pipeline.config import cli

    cli(main)

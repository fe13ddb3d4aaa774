"""Stage: super weights of a trained model, and what 4-bit quantization does to it with and without them kept exact.

    python -m pipeline.quant.compare --config recipes/tiny/quant.yaml [--model_name_or_path outputs/tiny/dpo]

Detects the super weights on the full-precision model (one forward pass, confirmed against a magnitude-matched
null), then reports held-out task accuracy and the NLL of held-out reference replies for: fp; fp with the super
weights zeroed (is the model causally dependent on them?); INT4 RTN plain; INT4 RTN with outlier clipping; INT4
RTN with clipping and the super weights restored; bitsandbytes NF4 plain; NF4 with the super weights held out.
Writes the SW-preserving RTN model (fake-quantized weights) and the registry the NF4 loader reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.config import RecipeError, cli, parse
from pipeline.io import atomic_write_json, write_stage_result

logger = logging.getLogger(__name__)


VARIANTS = ("fp", "fp_sw_zeroed", "rtn", "rtn_clip", "rtn_clip_restore_sw", "nf4", "nf4_keep_sw")


@dataclasses.dataclass
class CompareArguments:
    model_name_or_path: str = dataclasses.field(metadata={"help": "Full-precision model to detect and quantize."})
    output_dir: str = dataclasses.field(metadata={"help": "quant.json, super_weights.json, rtn_sw/ (the model)."})
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add", "copy", "reverse", "sort", "kv_lookup",
                                                                  "multihop"])
    n: int = dataclasses.field(default=200, metadata={"help": "Held-out examples per task."})
    system_prompt: str | None = None
    max_new_tokens: int = 128
    batch_size: int = 64
    bits: int = 4
    block: list[int] = dataclasses.field(default_factory=lambda: [16, 16])
    clip_zscore: float = 3.0
    nf4: bool = dataclasses.field(default=True, metadata={"help": "Also the bitsandbytes NF4 variants."})
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS), metadata={
        "help": f"Which to score (fp always): {', '.join(VARIANTS)}."})

    def __post_init__(self):
        if self.n < 1 or not 2 <= self.bits <= 8 or len(self.block) != 2 or min(self.block) < 1:
            raise ValueError("keys 'n' >= 1, 'bits' in [2, 8] and 'block' (two sizes >= 1) are required")
        if not self.clip_zscore > 0:
            raise ValueError(f"key 'clip_zscore' must be > 0 (standard deviations), got {self.clip_zscore}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"key 'variants': unknown {bad} (valid: {', '.join(VARIANTS)})")


def reply_nll(model, tokenizer, examples, system_prompt) -> float:
    """Mean per-token NLL of the oracle's worked-steps replies to held-out questions (reply tokens only)."""
    import torch

    from pipeline.generation.teachers import render
    from pipeline.tasks import to_prompt

    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            prompt = tokenizer.apply_chat_template(to_prompt(e, system_prompt), add_generation_prompt=True, tokenize=False)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(render(e, "steps") + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + r], device=model.device)
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="sum").item()
            count += len(r)
    return total / count


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([CompareArguments], argv, prog="python -m pipeline.quant.compare")
    from pipeline.modeling import check_model_path

    check_model_path(args.model_name_or_path, source)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluate import accuracy, held_out, score
    from pipeline.kv.streaming_heads import use_declared_attention
    from pipeline.quant.detect import confirm_super_weights, detect_super_weights, down_projs, encode_prompt, DEFAULT_PROMPT
    from pipeline.quant.qlora import load_quantized_preserving_super_weights
    from pipeline.quant.registry import make_registry, save_registry
    from pipeline.quant.rtn import quantize_model_rtn

    t0 = time.time()
    path, out = args.model_name_or_path, Path(args.output_dir)
    tok = AutoTokenizer.from_pretrained(path)
    examples = held_out(args.tasks, args.n)
    nll_examples = held_out(args.tasks, 20, split="dev")

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        use_declared_attention(model)  # a model trained with streaming heads runs with them
        return model

    def measure(model) -> dict:
        acc = accuracy(score(model, tok, examples, args.system_prompt, args.batch_size, args.max_new_tokens))
        return {"accuracy": round(acc["accuracy/mean"], 4), "nll": round(reply_nll(model, tok, nll_examples, args.system_prompt), 4),
                **{k.split("/")[1]: round(v, 4) for k, v in acc.items() if k != "accuracy/mean"}}

    fp = load()
    ids = encode_prompt(tok, DEFAULT_PROMPT)
    sws, trace = detect_super_weights(fp, ids)
    confirmation = confirm_super_weights(fp, sws, ids) if sws else None
    registry = make_registry(fp, sws, name_or_path=path, detection=trace, confirmation=confirmation)
    reg_path = save_registry(registry, out / "super_weights.json")
    logger.info("super weights: %s", [(s.layer, s.row, s.col, s.value) for s in sws])
    variants = {"fp": measure(fp)}
    if sws and "fp_sw_zeroed" in args.variants:
        projs = down_projs(fp)
        with torch.no_grad():
            for s in sws:
                projs[s.layer].weight[s.row, s.col] = 0
        variants["fp_sw_zeroed"] = measure(fp)
    block = tuple(args.block)
    rtn = {"rtn": dict(clip=None), "rtn_clip": dict(clip="zscore", clip_value=args.clip_zscore),
           "rtn_clip_restore_sw": dict(clip="zscore", clip_value=args.clip_zscore, super_weights=sws)}
    for name, kw in rtn.items():
        if name not in args.variants and name != "rtn_clip_restore_sw":  # the artifact is always written
            continue
        m = load()
        with torch.no_grad():
            quantize_model_rtn(m, args.bits, block, **kw)
        if name in args.variants:
            variants[name] = measure(m)
        if name == "rtn_clip_restore_sw":  # the artifact: fp32 storage of the dequantized INT4 weights
            tmp = Path(tempfile.mkdtemp(prefix=".rtn_sw.", dir=out))
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            shutil.copy(reg_path, tmp / "super_weights.json")
            if (out / "rtn_sw").exists():
                shutil.rmtree(out / "rtn_sw")
            os.replace(tmp, out / "rtn_sw")
    if args.nf4:
        from transformers import BitsAndBytesConfig

        from pipeline.quant.qlora import disable_cpu_packing

        if "nf4" in args.variants:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4")).eval()
            disable_cpu_packing(m)
            use_declared_attention(m)
            variants["nf4"] = measure(m)
        if sws and "nf4_keep_sw" in args.variants:
            m, _ = load_quantized_preserving_super_weights(path, registry_path=str(reg_path))
            use_declared_attention(m)
            variants["nf4_keep_sw"] = measure(m.eval())
    metrics = {"super_weights": len(sws), "confirmed": int(bool(confirmation and confirmation["confirmed"]))}
    if sws:
        metrics["super_weight"] = f"L{sws[0].layer} [{sws[0].row},{sws[0].col}] = {sws[0].value:.4g}"
    for name, v in variants.items():
        metrics[f"quant_accuracy/{name}"] = v["accuracy"]
        metrics[f"quant_nll/{name}"] = v["nll"]
    atomic_write_json(out / "quant.json", {"model": path, "args": dataclasses.asdict(args), "variants": variants,
                                           "super_weights": [dataclasses.asdict(s) for s in sws],
                                           "confirmation": confirmation, "seconds": round(time.time() - t0, 1)})
    write_stage_result(out, "quant", metrics, {
        "report": str(out / "quant.json"), "registry": str(reg_path), "rtn_sw_model": str(out / "rtn_sw"),
        "nf4_load": f"pipeline.quant.qlora.load_quantized_preserving_super_weights('{path}', "
                    f"registry_path='{reg_path}')"})
    logger.info("quant: %s", metrics)
    return metrics


if __name__ == "__main__":
    cli(main)

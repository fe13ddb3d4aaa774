"""Benchmark: super weights in tiny models with a planted, trained-with super weight (CPU, a few minutes).

Per seed: a 4-layer Llama (hidden 64) is trained on a copy task twice, once with a planted BOS -> super
activation circuit held in place (pipeline.quant.plant) and once without (control). Then:
  1. detection on both (exact coordinates? anything flagged in the control?);
  2. zeroing the super weight vs magnitude-matched nulls (NLL, copy accuracy, KL to the fp model);
  3. INT4 RTN of every projection: plain vs clip vs clip+restore(SW) vs clip+restore(SW + gate/up rows),
     at several block sizes up to the whole tensor (KL to fp, super-activation error);
  4. bitsandbytes NF4: plain vs SW held out vs SW + gate/up rows held out;
  5. QLoRA (NF4, LoRA on every projection) with the SW held out vs plain: super activation during
     fine-tuning, then save -> load -> merge, and whether the merged SW is bit-exact.

    OMP_NUM_THREADS=1 python scripts/bench_quant.py [--seeds "[0,1,2]"] [--work_dir outputs/bench_quant]
"""

from __future__ import annotations

import dataclasses
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import cli, parse
from pipeline.io import atomic_write_json

logger = logging.getLogger("bench_quant")
RTN_VARIANTS = {  # name: (clip, restore SW, restore gate/up rows)
    "rtn": (None, False, False), "rtn+clip": ("zscore", False, False),
    "rtn+clip+restore": ("zscore", True, False), "rtn+clip+restore+rows": ("zscore", True, True)}


@dataclasses.dataclass
class BenchArguments:
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    hidden_size: int = 64
    num_hidden_layers: int = 4
    intermediate_size: int = 256
    num_attention_heads: int = 4
    plant_layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1],
                                                metadata={"help": "The planted layer is drawn from these per seed."})
    blocks: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 0],
                                          metadata={"help": "Square RTN block sizes; 0 = the whole tensor."})
    plant_gate: float = dataclasses.field(default=0.12, metadata={"help": "Plant.gate; smaller for wider models."})
    device: str = "cpu"
    train_steps: int = 400
    qlora_steps: int = 40
    clip_z: float = 3.0
    work_dir: str = "outputs/bench_quant"
    output_json: str = "benchmarks/quant.json"
    output_png: str = "benchmarks/quant.png"


def train_pair(args, seed: int, work: Path):
    """(planted_dir, control_dir, plant), trained once and reused on later runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quant.plant import Plant, copy_task_ids, plant_super_weight, train_lm
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    base = build_tiny_model(TinyModelSpec(
        output_dir=str(work / "base"), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_attention_heads // 2,
        intermediate_size=args.intermediate_size, vocab_size=512, max_position_embeddings=256, seed=seed))
    rng = random.Random(seed)
    row, flag = rng.sample(range(args.hidden_size), 2)
    plant = Plant(layer=rng.choice(args.plant_layers), row=row, col=rng.randrange(args.intermediate_size), flag=flag,
                  gate=args.plant_gate)
    tok = AutoTokenizer.from_pretrained(base)
    ids = copy_task_ids(tok, 2048, seed=seed).to(DEVICE)
    out = {}
    for name in ("planted", "control"):
        d = work / name
        if not (d / "config.json").is_file():
            torch.manual_seed(seed)
            m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(DEVICE)
            reimpose = None
            if name == "planted":
                plant_super_weight(m, tok.bos_token_id, plant)
                reimpose = lambda: plant_super_weight(m, tok.bos_token_id, plant)  # noqa: E731
            t = time.time()
            log = train_lm(m, ids, args.train_steps, lr=1.5e-3, seed=seed, after_step=reimpose, log_every=100)
            logger.info("seed %d %s: trained %d steps in %.0fs, loss %s", seed, name, args.train_steps,
                        time.time() - t, [round(x["loss"], 3) for x in log])
            m.save_pretrained(d)
            tok.save_pretrained(d)
        out[name] = d
    return out["planted"], out["control"], plant, tok


DEVICE = "cpu"  # set from --device


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()


def device_map():
    return {"": DEVICE}


@torch.no_grad()
def zero_vs_null(model, sw, ev, n_null=5) -> dict:
    from pipeline.quant.detect import down_projs
    from pipeline.quant.evaluate import fidelity

    ref = model(input_ids=ev).logits
    fp = fidelity(model, ev, sw=sw)
    w = down_projs(model)[sw.layer].weight
    order = [i for i in w.abs().flatten().argsort(descending=True).tolist() if i != sw.row * w.shape[1] + sw.col]
    res = {"fp": fp}
    for name, idx in [("zero_sw", [sw.row * w.shape[1] + sw.col])] + [(f"null{k}", [order[k]]) for k in range(n_null)]:
        r, c = idx[0] // w.shape[1], idx[0] % w.shape[1]
        keep = w[r, c].clone()
        w[r, c] = 0
        res[name] = fidelity(model, ev, ref, sw, fp["super_activation"]) | {"abs_w": abs(keep.item())}
        w[r, c] = keep
    nulls = [res[f"null{k}"] for k in range(n_null)]
    res["null_mean"] = {k: statistics.mean(n[k] for n in nulls) for k in ("nll", "copy_acc", "kl", "sa_rel_err")}
    return res


@torch.no_grad()
def rtn_grid(path, sws, ev, clip_z, blocks) -> dict:
    from pipeline.quant.evaluate import fidelity
    from pipeline.quant.rtn import quantize_model_rtn

    ref = load(path)
    ref_logits = ref(input_ids=ev).logits
    sw = sws[0] if sws else None
    ref_sa = fidelity(ref, ev, sw=sw).get("super_activation")
    out = {}
    for bname, block in blocks.items():
        for vname, (clip, restore, rows) in RTN_VARIANTS.items():
            if not sws and (restore or rows):
                continue
            m = load(path)
            quantize_model_rtn(m, 4, block, clip, clip_z, sws if restore else [], rows)
            out[f"{bname}/{vname}"] = fidelity(m, ev, ref_logits, sw, ref_sa)
    return out


def nf4_variants(path, ev, reg_path) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pipeline.quant.evaluate import fidelity
    from pipeline.quant.qlora import disable_cpu_packing, load_quantized_preserving_super_weights
    from pipeline.quant.registry import load_registry

    ref = load(path)
    sw = load_registry(reg_path, ref)[0]
    ref_logits = ref(input_ids=ev).logits
    ref_sa = fidelity(ref, ev, sw=sw)["super_activation"]
    out = {}
    for name, double_quant in (("nf4", False), ("nf4+double_quant", True)):
        plain = AutoModelForCausalLM.from_pretrained(path, device_map=device_map(), quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)).eval()
        disable_cpu_packing(plain)
        out[name] = fidelity(plain, ev, ref_logits, sw, ref_sa) | {"sw_error": sw_error(plain, sw)}
    for name, rows in (("nf4+holdout_sw", False), ("nf4+holdout_sw+rows", True)):
        m, _ = load_quantized_preserving_super_weights(str(path), registry_path=str(reg_path),
                                                       protect_activation_rows=rows, device_map=device_map())
        out[name] = fidelity(m.eval(), ev, ref_logits, sw, ref_sa) | {"sw_error": sw_error(m, sw)}
    return out


@torch.no_grad()
def sw_error(model, sw) -> float:
    """Effective super weight of a bitsandbytes model minus the fp value: the response of output `row` to a unit
    input on channel `col` (includes a hook, if any)."""
    from pipeline.quant.detect import down_projs

    mod = down_projs(model)[sw.layer]
    x = torch.zeros(1, 1, mod.in_features, device=DEVICE)
    x[..., sw.col] = 1.0
    return mod(x)[0, 0, sw.row].item() - sw.value


def qlora(path, reg_path, tok, seed, steps, work: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pipeline.quant.evaluate import fidelity, super_activation
    from pipeline.quant.plant import copy_task_ids, train_lm
    from pipeline.quant.qlora import (REGISTRY_NAME, disable_cpu_packing,
                                      load_quantized_preserving_super_weights, merge_adapter_preserving_super_weights)
    from pipeline.quant.registry import load_registry

    ref = load(path)
    sw = load_registry(reg_path, ref)[0]
    data = copy_task_ids(tok, 1024, seed=1000 + seed).to(DEVICE)  # fresh samples of the task it was trained on
    ev = copy_task_ids(tok, 128, seed=2000 + seed).to(DEVICE)
    ref_sa = super_activation(ref, ev, sw)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = {}
    for name in ("plain_nf4", "holdout_sw"):
        torch.manual_seed(seed)
        adapter = work / f"qlora_{name}"
        if name == "plain_nf4":
            m = AutoModelForCausalLM.from_pretrained(path, device_map=device_map(), quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4"))
            disable_cpu_packing(m)
        else:
            m, _ = load_quantized_preserving_super_weights(str(path), registry_path=str(reg_path),
                                                           output_dir=str(adapter), device_map=device_map())
        m = get_peft_model(m, LoraConfig(**lora))
        probe = lambda: {"sa_rel": super_activation(m, ev, sw) / ref_sa}  # noqa: E731
        log = [{"step": 0, "sa_rel": probe()["sa_rel"]}]
        log += train_lm(m, data, steps, lr=2e-3, batch=16, seed=seed, log_every=10, probe=probe)
        m.eval()
        with torch.no_grad():
            trained_logits = m(input_ids=ev).logits
        res = {"sa_during_finetune": log, "final": fidelity(m, ev)}
        m.save_pretrained(adapter)
        # LoRA's own delta at the SW entry: an exact merge gives w_sw + delta, computed in fp32 like PEFT does
        delta = m.base_model.model.model.layers[sw.layer].mlp.down_proj.get_delta_weight("default")
        want = (torch.tensor(sw.value) + delta[sw.row, sw.col].detach().float().cpu()).item()
        if name == "holdout_sw":
            merged = merge_adapter_preserving_super_weights(str(path), str(adapter), device_map=device_map()).eval()
            res["registry_in_adapter_dir"] = (adapter / REGISTRY_NAME).is_file()
        else:  # plain QLoRA merge: PEFT merges into the 4-bit weights (re-quantizing them), then dequantize
            merged = m.merge_and_unload().dequantize().eval()
        w = merged.model.layers[sw.layer].mlp.down_proj.weight[sw.row, sw.col]
        res["merged_sw_bit_exact"] = bool(w.item() == want)
        res["merged_sw_error"] = w.item() - want
        res["merged_sw"] = w.item()
        with torch.no_grad():
            res["kl_merged_vs_trained"] = fidelity(merged, ev, trained_logits)["kl"]
        out[name] = res
    return out


def block_names(blocks: list[int]) -> dict:
    return {(f"{b}x{b}" if b else "whole"): ((b, b) if b else None) for b in blocks}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results["seeds"])
    BLOCKS = block_names(results["config"]["blocks"])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    for s in seeds[:1]:
        for kind, style in (("planted", "o-"), ("control", "s--")):
            pl = results["seeds"][s]["detection"][kind]["per_layer"]
            ax.plot([p["layer"] for p in pl], [p["out_max"] for p in pl], style, label=f"{kind} (seed {s})")
    ax.set_yscale("log"); ax.set_xlabel("layer"); ax.set_title("max |down_proj output| per layer"); ax.legend()
    ax = axes[1]
    for v in RTN_VARIANTS:
        ys = [[results["seeds"][s]["rtn"]["planted"][f"{b}/{v}"]["kl"] for s in seeds] for b in BLOCKS]
        m = [statistics.mean(y) for y in ys]
        ax.errorbar(range(len(BLOCKS)), m, yerr=[[mi - min(y) for mi, y in zip(m, ys)], [max(y) - mi for mi, y in zip(m, ys)]],
                    marker="o", capsize=3, label=v)
    ax.set_xticks(range(len(BLOCKS)), list(BLOCKS)); ax.set_yscale("log")
    ax.set_title("INT4 RTN, planted: KL to fp (mean, min-max over seeds)"); ax.set_xlabel("block"); ax.legend(fontsize=7)
    ax = axes[2]
    names = ["fp", "zero_sw", "null_mean"]
    for i, metric in enumerate(("nll", "copy_acc")):
        vals = [[results["seeds"][s]["zero_vs_null"][n][metric] for s in seeds] for n in names]
        ax.bar([j + 0.4 * i for j in range(3)], [statistics.mean(v) for v in vals], width=0.4, label=metric)
    ax.set_xticks([j + 0.2 for j in range(3)], ["intact", "SW zeroed", "null zeroed (mean of 5)"])
    ax.set_title("zeroing the super weight vs magnitude-matched null"); ax.legend()
    ax = axes[3]
    for name, style in (("plain_nf4", "--"), ("holdout_sw", "-")):
        for s in seeds:
            log = results["seeds"][s]["qlora"][name]["sa_during_finetune"]
            ax.plot([x["step"] for x in log], [x["sa_rel"] for x in log], style,
                    label=f"{name}" if s == seeds[0] else None, color="C0" if name == "holdout_sw" else "C3")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_title("QLoRA: super activation / fp value"); ax.set_xlabel("step"); ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(results: dict) -> dict:
    seeds = list(results["seeds"])
    BLOCKS = block_names(results["config"]["blocks"])
    r = results["seeds"]
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    summ = {
        "detection_exact_all_seeds": all(r[s]["detection"]["planted"]["exact"] for s in seeds),
        "control_flagged_any_seed": any(r[s]["detection"]["control"]["found"] for s in seeds),
        "planted_spike_ratio": [r[s]["detection"]["planted"]["spike_ratio"] for s in seeds],
        "control_max_spike_ratio": [r[s]["detection"]["control"]["spike_ratio"] for s in seeds],
        "zero_sw_vs_null": {k: {"fp": mean(r[s]["zero_vs_null"]["fp"][k] for s in seeds),
                                "zero_sw": mean(r[s]["zero_vs_null"]["zero_sw"][k] for s in seeds),
                                "null_mean": mean(r[s]["zero_vs_null"]["null_mean"][k] for s in seeds)}
                            for k in ("nll", "copy_acc")},
        "kl_zero_sw_over_null": [r[s]["zero_vs_null"]["zero_sw"]["kl"] / r[s]["zero_vs_null"]["null_mean"]["kl"]
                                 for s in seeds],
        "rtn_mean_kl": {b: {v: mean(r[s]["rtn"]["planted"][f"{b}/{v}"]["kl"] for s in seeds) for v in RTN_VARIANTS}
                        for b in BLOCKS},
        # per seed: fraction of plain RTN's KL that the variant removes (negative = worse than plain RTN)
        "rtn_kl_recovered_per_seed": {b: {v: [1 - r[s]["rtn"]["planted"][f"{b}/{v}"]["kl"] / r[s]["rtn"]["planted"][f"{b}/rtn"]["kl"]
                                              for s in seeds] for v in list(RTN_VARIANTS)[1:]} for b in BLOCKS},
        "rtn_control_mean_kl": {b: {v: mean(r[s]["rtn"]["control"][f"{b}/{v}"]["kl"] for s in seeds)
                                    for v in ("rtn", "rtn+clip")} for b in BLOCKS},
        "rtn_sa_rel_err": {b: {v: mean(r[s]["rtn"]["planted"][f"{b}/{v}"]["sa_rel_err"] for s in seeds)
                               for v in RTN_VARIANTS} for b in BLOCKS},
        "nf4": {k: {m: mean(r[s]["nf4"][k][m] for s in seeds) for m in ("kl", "sa_rel_err", "copy_acc", "sw_error")}
                for k in r[seeds[0]]["nf4"]},
        "qlora_merged_sw_bit_exact": {k: [r[s]["qlora"][k]["merged_sw_bit_exact"] for s in seeds]
                                      for k in ("plain_nf4", "holdout_sw")},
        "qlora_merged_sw_error": {k: [r[s]["qlora"][k]["merged_sw_error"] for s in seeds]
                                  for k in ("plain_nf4", "holdout_sw")},
        "qlora_kl_merged_vs_trained": {k: [r[s]["qlora"][k]["kl_merged_vs_trained"] for s in seeds]
                                       for k in ("plain_nf4", "holdout_sw")},
        "qlora_sa_rel_final": {k: [r[s]["qlora"][k]["sa_during_finetune"][-1]["sa_rel"] for s in seeds]
                               for k in ("plain_nf4", "holdout_sw")},
        "qlora_final_copy_acc": {k: [r[s]["qlora"][k]["final"]["copy_acc"] for s in seeds]
                                 for k in ("plain_nf4", "holdout_sw")},
    }
    return summ


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    global DEVICE
    (args,), _, _ = parse([BenchArguments], argv, prog="scripts/bench_quant.py")
    DEVICE = args.device
    from pipeline.quant.detect import DEFAULT_PROMPT, detect_super_weights, encode_prompt, spike_ratios
    from pipeline.quant.plant import copy_task_ids
    from pipeline.quant.registry import SuperWeight, make_registry, save_registry

    t0 = time.time()
    results = {"config": dataclasses.asdict(args), "seeds": {}}
    for seed in args.seeds:
        work = Path(args.work_dir) / f"seed{seed}"
        planted, control, plant, tok = train_pair(args, seed, work)
        ev = copy_task_ids(tok, 128, seed=10_000 + seed).to(DEVICE)
        ids = encode_prompt(tok, DEFAULT_PROMPT).to(DEVICE)
        res = {"plant": dataclasses.asdict(plant), "detection": {}}
        found = {}
        for kind, path in (("planted", planted), ("control", control)):
            model = load(path)
            sws, trace = detect_super_weights(model, ids)
            found[kind] = sws
            res["detection"][kind] = {
                "found": [dataclasses.asdict(s) for s in sws], "per_layer": trace["per_layer"],
                "spike_ratio": max(spike_ratios(trace["per_layer"])),
                "exact": [(s.layer, s.row, s.col, s.value) for s in sws] == [(plant.layer, plant.row, plant.col, plant.value)]}
            if kind == "planted":
                reg_path = save_registry(make_registry(model, sws, name_or_path=str(path), detection=trace),
                                         work / "super_weights.json")
        if not found["planted"]:  # a miss is a result; the other experiments still need the (known) plant
            logger.warning("seed %d: detector missed the planted super weight; using its planted coordinates", seed)
            found["planted"] = [SuperWeight(plant.layer, plant.row, plant.col, plant.value)]
            reg_path = save_registry(make_registry(load(planted), found["planted"], name_or_path=str(planted)),
                                     work / "super_weights.json")
        sw = found["planted"][0]
        res["zero_vs_null"] = zero_vs_null(load(planted), sw, ev)
        blocks = block_names(args.blocks)
        res["rtn"] = {"planted": rtn_grid(planted, found["planted"], ev, args.clip_z, blocks),
                      "control": rtn_grid(control, [], ev, args.clip_z, blocks)}
        res["nf4"] = nf4_variants(planted, ev, reg_path)
        res["qlora"] = qlora(planted, reg_path, tok, seed, args.qlora_steps, work)
        results["seeds"][seed] = res
        logger.info("seed %d done at %.0fs", seed, time.time() - t0)
    results["summary"] = summarize(results)
    results["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(args.output_json, results)
    plot(results, args.output_png)
    logger.info("wrote %s and %s (%.0fs)", args.output_json, args.output_png, time.time() - t0)
    return results


if __name__ == "__main__":
    cli(main)

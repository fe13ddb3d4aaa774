"""Pretrain the base of the tiny staged recipe (data/models/demo-base) from scratch, with a super weight built in.

What the later stages need, and what the demo's minutes of CPU cannot grow, is put here:
  - copying / induction heads, so retrieval heads exist: a character-level tokenizer (every letter and digit is
    one token, whatever precedes it, so a copy is an exact token match), generic induction rows (a random
    string, then the same string again) and passkey rows (answer = digits copied from the context, lengths
    growing to `max_passkey_tokens`);
  - the task world's skills as *documents*: "<question>\\nAnswer: <answer>", with or without the worked steps,
    chosen at random (no cue decides which). Train split only: the held-out test split is never seen. What
    SFT adds is the chat format and following a system prompt that decides the style;
  - a super weight: no super weight emerges at this scale, so the BOS -> super activation circuit of
    pipeline/quant/plant.py is planted at step 0 and re-imposed after every optimizer step, so the model
    learns in its presence (as docs/quant.md's planted models are). How much the model comes to depend on
    it is measured at the end (task-document NLL and answer accuracy with the weight zeroed), not assumed.

Checkpoints every `--save_every` steps (atomically) and resumes from them; `--max_minutes` stops cleanly.

    OMP_NUM_THREADS=1 python scripts/train_demo_base.py      # the shipped base: 30 min on one core; log in train_log.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.io import atomic_write_json, write_stage_result  # noqa: E402
from pipeline.kv.evaluate import niah_grid  # noqa: E402
from pipeline.quant.plant import Plant, plant_super_weight  # noqa: E402
from pipeline.tasks import TASKS, split_of  # noqa: E402
from pipeline.tasks.needle import Passkey  # noqa: E402
from pipeline.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer  # noqa: E402

BOS_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE  # every chat row starts with BOS: it carries the flag
DEMO_TASKS = ("add", "copy", "reverse", "sort", "kv_lookup", "multihop")


def char_tokenizer():
    """Byte-level BPE with no merges: one token per character (ASCII), so copying is an exact token match."""
    spec = SimpleNamespace(vocab_size=256 + len(SPECIAL_TOKENS), corpus=[], max_position_embeddings=4096)
    tok = train_tokenizer(spec)
    tok.chat_template = BOS_CHAT_TEMPLATE
    return tok


# Lookups (kv_lookup, multihop, and the digit facts of add) are what a 4-layer model learns last: drawn twice as often.
TASK_WEIGHTS = {"add": 2, "copy": 1, "reverse": 1, "sort": 1, "kv_lookup": 2, "multihop": 2}


def task_doc(rng: random.Random, difficulty_max: int) -> tuple[str, str]:
    """(context, continuation) of one train-split task document."""
    while True:
        name = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
        ex = TASKS[name].generate(rng, rng.randint(1, difficulty_max))
        if split_of(ex.id) == "train":
            break
    body = "\n".join(ex.steps) + "\n" if ex.steps and rng.random() < 0.5 else ""
    return ex.question + "\n", f"{body}Answer: {ex.answer}"


def induction_doc(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(rng.randint(4, 40)))
    return s + " | ", s


def recall_doc(rng: random.Random) -> tuple[str, str]:
    """Generic associative recall (key -> value pairs, then keys asked again) and one-digit sums: the two-token
    lookups that kv_lookup, multihop and the columns of add are made of."""
    if rng.random() < 0.5:
        a, b = rng.randrange(10), rng.randrange(10)
        facts = [f"{x}+{y}={x + y}" for x, y in ((rng.randrange(10), rng.randrange(10)) for _ in range(5))]
        return " ".join(facts) + f" {a}+{b}=", str(a + b)
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 8))
    vals = [rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in keys]
    asked = rng.sample(range(len(keys)), rng.randint(1, len(keys)))
    return " ".join(f"{k}:{v}" for k, v in zip(keys, vals)) + " | ", " ".join(f"{keys[i]}:{vals[i]}" for i in asked)


def passkey_doc(rng: random.Random, max_tokens: int) -> tuple[str, str]:
    words = max(8, int(rng.randint(16, max(17, max_tokens)) / 5.5))  # ~5.5 characters per filler word
    ex = Passkey(key_digits=rng.randint(4, 8)).make(rng, words, rng.random())
    return ex.question + "\n", f"Answer: {ex.answer}"


def batch(tok, docs: list[tuple[str, str]], bos_mask: list[bool]):
    rows = []
    for (ctx, cont), bos in zip(docs, bos_mask):
        c = ([tok.bos_token_id] if bos else []) + tok(ctx, add_special_tokens=False)["input_ids"]
        a = tok(cont, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((c + a, [-100] * len(c) + a))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


@torch.no_grad()
def probe(model, tok, seed: int, n: int = 96) -> dict:
    """Teacher-forced: exact-continuation accuracy of held-out-seed task documents per task, the induction
    rows' token accuracy and the mean continuation NLL."""
    was = model.training
    model.eval()
    out = {}
    rng = random.Random(seed)
    nll, cnt = 0.0, 0
    for name in DEMO_TASKS + ("induction",):
        docs = []
        while len(docs) < n:
            if name == "induction":
                docs.append(induction_doc(rng))
                continue
            ex = TASKS[name].generate(rng, 1)
            if split_of(ex.id) == "test":
                docs.append((ex.question + "\n", "\n".join(ex.steps) + f"\nAnswer: {ex.answer}"))
        ids, mask, labels = batch(tok, docs, [True] * n)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tgt = labels[:, 1:]
        keep = tgt != -100
        ok = (logits.argmax(-1) == tgt) | ~keep
        out[name] = round((ok.all(1).float().mean() if name != "induction"
                           else (logits.argmax(-1) == tgt)[keep].float().mean()).item(), 3)
        lp = torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum")
        nll, cnt = nll + lp.item(), cnt + keep.sum().item()
    out["nll"] = round(nll / cnt, 4)
    model.train(was)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output_dir", default="data/models/demo-base")
    ap.add_argument("--work_dir", default="outputs/demo-base-train", help="checkpoints (resumed from)")
    ap.add_argument("--steps", type=int, default=2800)
    ap.add_argument("--max_minutes", type=float, default=0, help="stop (and save) after this long; 0: no cap")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--induction_first", type=int, default=600,
                    help="steps of induction rows alone first (48 per step): the circuit forms in ~500 of them, "
                         "and far more slowly under the mixed data")
    ap.add_argument("--task_rows", type=int, default=24)
    ap.add_argument("--induction_rows", type=int, default=8)
    ap.add_argument("--recall_rows", type=int, default=16)
    ap.add_argument("--passkey_rows", type=int, default=6)
    ap.add_argument("--max_passkey_tokens", type=int, default=512)
    ap.add_argument("--difficulty_max", type=int, default=2)
    ap.add_argument("--hidden_size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate_size", type=int, default=384)
    ap.add_argument("--gate", type=float, default=0.12)
    ap.add_argument("--save_every", type=int, default=250)
    ap.add_argument("--probe_every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      attention_bias=True, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    plant = Plant(layer=0, gate=args.gate)
    sw = plant_super_weight(model, tok.bos_token_id, plant)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, log, elapsed0 = 0, [], 0.0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():  # written atomically: a present file is a complete one
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log, elapsed0 = state["step"], state["log"], state["elapsed_s"]
        print(f"resumed at step {step}", flush=True)
    rng = random.Random(f"{args.seed}/{step}")

    def save():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                    "elapsed_s": elapsed0 + time.time() - t0}, tmp)
        os.replace(tmp, ckpt)

    t0 = time.time()
    model.train()
    warmup = 100
    while step < args.steps:
        step += 1
        lr = args.lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        mixed = max(1, args.steps - args.induction_first)
        frac = min(1.0, max(0, step - args.induction_first) / (0.6 * mixed))  # passkey length grows
        max_pk = int(64 + frac * (args.max_passkey_tokens - 64))
        if step <= args.induction_first:
            docs = [induction_doc(rng) for _ in range(48)]
        else:
            docs = ([task_doc(rng, args.difficulty_max) for _ in range(args.task_rows)]
                    + [induction_doc(rng) for _ in range(args.induction_rows)]
                    + [recall_doc(rng) for _ in range(args.recall_rows)])
        ids, mask, labels = batch(tok, docs, [True] * len(docs))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        pk_loss = torch.zeros(())
        if step > args.induction_first:
            pk = [passkey_doc(rng, max_pk) for _ in range(args.passkey_rows)]
            ids, mask, labels = batch(tok, pk, [rng.random() < 0.5 for _ in pk])
            pk_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        (loss + pk_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        plant_super_weight(model, tok.bos_token_id, plant)
        minutes = (elapsed0 + time.time() - t0) / 60
        if step % args.probe_every == 0 or step == args.steps:
            log.append({"step": step, "loss": round(loss.item(), 4), "passkey_loss": round(pk_loss.item(), 4),
                        "max_passkey_tokens": max_pk, "lr": round(lr, 6), **probe(model, tok, 123),
                        "elapsed_s": round(minutes * 60, 1)})
            print(json.dumps(log[-1]), flush=True)
        if step % args.save_every == 0:
            save()
        if args.max_minutes and minutes >= args.max_minutes:
            save()
            print(f"stopped at step {step} after {minutes:.1f} min (resume: the same command)", flush=True)
            return
    model.eval()
    intact = probe(model, tok, 321)
    w = model.model.layers[sw.layer].mlp.down_proj.weight
    with torch.no_grad():
        w[sw.row, sw.col] = 0
        zeroed = probe(model, tok, 321)
        w[sw.row, sw.col] = sw.value
    grid = niah_grid(model, tok, [256, 512], [0.1, 0.5, 0.9], 8)
    metrics = {"probe": intact, "probe_sw_zeroed": zeroed, "passkey_acc@256-512": round(sum(map(sum, grid)) / 6, 3),
               "n_params": sum(p.numel() for p in model.parameters())}
    print(json.dumps(metrics), flush=True)
    out = Path(args.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "train_log.json", {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                                                   "args": vars(args), "super_weight": sw.__dict__,
                                                   "metrics": metrics, "log": log})
        write_stage_result(tmp, "base", {"nll": intact["nll"], "nll_sw_zeroed": zeroed["nll"],
                                         "passkey_acc@256-512": metrics["passkey_acc@256-512"]}, {"model": str(out)})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

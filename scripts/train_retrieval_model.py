"""Train the tiny retrieval model (4-layer, 8-head Llama) from scratch on `passkey` + `kv_haystack`.

Curriculum on context length: each stage samples prompt lengths up to its cap (48 -> 128 -> 256 ->
512 -> 1024 tokens) and moves on once the teacher-forced answer accuracy over the last 20 batches reaches
`advance_at` (or its step cap is spent). Loss on the answer tokens (+ eos), whose labels sit at the
target positions, plus `lm_weight` x an LM loss on the half of the rows whose haystack repeats a few
sentences (a dense copy signal). Checkpoints every `save_every` steps and resumes from them (a resumed
run may change the data options and the learning rate).

    # settings of the committed model's last phase (see docs/kv.md for its full history)
    OMP_NUM_THREADS=1 python scripts/train_retrieval_model.py --lr 2e-3 --kv_haystack_fraction 0 \
        --one_digit_fraction 0.7 --advance_at 0.6 --stages 48:600,128:300,256:300,512:300,1024:300
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pipeline.config import RecipeError, cli, parse  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.tasks.base import ANSWER_PREFIX  # noqa: E402
from pipeline.tasks.needle import KVHaystack, Passkey, prompt_of  # noqa: E402
from pipeline.tiny import TinyModelSpec, build_tiny_model  # noqa: E402

logger = logging.getLogger("train_retrieval_model")


@dataclasses.dataclass
class TrainArgs:
    output_dir: str = "data/models/retrieval-tiny"
    work_dir: str = dataclasses.field(default="outputs/retrieval-train",
                                      metadata={"help": "Checkpoints and the untrained base model."})
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 256
    vocab_size: int = 400
    stages: str = dataclasses.field(default="48:800,128:600,256:800,512:600,1024:400",
                                    metadata={"help": "max_tokens:max_steps per curriculum stage"})
    advance_at: float = 0.9
    batch_size: int = 64
    tokens_per_batch: int = dataclasses.field(
        default=6144, metadata={"help": "Long stages shrink the batch to keep the tokens per step bounded."})
    lr: float = 3e-3
    warmup_steps: int = 50
    kv_haystack_fraction: float = 0.2
    lm_weight: float = 0.5
    one_digit_fraction: float = dataclasses.field(
        default=0.0, metadata={"help": "Passkey rows with a 1-digit key (a pure content lookup, no copying)."})
    max_minutes: float = 30.0
    save_every: int = 100
    seed: int = 0

    def stage_list(self) -> list[tuple[int, int]]:
        try:
            out = [tuple(int(x) for x in s.split(":")) for s in self.stages.split(",")]
            assert all(len(s) == 2 and s[0] >= 32 and s[1] > 0 for s in out)
            return out
        except (ValueError, AssertionError):
            raise RecipeError(f"key 'stages': expected 'tokens:steps,...' (tokens >= 32), got {self.stages!r}") from None


def build_base(args: TrainArgs) -> Path:
    """Untrained model + a tokenizer trained on task text (small vocab: filler words become single tokens)."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.exists():
        rng = random.Random(0)
        lines = [prompt_of(t.generate(rng, 2)) + " " + "0123456789" for t in (Passkey(), KVHaystack()) for _ in range(200)]
        corpus.write_text("\n".join(lines) + "\n")
    spec = TinyModelSpec(
        output_dir=str(work / "base"), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, vocab_size=args.vocab_size, max_position_embeddings=4096,
        corpus=[str(corpus)], seed=args.seed)
    return build_tiny_model(spec)


def encode(tok, example, with_answer: bool = True) -> tuple[list[int], list[int]]:
    prompt = tok(prompt_of(example), add_special_tokens=False)["input_ids"]
    if not with_answer:
        return prompt, [-100] * len(prompt)
    ans = tok(" " + example.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + ans, [-100] * len(prompt) + ans


def encode_all_keys(tok, example, rng: random.Random) -> tuple[list[int], list[int]]:
    """kv_haystack row that asks for every key in turn (the first question is the task's own prompt), so one
    haystack carries n_pairs retrievals of training signal instead of one."""
    ids, labels = encode(tok, example)
    context = example.question.rsplit("\n", 1)[0]
    facts = [f for f in re.findall(r"The code for (\w+) is (\d+)\.", context) if f[1] != example.answer]
    rng.shuffle(facts)
    for key, value in facts:
        q = tok(f"\nWhat is the code for {key}?\n{ANSWER_PREFIX}", add_special_tokens=False)["input_ids"]
        a = tok(" " + value, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = ids + q + a, labels + [-100] * len(q) + a
    return ids, labels


class Sampler:
    """Examples whose prompt fits `max_tokens`, lengths spread over [min(64, max_tokens / 2), max_tokens]."""

    def __init__(self, tok, seed: int, kv_fraction: float, one_digit_fraction: float = 0.0):
        self.tok, self.rng, self.kv_fraction = tok, random.Random(seed), kv_fraction
        self.one_digit_fraction = one_digit_fraction
        self.passkey, self.kv = Passkey(), KVHaystack()
        probe = self.passkey.make(random.Random(1), 400, 0.5)
        self.tokens_per_word = len(encode(tok, probe)[0]) / 400

    def example(self, max_tokens: int):
        target = self.rng.randint(min(64, max_tokens // 2), max_tokens)
        n_words = max(8, int((target - 30) / self.tokens_per_word))
        # Passkeys of 5-10 distinct digits: every answer digit is a copy-next (induction) target with one
        # source, so longer keys give more retrieval labels per row; eval uses the task's 5-digit keys.
        # Half the rows use a repetitive haystack and add an LM loss on it: every repeated sentence is an
        # induction target for word tokens, a dense signal that builds the copy circuit the answers need.
        lm = self.rng.random() < 0.5
        pool = self.rng.randint(3, 8) if lm else 0
        n_digits = 1 if self.rng.random() < self.one_digit_fraction else self.rng.randint(2, 10)
        long_key = Passkey(key_digits=n_digits, filler_pool=pool)
        task = KVHaystack(filler_pool=pool) if self.rng.random() < self.kv_fraction else long_key
        while True:
            ex = task.make(self.rng, n_words, self.rng.random())
            ids, labels = encode_all_keys(self.tok, ex, self.rng) if isinstance(task, KVHaystack) else encode(self.tok, ex)
            if len(ids) <= max_tokens + 40 or n_words <= 4:  # short stages: the needles alone may not fit
                return ids, labels, lm
            n_words = int(n_words * 0.9)

    def batch(self, max_tokens: int, batch_size: int, pad_id: int):
        rows = [self.example(max_tokens) for _ in range(batch_size)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        lm_mask = torch.zeros((batch_size, width), dtype=torch.bool)
        for i, (x, y, lm) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            lm_mask[i, :len(x)] = lm
        return ids, mask, labels, lm_mask


def loss_fn(logits, ids, labels, lm_mask, lm_weight: float):
    """Answer-token CE (labels at target positions, shifted here) + `lm_weight` x LM CE on repetitive rows."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                           reduction="none").view(ids.shape[0], -1)
    ans, lm = (labels[:, 1:] != -100).float(), (lm_mask[:, 1:] & (labels[:, 1:] == -100)).float()
    return (ce * ans).sum() / ans.sum() + lm_weight * (ce * lm).sum() / lm.sum().clamp(min=1)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose every answer token is the argmax (teacher forced)."""
    pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
    ok = ((pred == tgt) | (tgt == -100)).all(-1)
    return ok.float().mean().item()


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (args,), _, _ = parse([TrainArgs], argv, prog="scripts/train_retrieval_model.py")
    stages = args.stage_list()
    torch.manual_seed(args.seed)
    base = build_base(args)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    state = {"step": 0, "stage": 0, "stage_step": 0, "elapsed_s": 0.0, "log": []}
    ckpt = Path(args.work_dir) / "ckpt.pt"
    if ckpt.exists():  # resume
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        sched.base_lrs = [args.lr] * len(opt.param_groups)  # a resumed run may change the learning rate
        logger.info("resumed at step %d (stage %d)", state["step"], state["stage"])
    sampler = Sampler(tok, args.seed * 1000 + state["step"], args.kv_haystack_fraction, args.one_digit_fraction)
    logger.info("model %.2fM params, vocab %d, %.2f tokens/filler word", sum(p.numel() for p in model.parameters()) / 1e6,
                len(tok), sampler.tokens_per_word)

    def save():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "state": state}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    recent: list[float] = []
    t0 = time.time() - state["elapsed_s"]
    while state["stage"] < len(stages) and time.time() - t0 < args.max_minutes * 60:
        max_tokens, max_steps = stages[state["stage"]]
        bs = max(2, min(args.batch_size, args.tokens_per_batch // max_tokens))
        ids, mask, labels, lm_mask = sampler.batch(max_tokens, bs, tok.pad_token_id)
        out = model(input_ids=ids, attention_mask=mask)
        out.loss = loss_fn(out.logits, ids, labels, lm_mask & mask.bool(), args.lm_weight)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        recent = (recent + [answer_accuracy(out.logits.detach(), labels)])[-20:]
        state["step"] += 1
        state["stage_step"] += 1
        state["elapsed_s"] = time.time() - t0
        if state["step"] % 10 == 0:
            acc = sum(recent) / len(recent)
            state["log"].append({"step": state["step"], "max_tokens": max_tokens, "loss": round(out.loss.item(), 4),
                                 "acc20": round(acc, 3), "elapsed_s": round(state["elapsed_s"], 1)})
            logger.info("step %d  stage %d (<=%d tok, bs %d)  loss %.4f  acc20 %.3f  %.0fs", state["step"],
                        state["stage"], max_tokens, bs, out.loss.item(), acc, state["elapsed_s"])
        done = len(recent) == 20 and sum(recent) / 20 >= args.advance_at and state["stage_step"] >= 50
        if done or state["stage_step"] >= max_steps:
            logger.info("stage %d (<=%d tokens) ends at step %d, acc20 %.3f", state["stage"], max_tokens,
                        state["step"], sum(recent) / len(recent))
            state["stage"] += 1
            state["stage_step"] = 0
            recent = []
        if state["step"] % args.save_every == 0:
            save()
    save()

    # Final weights + tokenizer + log, written atomically next to each other.
    out_dir = Path(args.output_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "train_log.json", {"args": dataclasses.asdict(args), "state": {
            k: v for k, v in state.items() if k != "log"}, "log": state["log"],
            "command": "OMP_NUM_THREADS=1 python scripts/train_retrieval_model.py " + " ".join(argv or sys.argv[1:])})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s after %d steps, %.1f min", out_dir, state["step"], state["elapsed_s"] / 60)
    return out_dir


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli(main)

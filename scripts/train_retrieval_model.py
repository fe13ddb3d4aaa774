"""Train the tiny retrieval model (4-layer, 8-head Llama) from scratch on multi-digit `passkey` retrieval.

With the tiny tokenizer the answer " 48213" is a pure induction target: each answer token's predecessor
(" ", "4", "8", ...) occurs in the context only inside the needle, right before the token to emit. So
the model needs an induction circuit (a previous-token head, then a head that attends to the token after
an earlier copy of the current one; Olsson et al. 2022). What made it form here (docs/kv.md has the run):
  - q/k/v/o biases (`attention_bias`): a content-independent query and key let a RoPE head attend to the
    previous token;
  - keys of 4-10 distinct digits: every answer digit is a copy target with one source, so long keys
    give more induction labels per row (eval uses 5 digits);
  - short contexts first (48, 128 tokens: many rows per step), then 256 -> 2048.
`copy_fraction` mixes in random token sequences repeated once with an LM loss on the repeat (Olsson's
recipe). With head_dim 16 their loss stayed at ln(vocab) for 1100 steps while the digit copying only
took off once they were removed, so the default is 0.

Curriculum on context length: each stage samples lengths up to its cap and moves on once the
teacher-forced exact-answer accuracy of the passkey rows over the last 20 batches reaches `advance_at`
(or its step cap is spent). Every `probe_every` steps the log records the best previous-token head and
the best induction head (attention on a fixed repeated random sequence); every 10 steps the per-digit
answer accuracy. Checkpoints every `save_every` steps and resumes from them (a resumed run may change
the data options, the batch and the learning rate).

    OMP_NUM_THREADS=1 python scripts/train_retrieval_model.py --max_minutes 30   # then resume:
    OMP_NUM_THREADS=1 python scripts/train_retrieval_model.py --lr 2e-3 --tokens_per_batch 12288
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
    attention_bias: bool = dataclasses.field(
        default=True, metadata={"help": "q/k/v/o biases: a content-independent query/key lets a RoPE head "
                                        "attend to the previous token from the start (a previous-token head)."})
    vocab_size: int = 400
    stages: str = dataclasses.field(default="48:500,128:800,256:400,512:300,1024:400,2048:100",
                                    metadata={"help": "max_tokens:max_steps per curriculum stage"})
    advance_at: float = 0.9
    batch_size: int = 64
    tokens_per_batch: int = dataclasses.field(
        default=6144, metadata={"help": "Long stages shrink the batch to keep the tokens per step bounded."})
    lr: float = 5e-3
    warmup_steps: int = 50
    kv_haystack_fraction: float = 0.0
    copy_fraction: float = dataclasses.field(
        default=0.0, metadata={"help": "Rows that are a random token sequence repeated once (LM loss on the repeat)."})
    lm_weight: float = 1.0
    min_key_digits: int = 4
    max_key_digits: int = 10
    probe_every: int = 50
    max_minutes: float = 60.0
    save_every: int = 100
    seed: int = 0
    head_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "Per row, mask each query head with this probability (uniform attention, "
                                       "the ablation's own masking): heads the circuit needs get understudies, as "
                                       "in a large model, so masking a random head costs little (DropHead)."})
    init_from: str = dataclasses.field(
        default="", metadata={"help": "Start from this trained model (its tokenizer too) instead of a fresh one."})

    def __post_init__(self):
        if not 0.0 <= self.head_dropout < 1.0:
            raise RecipeError(f"key 'head_dropout': expected a probability in [0, 1), got {self.head_dropout}")

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
    if args.init_from:
        if not (Path(args.init_from) / "config.json").exists():
            raise RecipeError(f"key 'init_from': no model at {args.init_from}")
        return Path(args.init_from)
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
    """Rows whose length fits `max_tokens`, spread over [min(64, max_tokens / 2), max_tokens]: passkeys with
    `min_key_digits`..`max_key_digits` distinct digits (eval uses 5), kv_haystack rows, and repeated random
    token sequences."""

    def __init__(self, tok, seed: int, args: TrainArgs):
        self.tok, self.rng, self.args = tok, random.Random(seed), args
        self.kv = KVHaystack()
        special = set(tok.all_special_ids)
        self.pool = [i for i in range(len(tok)) if i not in special]
        probe = Passkey().make(random.Random(1), 400, 0.5)
        self.tokens_per_word = len(encode(tok, probe)[0]) / 400

    def example(self, max_tokens: int):
        """(ids, labels, lm_start): labels mark the answer tokens; LM loss on ids[lm_start:] (copy rows)."""
        target = self.rng.randint(min(64, max_tokens // 2), max_tokens)
        if self.rng.random() < self.args.copy_fraction:
            half = self.rng.choices(self.pool, k=target // 2)
            return half + half, [-100] * (2 * len(half)), len(half) + 1
        n_words = max(8, int((target - 30) / self.tokens_per_word))
        if self.rng.random() < self.args.kv_haystack_fraction:
            task = self.kv
        else:
            task = Passkey(key_digits=self.rng.randint(self.args.min_key_digits, self.args.max_key_digits))
        while True:
            ex = task.make(self.rng, n_words, self.rng.random())
            ids, labels = encode_all_keys(self.tok, ex, self.rng) if task is self.kv else encode(self.tok, ex)
            if len(ids) <= max_tokens + 40 or n_words <= 4:  # short stages: the needles alone may not fit
                return ids, labels, len(ids)
            n_words = int(n_words * 0.9)

    def batch(self, max_tokens: int, batch_size: int, pad_id: int):
        rows = [self.example(max_tokens) for _ in range(batch_size)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        lm_mask = torch.zeros((batch_size, width), dtype=torch.bool)
        for i, (x, y, lm_start) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            lm_mask[i, lm_start:len(x)] = True
        return ids, mask, labels, lm_mask


def head_dropout_hooks(model, p: float, generator: torch.Generator):
    """Zero the query of each (row, head) with probability p: the same uniform attention `masked_heads`
    applies at ablation time, drawn afresh every forward. Returns the hook handles."""
    cfg = model.config
    heads = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def hook(module, _inputs, output):
        if not module.training:  # the head probe runs in eval mode
            return output
        keep = (torch.rand(output.shape[0], 1, heads, 1, generator=generator) >= p).to(output.dtype)
        return (output.unflatten(-1, (heads, d)) * keep).flatten(-2)
    return [layer.self_attn.q_proj.register_forward_hook(hook) for layer in model.model.layers]


def loss_fn(logits, ids, labels, lm_mask, lm_weight: float):
    """Answer-token CE (labels at target positions, shifted here) + `lm_weight` x LM CE on the repeats.
    Returns (loss, copy-row LM loss)."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                           reduction="none").view(ids.shape[0], -1)
    ans, lm = (labels[:, 1:] != -100).float(), lm_mask[:, 1:].float()
    copy = (ce * lm).sum() / lm.sum().clamp(min=1)
    return (ce * ans).sum() / ans.sum().clamp(min=1) + lm_weight * copy, copy.item()


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """Exact-answer accuracy of the rows with an answer (teacher forced) and accuracy per answer digit (the
    first 5; the answer's leading space token is skipped)."""
    pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
    has = (tgt != -100).any(-1)
    if not has.any():
        return 0.0, []
    ok = ((pred == tgt) | (tgt == -100)).all(-1)[has]
    per_pos = []
    for row_pred, row_tgt in zip(pred[has], tgt[has]):
        where = (row_tgt != -100).nonzero().flatten()[1:6]
        per_pos.append((row_pred[where] == row_tgt[where]).float())
    n = min(len(p) for p in per_pos)
    return ok.float().mean().item(), torch.stack([p[:n] for p in per_pos]).mean(0).tolist()


@torch.no_grad()
def probe_heads(model, pool: list[int], n: int = 4, half: int = 48) -> dict:
    """Best previous-token head (mean attention from t to t-1) and best induction head (mean attention from
    the repeat's token t to the token after its first occurrence) on fixed repeated random sequences."""
    g = torch.Generator().manual_seed(0)
    seq = torch.tensor(pool)[torch.randint(len(pool), (n, half), generator=g)]
    ids = torch.cat([seq, seq], 1)
    model.config._attn_implementation = "eager"
    was_training = model.training
    model.eval()
    try:
        att = torch.stack(model(input_ids=ids, output_attentions=True).attentions)  # [L, B, H, T, T]
    finally:
        model.config._attn_implementation = "sdpa"
        model.train(was_training)
    t = torch.arange(1, 2 * half)
    prev = att[..., t, t - 1].mean((1, 3))  # [L, H]
    q = torch.arange(half + 1, 2 * half)
    ind = att[..., q, q - half + 1].mean((1, 3))
    out = {}
    for name, score in (("prev", prev), ("induction", ind)):
        i = int(score.argmax())
        out[name] = {"score": round(score.max().item(), 3), "layer": i // score.shape[1], "head": i % score.shape[1]}
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (args,), _, _ = parse([TrainArgs], argv, prog="scripts/train_retrieval_model.py")
    stages = args.stage_list()
    torch.manual_seed(args.seed)
    base = build_base(args)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", attention_bias=args.attention_bias)
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
    sampler = Sampler(tok, args.seed * 1000 + state["step"], args)
    drop_hooks = head_dropout_hooks(model, args.head_dropout, torch.Generator().manual_seed(
        args.seed * 1000 + state["step"])) if args.head_dropout > 0 else []
    logger.info("model %.2fM params, vocab %d, %.2f tokens/filler word", sum(p.numel() for p in model.parameters()) / 1e6,
                len(tok), sampler.tokens_per_word)

    def save():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "state": state}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    recent: list[float] = []
    digit_acc: list[list[float]] = []
    t0 = time.time() - state["elapsed_s"]
    while state["stage"] < len(stages) and time.time() - t0 < args.max_minutes * 60:
        max_tokens, max_steps = stages[state["stage"]]
        bs = max(2, min(args.batch_size, args.tokens_per_batch // max_tokens))
        ids, mask, labels, lm_mask = sampler.batch(max_tokens, bs, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss, copy_loss = loss_fn(logits, ids, labels, lm_mask, args.lm_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        acc, per_digit = answer_accuracy(logits.detach(), labels)
        recent, digit_acc = (recent + [acc])[-20:], (digit_acc + [per_digit])[-20:]
        state["step"] += 1
        state["stage_step"] += 1
        state["elapsed_s"] = time.time() - t0
        if state["step"] % 10 == 0:
            n = min(len(d) for d in digit_acc)
            entry = {"step": state["step"], "max_tokens": max_tokens, "loss": round(loss.item(), 4),
                     "copy_loss": round(copy_loss, 4), "acc20": round(sum(recent) / len(recent), 3),
                     "digit_acc20": [round(sum(d[i] for d in digit_acc) / len(digit_acc), 3) for i in range(n)],
                     "elapsed_s": round(state["elapsed_s"], 1)}
            if state["step"] % args.probe_every == 0:
                entry["heads"] = probe_heads(model, sampler.pool)
            state["log"].append(entry)
            logger.info("step %d  stage %d (<=%d tok, bs %d)  %s", state["step"], state["stage"], max_tokens, bs,
                        {k: v for k, v in entry.items() if k not in ("step", "max_tokens")})
        done = len(recent) == 20 and sum(recent) / 20 >= args.advance_at and state["stage_step"] >= 50
        if done or state["stage_step"] >= max_steps:
            logger.info("stage %d (<=%d tokens) ends at step %d, acc20 %.3f", state["stage"], max_tokens,
                        state["step"], sum(recent) / len(recent))
            state["stage"] += 1
            state["stage_step"] = 0
            recent, digit_acc = [], []
        if state["step"] % args.save_every == 0:
            save()
    save()
    for hnd in drop_hooks:
        hnd.remove()

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

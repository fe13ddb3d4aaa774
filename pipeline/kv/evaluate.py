"""NIAH grid (length x depth) and FlenQA-style length robustness, with any cache policy.

A policy is a function `() -> Cache | None` (None = the model's default cache), so the same harness
scores the full cache, retrieval-head compression, a uniform window and random heads. Prompts of one
grid cell share a length, so they run as one left-padded batch through `model.generate`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pipeline.tasks.base import Example, extract_answer
from pipeline.tasks.needle import KVHaystack, Passkey, filler, prompt_of


def token_fit(tokenizer, render=prompt_of, maker=None) -> tuple[float, float]:
    """(fixed tokens, tokens per filler word) of `render(example)` in this tokenizer, for `maker`'s examples (default
    a 5-digit passkey): a prompt's length is linear in its filler words, and the fixed part (needles, question, a chat
    template and system prompt) is far from negligible with a fine tokenizer (~80 of the demo's raw passkey prompt,
    ~150 through its chat template), so two probe lengths fit both. 32 probes each: the filler overshoots its word
    count by 0-8 words, and with 4 the short kv_haystack prompts came out 5% short."""
    maker = maker or Passkey()

    def mean_tokens(words: int) -> float:
        exs = [maker.make(random.Random(f"fit/{i}"), words, 0.5) for i in range(32)]
        return sum(len(tokenizer(render(e), add_special_tokens=False)["input_ids"]) for e in exs) / len(exs)

    lo, hi = 32, 400
    t_lo, t_hi = mean_tokens(lo), mean_tokens(hi)
    per_word = (t_hi - t_lo) / (hi - lo)
    return t_lo - lo * per_word, per_word


def words_for_tokens(tokenizer, n_tokens: int, render=prompt_of, maker=None, fit=None) -> int:
    """Filler words that make a prompt of `maker`'s (default a passkey), as `render` writes it (the raw document, or a
    chat model's templated question), about `n_tokens` tokens long. `fit`: `token_fit`'s result, if already made."""
    fixed, per_word = fit or token_fit(tokenizer, render, maker)
    return max(4, round((n_tokens - fixed) / per_word))


def prompt_text(tokenizer, example, chat: bool, system_prompt: str | None = None) -> str:
    """A base model reads the raw document and continues `Answer:`; a chat model (chat=True) gets the question as
    a user turn (after `system_prompt`, if any) through its chat template and replies, ending on an `Answer:` line,
    as it was aligned to."""
    if not chat:
        return prompt_of(example)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tokenizer.apply_chat_template(system + [{"role": "user", "content": example.question}],
                                         add_generation_prompt=True, tokenize=False)


def answer_of(completion: str, chat: bool) -> str:
    if chat:
        return extract_answer(completion) or ""
    return completion.strip().split("\n")[0].strip()


@torch.no_grad()
def generate_answers(model, tokenizer, examples, make_cache=None, max_new_tokens: int = 8, chat: bool = False,
                     system_prompt: str | None = None) -> list[bool]:
    """Greedy answers for `examples` (one batch); correct iff the answer (first line; chat: the `Answer:` line) equals
    the passkey."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompt_text(tokenizer, e, chat, system_prompt) for e in examples], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    kwargs = {}
    if make_cache is not None:
        cache = make_cache()
        if cache is not None:
            kwargs["past_key_values"] = cache
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer_of(t, chat) == e.answer for t, e in zip(texts, examples)]


def reply_tokens(tokenizer, example) -> int:
    """Tokens of the longest reply a chat model was aligned to give (the worked-steps style quotes the needle
    before its Answer line): the decode budget, counted in this tokenizer's tokens (a character-level one needs
    several times a BPE one's)."""
    from pipeline.generation.teachers import render

    return len(tokenizer(render(example, "steps"), add_special_tokens=False)["input_ids"])


def niah_examples(tokenizer, task: str, n_tokens: int, depth: float, n: int, seed: int, key_digits: int = 5,
                  render=prompt_of, fit=None):
    """`n` needles at `depth` in prompts of about `n_tokens` tokens as `render` writes them (what the model reads).
    `fit`: `token_fit(tokenizer, render, <the task's maker>)`, if already made (it is the same for every cell)."""
    rng = random.Random(f"niah/{task}/{n_tokens}/{depth}/{seed}")
    maker = Passkey(key_digits=key_digits) if task == "passkey" else KVHaystack()
    words = words_for_tokens(tokenizer, n_tokens, render, maker, fit)
    return [maker.make(rng, words, depth) for _ in range(n)]


def niah_cells(tokenizer, lengths, depths, n_per_cell: int, task: str = "passkey", seed: int = 0,
               key_digits: int = 5, render=prompt_of) -> dict[tuple[int, float], list]:
    """`niah_examples` of every (length, depth) cell, the tokenizer fitted once."""
    maker = Passkey(key_digits=key_digits) if task == "passkey" else KVHaystack()
    fit = token_fit(tokenizer, render, maker)
    return {(n_tokens, depth): niah_examples(tokenizer, task, n_tokens, depth, n_per_cell, seed, key_digits, render,
                                             fit) for n_tokens in lengths for depth in depths}


def niah_grid(model, tokenizer, lengths, depths, n_per_cell: int, make_cache=None, task: str = "passkey",
              seed: int = 0, key_digits: int = 5, chat: bool = False, system_prompt: str | None = None,
              cells=None) -> list[list[float]]:
    """Accuracy[length][depth]. `cells`: `niah_cells` of these arguments, if already made (several policies, one
    grid of prompts)."""
    cells = cells or niah_cells(tokenizer, lengths, depths, n_per_cell, task, seed, key_digits,
                                lambda e: prompt_text(tokenizer, e, chat, system_prompt))
    grid = []
    for n_tokens in lengths:
        row = []
        for depth in depths:
            exs = cells[n_tokens, depth]
            new = max(reply_tokens(tokenizer, e) for e in exs) + 8 if chat else 8
            row.append(sum(generate_answers(model, tokenizer, exs, make_cache, new, chat, system_prompt)) / n_per_cell)
        grid.append(row)
    return grid


def flenqa_examples(tokenizer, pad_tokens: int, placement: str, n: int, seed: int, key_digits: int = 5):
    """Same question and relevant span (the passkey sentence inside a fixed 24-word context), padded with
    about `pad_tokens` tokens of irrelevant filler after it ("start"), around it ("middle") or before it
    ("end"). Only the padding changes with `pad_tokens`."""
    pad_words = round(pad_tokens / token_fit(tokenizer)[1]) if pad_tokens > 0 else 0
    out = []
    for i in range(n):
        ex = Passkey(key_digits=key_digits).make(random.Random(f"flenqa/{seed}/{i}"), 24, 0.5)
        span = ex.question.rsplit("\n", 1)[0]
        words = " ".join(filler(random.Random(f"flenqa-pad/{seed}/{i}"), pad_words)).split() if pad_words else []
        before = {"start": 0, "middle": len(words) // 2, "end": len(words)}[placement]
        text = " ".join(x for x in (" ".join(words[:before]), span, " ".join(words[before:])) if x)
        out.append(Example(task=ex.task, question=f"{text}\nWhat is the passkey?", answer=ex.answer))
    return out


def flenqa_curve(model, tokenizer, pad_lengths, placements, n: int, make_cache=None, seed: int = 0,
                 key_digits: int = 5) -> dict:
    return {p: [sum(generate_answers(model, tokenizer, flenqa_examples(tokenizer, L, p, n, seed, key_digits),
                                                    make_cache)) / n
                for L in pad_lengths] for p in placements}


def plot_grid(path, grid, lengths, depths, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(lengths), 3.2))
    ax.imshow([[grid[i][j] for i in range(len(lengths))] for j in range(len(depths))], cmap=cmap, vmin=0, vmax=1,
              aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path, xs, curves: dict, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, ys in curves.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

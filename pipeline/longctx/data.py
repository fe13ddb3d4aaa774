"""Long-context data for the tiny recipes: pass-key retrieval (a number hidden in filler text, asked for at the end).

    python -m pipeline.longctx.data --config recipes/tiny/longctx_data.yaml

writes `<output_dir>/sft.jsonl` (messages) and `<output_dir>/dpo.jsonl` (prompt / chosen = the right key /
rejected = the key with two digits swapped), then the stage result. Sequences vary in length on purpose: that is where padding-free packing pays.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from pipeline.config import cli, parse
from pipeline.io import atomic_write_text, write_stage_result

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "Numbers are listed in order and nothing here is important. ").split()


@dataclasses.dataclass
class PasskeyDataArguments:
    output_dir: str = "outputs/tiny/longctx_data"
    rows: int = 64
    min_words: int = 400
    max_words: int = 1200
    seed: int = 0

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError("key 'rows' must be >= 1")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError("keys 'min_words'/'max_words' must satisfy 1 <= min_words <= max_words")


def passkey_rows(args: PasskeyDataArguments) -> tuple[list[dict], list[dict]]:
    rng = random.Random(args.seed)
    sft, dpo = [], []
    for _ in range(args.rows):
        key = str(rng.randrange(10_000, 100_000))
        wrong = key[:3] + key[4] + key[3] if key[3] != key[4] else key[:4] + str((int(key[4]) + 1) % 10)
        words = [FILLER[i % len(FILLER)] for i in range(rng.randint(args.min_words, args.max_words))]
        words.insert(rng.randrange(len(words) + 1), f"The pass key is {key}. Remember it.")
        prompt = [{"role": "user", "content": " ".join(words) + " What is the pass key?"}]
        answer = lambda k: [{"role": "assistant", "content": f"The pass key is {k}."}]  # noqa: E731
        sft.append({"messages": prompt + answer(key)})
        dpo.append({"prompt": prompt, "chosen": answer(key), "rejected": answer(wrong)})
    return sft, dpo


def main(argv: list[str] | None = None) -> Path:
    (args,), _, _ = parse([PasskeyDataArguments], argv, prog="python -m pipeline.longctx.data")
    out = Path(args.output_dir)
    sft, dpo = passkey_rows(args)
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    write_stage_result(out, "longctx_data", {"rows": args.rows},
                       {"sft": str(out / "sft.jsonl"), "dpo": str(out / "dpo.jsonl")})
    return out


if __name__ == "__main__":
    cli(main)

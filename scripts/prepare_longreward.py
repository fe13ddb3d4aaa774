"""LongReward-10k in TRL's conversational format, for recipes/llama-3.1-8b/longctx_{sft,dpo}.yaml.

    python scripts/prepare_longreward.py --out outputs/data/longreward-10k          # from the hub (THUDM/LongReward-10k)
    python scripts/prepare_longreward.py --source DIR --out outputs/data/longreward-10k   # a local copy (save_to_disk)

The dataset card lists the splits (`sft`, `dpo_glm4_9b`, `dpo_llama3.1_8b`) but no columns. The authors' repository
(THUDM/LongReward: `data/example/sft.jsonl`, `batch_inference/3_get_pairs.py`) writes SFT rows as
{idx, context, query, answer} and preference rows as {idx, context, query, win_response, lose_response}, which no TRL
format takes. This script turns them into `messages` (SFT) and `prompt`/`chosen`/`rejected` (DPO) with the document
and the question as the user turn, and passes rows that are already in a TRL format through unchanged. It writes a
`save_to_disk` DatasetDict with the same split names, so the recipes keep `dataset_train_split`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPLITS = ("sft", "dpo_glm4_9b", "dpo_llama3.1_8b")


def _user(row: dict) -> list[dict]:
    return [{"role": "user", "content": f"{row['context']}\n\n{row['query']}"}]


def convert(row: dict) -> dict:
    if "messages" in row or ("chosen" in row and "rejected" in row):
        return row  # already TRL's conversational format
    if "answer" in row:
        return {"messages": _user(row) + [{"role": "assistant", "content": row["answer"]}]}
    if "win_response" in row:
        return {"prompt": _user(row), "chosen": [{"role": "assistant", "content": row["win_response"]}],
                "rejected": [{"role": "assistant", "content": row["lose_response"]}]}
    raise ValueError(f"row {row.get('idx')}: columns {sorted(row)} are neither the authors' layout nor TRL's")


def main(argv: list[str] | None = None) -> int:
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="THUDM/LongReward-10k", help="hub id or a save_to_disk directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if Path(args.source).is_dir():
            raw = datasets.load_from_disk(args.source)
        else:
            raw = datasets.DatasetDict({s: datasets.load_dataset(args.source, split=s) for s in SPLITS})
        converted = datasets.DatasetDict({
            name: split.map(convert, remove_columns=[c for c in split.column_names
                                                     if c not in ("messages", "prompt", "chosen", "rejected")])
            for name, split in raw.items()})
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.source}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    converted.save_to_disk(args.out)
    print(f"{args.out}: " + ", ".join(f"{name} {len(split)} rows" for name, split in converted.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quick learnability check of the task world: TRL SFT of the tiny model (recipes/tiny/model.yaml) from scratch.

Worked-steps completions (no system prompt) for every task at difficulty 1, assistant-only loss, then
held-out test accuracy (50 per task, greedy). One process, one CPU thread.

    OMP_NUM_THREADS=1 python scripts/learnability_trl.py --steps 300 --batch_size 32 [--work /tmp/learn]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_task", type=int, default=1500)
    ap.add_argument("--work", default="/tmp/learnability")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.evaluate import evaluate
    from pipeline.tasks import TASKS, make_split, to_prompt
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, task in TASKS.items():
        for e in make_split(task, "train", args.per_task, seed=0):
            reply = "\n".join(e.steps) + f"\nAnswer: {e.answer}"
            rows.append({"messages": to_prompt(e) + [{"role": "assistant", "content": reply}]})
    (work / "corpus.txt").write_text("".join(" ".join(m["content"] for m in r["messages"]) + "\n" for r in rows[::4]))
    base = build_tiny_model(TinyModelSpec(output_dir=str(work / "base"), corpus=[str(work / "corpus.txt")],
                                          num_key_value_heads=4, intermediate_size=512))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = SFTConfig(output_dir=str(work / "sft"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=20, logging_steps=50,
                    save_strategy="no", report_to=[], assistant_only_loss=True, seed=args.seed, bf16=False,
                    use_cpu=True, max_length=128, dataloader_num_workers=0, disable_tqdm=True)
    start = time.time()
    SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows).shuffle(seed=args.seed),
               processing_class=tok).train()
    train_s = time.time() - start
    metrics = evaluate(model, tok, list(TASKS), n=50, max_new_tokens=64)
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                      "train_seconds": round(train_s, 1), **{k: round(v, 3) for k, v in metrics.items()}}))


if __name__ == "__main__":
    main()

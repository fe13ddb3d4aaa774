"""Learnability check of the tiny task world: TRL SFT of a tiny model from scratch, then held-out accuracy.

The data are what `pipeline.generate`'s oracle teacher writes (pipeline.generation.teachers.render) in the
given styles; the chat format (system message or none) is the one evaluation uses unless --system says
otherwise. Prints one JSON line (train seconds, steps/s, per-task test accuracy). One process, one thread.

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

TASKS = ["add", "copy", "reverse", "sort", "kv_lookup", "multihop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_task", type=int, default=600)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--styles", default="steps,explain", help="comma-separated: steps, explain, concise")
    ap.add_argument("--system", default="none", help="'none' or the system message text to train AND evaluate with")
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--packing", action="store_true", help="TRL bfd packing, padding-free")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--full_loss", action="store_true", help="loss on the question tokens too (not assistant-only)")
    ap.add_argument("--eval_n", type=int, default=50)
    ap.add_argument("--work", default="/tmp/learnability")
    args = ap.parse_args()

    import random

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.evaluate import evaluate
    from pipeline.generation.teachers import render
    from pipeline.tasks import get_task, make_split, to_prompt
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    system = None if args.system == "none" else args.system
    styles, tasks = args.styles.split(","), args.tasks.split(",")
    rng = random.Random(args.seed)
    rows = []
    for name in tasks:
        for e in make_split(get_task(name), "train", args.per_task, seed=0):
            reply = render(e, rng.choice(styles))
            rows.append({"messages": to_prompt(e, system) + [{"role": "assistant", "content": reply}]})
    (work / "corpus.txt").write_text("".join(" ".join(m["content"] for m in r["messages"]) + "\n" for r in rows))
    spec = TinyModelSpec(output_dir=str(work / f"base_{args.hidden}_{args.layers}_{args.heads}"),
                         corpus=[str(work / "corpus.txt")], hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                         intermediate_size=4 * args.hidden, overwrite=True)
    base = build_tiny_model(spec)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = SFTConfig(output_dir=str(work / "sft"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, logging_steps=50,
                    weight_decay=args.weight_decay, adam_beta2=args.beta2, save_strategy="no", report_to=[], assistant_only_loss=not args.full_loss,
                    seed=args.seed, bf16=False, use_cpu=True, max_length=args.max_length, dataloader_num_workers=0,
                    disable_tqdm=True, packing=args.packing, padding_free=args.packing)
    start = time.time()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows).shuffle(seed=args.seed),
                         processing_class=tok)
    trainer.train()
    train_s = time.time() - start
    trainer.save_model(str(work / "sft"))  # to inspect replies: pipeline.evaluate --model_name_or_path <work>/sft
    tok.save_pretrained(str(work / "sft"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    start = time.time()
    metrics = evaluate(model, tok, tasks, n=args.eval_n, system_prompt=system, max_new_tokens=96)
    print(json.dumps({**{k: v for k, v in vars(args).items() if k not in ("work",)}, "params": n_params,
                      "rows": len(rows), "train_seconds": round(train_s, 1),
                      "steps_per_s": round(args.steps / train_s, 2), "eval_seconds": round(time.time() - start, 1),
                      "last_loss": round(losses[-1], 3) if losses else None,
                      **{k.split("/")[1]: round(v, 3) for k, v in metrics.items()}}), flush=True)


if __name__ == "__main__":
    main()

"""Batched vs one-prompt-at-a-time NIAH with the model's declared streaming heads in HeadKVCache(prefill="local"):
left padding must not change a row's answer (docs/kv.md, "Left padding").

    python scripts/check_niah_padding.py outputs/tiny/sft
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from pipeline.kv.cache import HeadKVCache, use_headwise_attention
from pipeline.kv.evaluate import niah_examples, generate_answers, reply_tokens
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
spec = m.config.streaming_heads
use_headwise_attention(m)
mk = lambda: HeadKVCache(m.config, spec["full_heads"], spec["sink"], spec["window"], "local")
sp = "Give only the final answer."
for L in (256, 512):
    for d in (0.1, 0.5, 0.9):
        exs = niah_examples(tok, "passkey", L, d, 34, 0)
        new = max(reply_tokens(tok, e) for e in exs) + 8
        t = time.time(); b = sum(generate_answers(m, tok, exs, mk, new, True, sp)); tb = time.time() - t
        t = time.time(); s = sum(sum(generate_answers(m, tok, [e], mk, new, True, sp)) for e in exs); ts = time.time() - t
        print(L, d, "batched", b, "single", s, f"{tb:.1f}s {ts:.1f}s", flush=True)

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (GQA: 4 query / 2 KV heads, hidden 64) with a locally trained tokenizer, built once."""
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    spec = TinyModelSpec(output_dir=str(out), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=512, max_position_embeddings=1024)
    return build_tiny_model(spec)


def _write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> Path:
    """64 conversational SFT rows (a system prompt on half of them)."""
    import random

    rng, rows = random.Random(0), []
    for i in range(64):
        a, b = rng.randrange(100), rng.randrange(100)
        msgs = [{"role": "system", "content": "Think step by step."}] if i % 2 else []
        msgs += [{"role": "user", "content": f"What is {a}+{b}?"},
                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}.\nAnswer: {a + b}"}]
        rows.append({"messages": msgs})
    return _write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


@pytest.fixture(scope="session")
def dpo_jsonl(tmp_path_factory) -> Path:
    """64 conversational preference pairs: the right sum vs an off-by-one."""
    import random

    rng, rows = random.Random(1), []
    for _ in range(64):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"Answer: {a + b}"}],
                     "rejected": [{"role": "assistant", "content": f"Answer: {a + b + 1}"}]})
    return _write_jsonl(tmp_path_factory.mktemp("data") / "dpo.jsonl", rows)

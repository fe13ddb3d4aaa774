"""Every real recipe (`recipes/<model>/*.yaml`) run on its exact path at tiny scale.

A recipe keeps every key that decides its code path (stage, full / LoRA / QLoRA and LoRA dropout, checkpointing
and its mode, packing and padding-free, the reference mode, the long-context switches, save and eval strategies,
batch size and gradient accumulation, bf16, the accelerate config and so its ZeRO stage and offload). What shrinks:
- the model: a tiny one of the same family built from config (same attention layout: the GQA ratio, sequence
  parallelism dividing the query and KV heads, untied embeddings), with a locally trained tokenizer and chat template;
- the data: a few rows in the real dataset's own columns and split names (sources in DATASETS), saved with
  `save_to_disk`, read through the recipe's own `datasets:` / `dataset_name` entry;
- lengths and tiles (`max_length` / 16, at most 512; 64-token tiles and vocabulary chunks), so that every switch the
  recipe turns on is active; `sequence_parallel_size` -> the number of processes;
- the schedule: 4 steps, checkpoints and evaluation every 2, the loss logged every step, learning rate 1e-2: large
  enough for every bf16 weight to move in 2 steps (at 1.0, a norm weight's bf16 spacing is 2^-7, and updates of the
  recipes' 5e-7 .. 2e-4 round away without fp32 master weights);
- `eval_split_size` (2000 rows) -> 4.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from pipeline.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]
REAL_RECIPES = sorted(p for p in ROOT.glob("recipes/*/*.yaml") if p.parent.name != "tiny")

# The architecture family of each model folder, at tiny width: the real models' GQA ratio (Llama-3.1-8B and
# Mistral-7B 32 query / 8 KV heads; Qwen2.5-7B 28 / 4), head dim 8, untied embeddings like theirs.
FAMILIES = {
    "llama-3.1-8b": dict(arch="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "mistral-7b": dict(arch="mistral", hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=112, num_attention_heads=14, num_key_value_heads=2),
}


def _chat(rng: random.Random, turns: int = 1, words: int = 12) -> list[dict]:
    msgs = []
    for _ in range(turns):
        a, b = rng.randrange(100), rng.randrange(100)
        msgs += [{"role": "user", "content": f"What is {a} plus {b}? " + "please " * rng.randrange(words)},
                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}. " + "indeed " * rng.randrange(words)}]
    return msgs


def _ultrachat(rng):  # huggingface.co/datasets/HuggingFaceH4/ultrachat_200k (card: prompt, prompt_id, messages)
    messages = _chat(rng, turns=rng.randrange(1, 4))
    return {"prompt": messages[0]["content"], "prompt_id": f"{rng.getrandbits(64):016x}", "messages": messages}


def _ultrafeedback(rng):  # huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized (card: prompt, prompt_id,
    chosen = _chat(rng)    # chosen, rejected, messages, score_chosen, score_rejected; chosen/rejected are full chats)
    rejected = [chosen[0], {"role": "assistant", "content": chosen[1]["content"].replace(" is ", " is not ")}]
    return {"prompt": chosen[0]["content"], "prompt_id": f"{rng.getrandbits(64):016x}", "chosen": chosen,
            "rejected": rejected, "messages": chosen, "score_chosen": 8.0, "score_rejected": 4.0}


def _document(rng, words):
    return " ".join(rng.choice(("the", "grass", "is", "green", "sky", "blue", "and", "so")) for _ in range(words))


def _longreward_sft(rng):  # github.com/THUDM/LongReward data/example/sft.jsonl (the card lists no columns)
    return {"idx": rng.randrange(10**6), "context": _document(rng, rng.randrange(40, 120)),
            "query": "What colour is the grass?", "answer": "The grass is green, says the document."}


def _longreward_dpo(rng):  # github.com/THUDM/LongReward batch_inference/3_get_pairs.py
    return {"idx": rng.randrange(10**6), "context": _document(rng, rng.randrange(40, 120)),
            "query": "What colour is the sky?", "win_response": "The sky is blue.",
            "lose_response": "The document does not say what colour the sky is, so it must be green."}


# hub id -> {split: row maker}; the splits the real dataset has (and the recipes name).
DATASETS = {
    "HuggingFaceH4/ultrachat_200k": {"train_sft": _ultrachat, "test_sft": _ultrachat},
    "HuggingFaceH4/ultrafeedback_binarized": {"train_prefs": _ultrafeedback, "test_prefs": _ultrafeedback},
    "THUDM/LongReward-10k": {"sft": _longreward_sft, "dpo_llama3.1_8b": _longreward_dpo},
}
PREPARED = {"outputs/data/longreward-10k": "THUDM/LongReward-10k"}  # made by scripts/prepare_longreward.py


def stage_of(recipe: Path) -> str:
    return "dpo" if "dpo" in recipe.stem.split("_") else "sft"


def datasets_of(recipe: Path) -> list[str]:
    cfg = load_yaml(recipe)
    names = [d["path"] for d in cfg.get("datasets") or []]
    if cfg.get("dataset_name"):
        names.append(PREPARED.get(cfg["dataset_name"], cfg["dataset_name"]))
    return names


def build_dataset(name: str, out: Path, rows: int = 64, seed: int = 0) -> Path:
    """A save_to_disk DatasetDict in the real dataset's columns and splits (prepared ones through their script)."""
    import datasets

    rng = random.Random(seed)
    data = datasets.DatasetDict({split: datasets.Dataset.from_list([make(rng) for _ in range(rows)])
                                 for split, make in DATASETS[name].items()})
    raw = out / name.replace("/", "__")
    data.save_to_disk(str(raw))
    if name not in PREPARED.values():
        return raw
    from scripts.prepare_longreward import main as prepare

    prepared = raw.with_name(raw.name + "-prepared")
    assert prepare(["--source", str(raw), "--out", str(prepared)]) == 0
    return prepared


def build_family_model(family: str, out: Path) -> Path:
    from pipeline.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(output_dir=str(out / family), num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                         max_position_embeddings=2048, tie_word_embeddings=False, **FAMILIES[family])
    return Path(build_tiny_model(spec))


def tiny_args(recipe: Path, model: Path, data: dict[str, Path], out: Path, processes: int,
              lr: str = "1e-2") -> list[str]:
    """The command-line overrides that run `recipe` at tiny scale (see the module docstring)."""
    cfg = load_yaml(recipe)
    args = ["--config", str(recipe), "--model_name_or_path", str(model), "--output_dir", str(out),
            "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", lr]
    if cfg.get("chat_template_path"):
        args += ["--chat_template_path", str(model)]
    if cfg.get("datasets"):
        entries = [{**d, "path": str(data[d["path"]])} for d in cfg["datasets"]]
        args += ["--datasets", json.dumps(entries)]
    if cfg.get("dataset_name"):
        args += ["--dataset_name", str(data[PREPARED.get(cfg["dataset_name"], cfg["dataset_name"])])]
    if cfg.get("eval_split_size"):
        args += ["--eval_split_size", "4"]
    if cfg.get("eval_strategy", "no") != "no":
        args += ["--eval_steps", "2"]
    if cfg.get("max_length"):
        args += ["--max_length", str(min(512, max(128, cfg["max_length"] // 16)))]
    if cfg.get("tiled_mlp") or cfg.get("lean_rmsnorm"):
        args += ["--tiled_mlp_tile_tokens", "64"]
    if cfg.get("loss_vocab_chunk"):
        args += ["--loss_vocab_chunk", "64"]
    if cfg.get("sequence_parallel_size", 1) > 1:
        args += ["--sequence_parallel_size", str(processes)]
    return args


def switches_off(recipe: Path) -> list[str]:
    """Overrides that turn the recipe's long-context switches off (plain TRL with the same keys)."""
    cfg = load_yaml(recipe)
    off = ["--tiled_mlp", "false", "--lean_rmsnorm", "false", "--loss_vocab_chunk", "null",
           "--checkpoint_offload", "false", "--sequence_parallel_size", "1"]
    if stage_of(recipe) == "dpo" and cfg.get("padding_free"):
        off += ["--padding_free", "false"]  # ours for DPO (TRL's SFT padding-free stays: it is TRL's)
    return off


def has_switches(recipe: Path) -> bool:
    cfg = load_yaml(recipe)
    return any(cfg.get(k) for k in ("tiled_mlp", "lean_rmsnorm", "loss_vocab_chunk", "checkpoint_offload")) or \
        cfg.get("sequence_parallel_size", 1) > 1 or (stage_of(recipe) == "dpo" and cfg.get("padding_free", False))


def uses_lora(recipe: Path) -> bool:
    return bool(load_yaml(recipe).get("use_peft"))


def logged(out: Path) -> dict[int, dict]:
    """step -> the training log entry (loss, grad_norm) of a finished run."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h for h in history if "loss" in h}


def artifact_tensors(path: Path) -> dict:
    """The trained tensors of a saved model: every weight, or a LoRA adapter's lora_A / lora_B (the adapter file also
    holds frozen copies, and trainable-token deltas that only move for tokens the batch contains)."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").is_file():
        return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_" in k}
    return load_file(str(path / "model.safetensors"))


def kill_after(out: Path, step: int, to: Path) -> Path:
    """A copy of a finished run's output as a kill right after checkpoint `step` leaves it."""
    shutil.copytree(out, to)
    for ckpt in to.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (to / "stage_result.json").unlink()
    return to

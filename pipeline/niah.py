"""NIAH evaluation stage: needle-in-a-haystack accuracy with the full KV cache and with head-level KV
compression (full K/V for the top retrieval heads of a registry, sink + window for the rest), plus a
uniform sink + window on every head at the same KV bytes as the StreamingLLM baseline.

    python -m pipeline.niah --config recipes/tiny/niah.yaml [--full_heads 4 --window 32 ...]

Writes <output_dir>/niah.json, niah_<policy>.png heatmaps and stage_result.json.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from pipeline.config import RecipeError, cli, parse
from pipeline.io import atomic_write_json, write_stage_result

logger = logging.getLogger("pipeline.niah")


@dataclasses.dataclass
class NiahArguments:
    model_name_or_path: str = "data/models/retrieval-tiny"
    output_dir: str = "outputs/tiny/niah"
    registry: str | None = dataclasses.field(
        default=None, metadata={"help": "Retrieval-head registry JSON. Default: <model>/retrieval_heads.json."})
    full_heads_from: str = dataclasses.field(default="registry", metadata={
        "help": "'registry': the top full_heads of the registry; 'model': the heads a model trained with streaming "
                "heads declares (config.streaming_heads; sink, window and prefill: local must match it)."})
    full_heads: int | None = dataclasses.field(default=None, metadata={
        "help": "KV heads kept whole (count; with full_heads_from: model, the count it declares)."})
    full_fraction: float | None = dataclasses.field(
        default=None, metadata={"help": "KV heads kept whole, as a fraction of all KV heads (instead of full_heads)."})
    sink: int = 4
    window: int = 32
    prefill: str = dataclasses.field(default="full", metadata={"help": "'full' (attend, then evict) or 'local'."})
    task: str = "passkey"
    key_digits: int = dataclasses.field(default=5, metadata={"help": "Passkey length (distinct digits, 1-10)."})
    lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512])
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5, 0.9])
    n_per_cell: int = 8
    seed: int = 0
    chat: bool = dataclasses.field(default=False, metadata={
        "help": "Ask through the chat template (an aligned chat model) instead of the raw document (a base model)."})
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "With chat: the system message."})

    def __post_init__(self):
        if self.full_heads_from not in ("registry", "model"):
            raise ValueError(f"key 'full_heads_from' must be 'registry' or 'model', got {self.full_heads_from!r}")
        if self.full_heads_from == "model":
            if self.full_fraction is not None:
                raise ValueError("key 'full_fraction': with full_heads_from: model the model declares its heads")
            return self._check()
        if (self.full_heads is None) == (self.full_fraction is None):
            raise ValueError("set exactly one of keys 'full_heads' and 'full_fraction'")
        if self.full_fraction is not None and not 0 <= self.full_fraction <= 1:
            raise ValueError(f"key 'full_fraction' must be in [0, 1], got {self.full_fraction}")
        self._check()

    def _check(self):
        if self.prefill not in ("full", "local"):
            raise ValueError(f"key 'prefill' must be 'full' or 'local', got {self.prefill!r}")
        if self.task not in ("passkey", "kv_haystack"):
            raise ValueError(f"key 'task' must be 'passkey' or 'kv_haystack', got {self.task!r}")
        if not 1 <= self.key_digits <= 10:
            raise ValueError(f"key 'key_digits' must be in [1, 10], got {self.key_digits}")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("key 'lengths' must list context lengths >= 64 tokens")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ValueError("key 'depths' must list fractions in [0, 1]")


def declared_heads(args: NiahArguments, cfg, source: str) -> list[list[int]]:
    """The full heads a model trained with streaming heads declares; the recipe's cache must be the one it was
    trained for."""
    spec = getattr(cfg, "streaming_heads", None)
    if not spec:
        raise RecipeError(f"{source}: key 'full_heads_from': model {args.model_name_or_path} declares no streaming "
                          "heads (config.streaming_heads; train with the streaming_heads switch, or use 'registry')")
    for key in ("sink", "window"):
        if getattr(args, key) != spec[key]:
            raise RecipeError(f"{source}: key '{key}': {getattr(args, key)}, but the model was trained with "
                              f"{key} {spec[key]} (config.streaming_heads)")
    if args.prefill != "local":
        raise RecipeError(f"{source}: key 'prefill': the model was trained with streaming heads for every query; "
                          "set prefill: local")
    n = sum(map(len, spec["full_heads"]))
    if args.full_heads is not None and args.full_heads != n:
        raise RecipeError(f"{source}: key 'full_heads': {args.full_heads}, but the model declares {n}")
    return [list(row) for row in spec["full_heads"]]


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,), _, source = parse([NiahArguments], argv, prog="python -m pipeline.niah")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.model_name_or_path, "config.json").is_file():
        raise RecipeError(f"{source}: key 'model_name_or_path': no model at {args.model_name_or_path}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.kv.cache import HeadKVCache, expected_bytes, use_headwise_attention
    from pipeline.kv.detect import heads_by_layer, load_registry, top_heads
    from pipeline.kv.evaluate import niah_cells, niah_grid, plot_grid, prompt_text
    from pipeline.kv.streaming_heads import describe

    # Model + budget
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = use_headwise_attention(AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32))
    model.eval()
    cfg = model.config
    n_kv = cfg.num_hidden_layers * cfg.num_key_value_heads
    if args.full_heads_from == "model":
        full, registry_path = declared_heads(args, cfg, source), None
        k = sum(map(len, full))
    else:
        registry_path = args.registry or str(Path(args.model_name_or_path) / "retrieval_heads.json")
        try:
            reg = load_registry(registry_path, model)
        except ValueError as e:
            raise RecipeError(f"{source}: key 'registry': {e}") from None
        k = args.full_heads if args.full_heads is not None else round(args.full_fraction * n_kv)
        if not 0 <= k <= n_kv:
            raise RecipeError(f"{source}: key 'full_heads': {k} is not in [0, {n_kv}]")
        full = heads_by_layer(top_heads(reg["kv_scores"], k), cfg.num_hidden_layers)
    none = [[] for _ in range(cfg.num_hidden_layers)]

    # Uniform window at equal bytes for the longest context: every head keeps sink + w tokens.
    T = max(args.lengths)
    per_head = (k * T + (n_kv - k) * min(T, args.sink + args.window)) / n_kv
    uniform_window = max(1, round(per_head) - args.sink)
    policies = {
        "full": None,
        "retrieval_heads": lambda: HeadKVCache(cfg, full, args.sink, args.window, args.prefill),
        "uniform_window": lambda: HeadKVCache(cfg, none, args.sink, uniform_window, args.prefill),
    }

    # The prompts' real lengths, as the model reads them (chat template included): the grid's axis
    def render(e):
        return prompt_text(tok, e, args.chat, args.system_prompt)

    cells = niah_cells(tok, args.lengths, args.depths, args.n_per_cell, args.task, args.seed, args.key_digits, render)
    prompt_tokens = {}
    for n_tokens in args.lengths:
        ns = [len(tok(render(e), add_special_tokens=False)["input_ids"]) for d in args.depths
              for e in cells[n_tokens, d]]
        prompt_tokens[n_tokens] = [min(ns), max(ns)]
    logger.info("prompt tokens per length: %s", ", ".join(f"{n}: {a}-{b}" for n, (a, b) in prompt_tokens.items()))

    # Work
    t0 = time.time()
    results, metrics = {}, {}
    for name, make in policies.items():
        grid = niah_grid(model, tok, args.lengths, args.depths, args.n_per_cell, make, args.task, args.seed,
                         args.key_digits, args.chat, args.system_prompt, cells)
        acc = sum(map(sum, grid)) / (len(args.lengths) * len(args.depths))
        results[name] = {"grid": grid, "accuracy": acc}
        metrics[f"niah_acc/{name}"] = round(acc, 4)
        plot_grid(Path(args.output_dir) / f"niah_{name}.png", grid, args.lengths, args.depths,
                  f"{args.task} NIAH, {name} (acc {acc:.2f})")
        logger.info("%s: accuracy %.3f", name, acc)
    for name, (heads, window) in {"retrieval_heads": (full, args.window), "uniform_window": (none, uniform_window)}.items():
        ratio = expected_bytes(cfg, heads, T, 1, args.sink, window) / expected_bytes(cfg, none, T, 1, 0, T)
        metrics[f"kv_bytes_ratio@{T}/{name}"] = round(ratio, 4)
        results[name]["kv_bytes_ratio"] = ratio

    # Save
    metrics["full_heads"] = describe(full)
    atomic_write_json(Path(args.output_dir) / "niah.json", {
        "args": dataclasses.asdict(args), "prompt_tokens": prompt_tokens, "full_heads": full,
        "uniform_window": uniform_window, "registry": registry_path, "results": results,
        "seconds": round(time.time() - t0, 1)})
    artifacts = {"report": str(Path(args.output_dir) / "niah.json"),
                 "kv_cache": (f"use_headwise_attention(model); HeadKVCache(model.config, {full}, sink={args.sink}, "
                              f"window={args.window}, prefill='{args.prefill}') as past_key_values (pipeline.kv.cache)")}
    write_stage_result(args.output_dir, "niah", metrics, artifacts)
    return metrics


if __name__ == "__main__":
    cli(main)

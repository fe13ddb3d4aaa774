"""Every real recipe's exact path at tiny scale (tests/recipe_harness.py says what shrinks and what is kept).

Fast tier, one process each, in-process: the recipe trains 4 steps and logs a nonzero loss and gradient at every
step, every trainable tensor moves between the step-2 checkpoint and the end, the switches it turns on are really
active, and the saved artifact reloads with stock APIs. Slow tier: the same with the recipe's accelerate config on 2
processes (its ZeRO stage and offload, sequence parallelism over both), plus a kill after the step-2 checkpoint and a
resume that logs the uninterrupted run's losses, and for the recipes with switches, plain TRL's per-step losses and
gradient norms from the same recipe with its switches off.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import recipe_harness as H

IDS = [f"{p.parent.name}/{p.name}" for p in H.REAL_RECIPES]
# bf16 on CPU: the switches change the order of floating-point sums, nothing else. The comparisons run at a learning
# rate of 1e-3, where 4 steps keep that rounding from compounding (measured: <= 1e-4 on losses, <= 6e-4 on norms).
LOSS_RTOL, GRAD_NORM_RTOL = 1e-3, 5e-3
# The full fine-tuning long-context recipes under each ZeRO stage: compared with one process without SP, in float32
# (test_sequence_parallel_under_deepspeed_equals_one_process), which stands in for their switches-vs-plain check.
# (recipe, accelerate config, extra overrides); the DPO recipe precomputes its reference log-probs, and once it keeps
# the reference model (a second ZeRO-3 engine, scored sharded at every step) instead.
SFT_FULL, DPO_FULL = "recipes/llama-3.1-8b/longctx_sft_full.yaml", "recipes/llama-3.1-8b/longctx_dpo_full.yaml"
SP_UNDER_ZERO = [(SFT_FULL, "zero3", ()), (DPO_FULL, "zero3", ()),
                 (DPO_FULL, "zero3", ("--precompute_ref_log_probs", "false")),
                 (SFT_FULL, "zero2", ()), (DPO_FULL, "zero1", ()), (DPO_FULL, "zero3_offload", ())]


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    models = {family: H.build_family_model(family, root / "models") for family in H.FAMILIES}
    data = {name: H.build_dataset(name, root / "data") for name in H.DATASETS}
    return models, data


def test_every_real_recipe_is_covered():
    """A new recipe needs its model family and its dataset's format here before it can ship."""
    assert len(H.REAL_RECIPES) >= 9
    for recipe in H.REAL_RECIPES:
        assert recipe.parent.name in H.FAMILIES, f"{recipe}: add its model family to tests/recipe_harness.FAMILIES"
        for name in H.datasets_of(recipe):
            assert name in H.DATASETS, f"{recipe}: add dataset {name}'s format to tests/recipe_harness.DATASETS"


def _assert_trained(out: Path, steps: int = 4):
    log = H.logged(out)
    assert sorted(log) == list(range(1, steps + 1)), log
    for step, entry in log.items():  # a step that trains on nothing logs 0 (e.g. packed chunks without a reply)
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0 and entry["grad_norm"] > 0, (step, entry)
    before, after = H.artifact_tensors(out / "checkpoint-2"), H.artifact_tensors(out)
    assert before.keys() == after.keys() and before
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert not frozen, f"tensors that did not train between steps 2 and 4: {frozen[:5]}"


def _assert_reloads(out: Path, lora: bool):
    if lora:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
        assert any("lora_" in n for n, _ in model.named_parameters())
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template


def _assert_same_steps(ours: Path, plain: Path, steps=None):
    a, b = H.logged(ours), H.logged(plain)
    steps = steps or sorted(b)
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=LOSS_RTOL), (step, a[step], b[step])
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=GRAD_NORM_RTOL), (step, a[step], b[step])


# ------------------------------------------------------------------------------------------------ fast: 1 process


class _Active:
    """Counts what the long-context switches really run during a stage (the CPU counts as the offload device)."""

    def __init__(self, monkeypatch):
        import trl.trainer.utils as trl_utils

        from pipeline.longctx import offload, rmsnorm, tiled_mlp

        self.seen = {"tiled_mlp": 0, "lean_rmsnorm": 0, "chunks": set(), "offloaded": 0}
        originals = (tiled_mlp.TiledMLPFunction.apply, rmsnorm.RMSNormFunction.apply,
                     trl_utils._ChunkedLogProbFunction.apply)

        def count(key, fn):
            return staticmethod(lambda *a: self.seen.__setitem__(key, self.seen[key] + 1) or fn(*a))

        monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "apply", count("tiled_mlp", originals[0]))
        monkeypatch.setattr(rmsnorm.RMSNormFunction, "apply", count("lean_rmsnorm", originals[1]))
        monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                            staticmethod(lambda *a: self.seen["chunks"].add(a[5]) or originals[2](*a)))
        monkeypatch.setattr(offload, "DEVICE_TYPES", ("cpu",))
        real = offload.offload_saved_tensors

        def counting():
            hooks = real(min_bytes=0)  # tiny activations are far below the 1 MB worth a transfer

            def pack(t):
                packed = hooks.pack_hook(t)
                self.seen["offloaded"] += packed is not t
                return packed

            return torch.autograd.graph.saved_tensors_hooks(pack, hooks.unpack_hook)

        import pipeline.longctx.trainer as trainer_module

        monkeypatch.setattr(trainer_module, "offload_saved_tensors", counting)

    def check(self, recipe: Path):
        cfg = H.load_yaml(recipe)
        if cfg.get("tiled_mlp"):
            assert self.seen["tiled_mlp"] > 0
        if cfg.get("lean_rmsnorm"):
            assert self.seen["lean_rmsnorm"] > 0
        if cfg.get("loss_vocab_chunk"):
            assert self.seen["chunks"] == {64}, self.seen["chunks"]
        if cfg.get("checkpoint_offload"):
            assert self.seen["offloaded"] > 0


def _run_in_process(recipe, args):
    return importlib.import_module(f"pipeline.{H.stage_of(recipe)}").main(args)


@pytest.mark.parametrize("recipe", H.REAL_RECIPES, ids=IDS)
def test_recipe_path_one_process(recipe, harness, tmp_path, monkeypatch):
    models, data = harness
    monkeypatch.chdir(H.ROOT)
    model = models[recipe.parent.name]
    active = _Active(monkeypatch)
    out = tmp_path / "run"
    metrics = _run_in_process(recipe, H.tiny_args(recipe, model, data, out, processes=1))
    assert metrics["global_step"] == 4 and metrics["world_size"] == 1
    _assert_trained(out)
    active.check(recipe)
    _assert_reloads(out, H.uses_lora(recipe))


def test_qlora_recipe_resumes_in_its_own_precision(harness, tmp_path, monkeypatch):
    """Found by this harness: TRL trains the QLoRA recipe's adapter in bf16, the Trainer's resume loaded it (and its
    optimizer state) in float32, and the resumed steps drifted (one process, step 3: loss 5.45303 vs 5.45334, gradient
    norm 3.1711 vs 3.1719). Now a kill after the step-2 checkpoint resumes into the same numbers."""
    models, data = harness
    monkeypatch.chdir(H.ROOT)
    recipe = H.ROOT / "recipes/llama-3.1-8b/sft_qlora.yaml"
    out = tmp_path / "run"
    _run_in_process(recipe, H.tiny_args(recipe, models["llama-3.1-8b"], data, out, processes=1))
    resumed = H.kill_after(out, 2, tmp_path / "resumed")
    _run_in_process(recipe, H.tiny_args(recipe, models["llama-3.1-8b"], data, resumed, processes=1))
    a, b = H.logged(out), H.logged(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]


# ------------------------------------------------------------------------------------------------ slow: 2 processes


def _launch(recipe: Path, args: list[str], accelerate_config: str | None = None,
            wrapper: tuple[str, ...] = (), env_extra: dict | None = None) -> subprocess.CompletedProcess:
    cfg = H.load_yaml(recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions")),
           **(env_extra or {})}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(H.ROOT / (accelerate_config or cfg["accelerate_config"])), "--num_processes", "2"]
    script = str(H.ROOT / "pipeline" / f"{H.stage_of(recipe)}.py")
    proc = subprocess.run([*launch, *wrapper, script, *args], cwd=H.ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Error" in line]
    assert proc.returncode == 0, "\n".join(ranks[-10:]) + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("recipe", H.REAL_RECIPES, ids=IDS)
def test_recipe_path_two_processes(recipe, harness, tmp_path):
    models, data = harness
    model = models[recipe.parent.name]
    out = tmp_path / "run"
    _launch(recipe, H.tiny_args(recipe, model, data, out, processes=2))
    result = json.loads((out / "stage_result.json").read_text())
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["global_step"] == 4
    _assert_trained(out)
    _assert_reloads(out, H.uses_lora(recipe))

    resumed = H.kill_after(out, 2, tmp_path / "resumed")
    _launch(recipe, H.tiny_args(recipe, model, data, resumed, processes=2))
    a, b = H.logged(out), H.logged(resumed)
    for step in (3, 4):  # logged again after the resume from checkpoint-2
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), (step, a[step], b[step])

    if H.has_switches(recipe) and str(recipe.relative_to(H.ROOT)) not in {path for path, _, _ in SP_UNDER_ZERO}:
        # Dropout masks are drawn per tile, so the comparison runs without them (tests/test_longctx_paths.py checks
        # that the tiles replay theirs); everything else as the recipe says.
        no_dropout = ["--lora_dropout", "0.0"] if H.uses_lora(recipe) else []
        ours, plain = tmp_path / "ours", tmp_path / "plain"
        _launch(recipe, H.tiny_args(recipe, model, data, ours, processes=2, lr="1e-3") + no_dropout)
        _launch(recipe, H.tiny_args(recipe, model, data, plain, processes=2, lr="1e-3") + no_dropout
                + H.switches_off(recipe))
        _assert_same_steps(ours, plain)


@pytest.mark.slow
def test_length_buckets_two_processes(harness, tmp_path):
    """`length_buckets` under 2 processes, on the 8B SFT recipe's ZeRO-3 launch with packing off: every micro-batch
    either rank trains on lies in one bucket and pads only to its own rows, and the ranks train on different rows
    (accelerate hands each process whole batches of the sequential sampler, `split_batches: false`; a one-process
    test cannot see that)."""
    import datasets
    from transformers import AutoTokenizer

    models, data = harness
    recipe, model = H.ROOT / "recipes/llama-3.1-8b/sft.yaml", models["llama-3.1-8b"]
    tok = AutoTokenizer.from_pretrained(model)
    train = datasets.load_from_disk(str(data["HuggingFaceH4/ultrachat_200k"]))["train_sft"]
    lengths = sorted(len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
                     for m in train["messages"])
    edge = lengths[len(lengths) // 2]
    out, record = tmp_path / "run", tmp_path / "batches"
    _launch(recipe, H.tiny_args(recipe, model, data, out, processes=2) + [
        "--packing", "false", "--length_buckets", f"[{edge}]", "--gradient_accumulation_steps", "1"],
        wrapper=(str(H.ROOT / "tests/record_batches.py"),), env_extra={"RECORD_BATCHES": str(record)})
    assert json.loads((out / "stage_result.json").read_text())["metrics"]["world_size"] == 2
    ranks = [[json.loads(line) for line in Path(f"{record}.rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]  # 4 optimizer steps, no accumulation
    for batch in ranks[0] + ranks[1]:
        assert len({n > edge for n in batch["lengths"]}) == 1, f"a batch mixes buckets at {edge}: {batch['lengths']}"
        assert batch["width"] == max(batch["lengths"])
    rows = [tuple(row) for batch in ranks[0] + ranks[1] for row in batch["rows"]]
    assert len(set(rows)) == len(rows) == 32  # 4 steps x 4 rows x 2 ranks, each row once
    kinds = {batch["lengths"][0] > edge for batch in ranks[0] + ranks[1]}
    assert kinds == {True, False}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [H.ROOT / "recipes/llama-3.1-8b/sft.yaml", H.ROOT / "recipes/llama-3.1-8b/dpo.yaml"],
                         ids=["zero3-sft", "zero3-dpo"])
def test_zero3_recipe_with_tiles_equals_plain(recipe, harness, tmp_path):
    """The ZeRO-3 full fine-tuning recipes with the tiled MLP (DeepSpeed's TiledMLP over partitioned weights, tiles
    agreed across ranks) and the lean RMSNorm on: the per-step losses and gradient norms of the recipe as it is."""
    models, data = harness
    model = models[recipe.parent.name]
    tiles = ["--tiled_mlp", "true", "--lean_rmsnorm", "true", "--tiled_mlp_tile_tokens", "64"]
    ours, plain = tmp_path / "ours", tmp_path / "plain"
    proc = _launch(recipe, H.tiny_args(recipe, model, data, ours, processes=2, lr="1e-3") + tiles)
    assert "tiled MLP (64-token tiles), lean RMSNorm (64-token tiles)" in proc.stdout
    _launch(recipe, H.tiny_args(recipe, model, data, plain, processes=2, lr="1e-3"))
    _assert_same_steps(ours, plain)


@pytest.mark.slow
def test_sequence_parallel_reference_precompute_equals_plain(harness, tmp_path):
    """DPO's precomputed reference pass under SP (the group scores every rank's batch, sharded; full fine-tuning so
    that the reference is the policy itself): the long-context DPO recipe with precompute_ref_log_probs on logs plain
    DDP's per-step losses and gradient norms."""
    models, data = harness
    recipe = H.ROOT / "recipes/llama-3.1-8b/longctx_dpo.yaml"
    precompute = ["--precompute_ref_log_probs", "true", "--use_peft", "false"]
    ours, plain = tmp_path / "ours", tmp_path / "plain"
    _launch(recipe, H.tiny_args(recipe, models["llama-3.1-8b"], data, ours, processes=2, lr="1e-4") + precompute)
    _launch(recipe, H.tiny_args(recipe, models["llama-3.1-8b"], data, plain, processes=2, lr="1e-4") + precompute
            + H.switches_off(recipe))
    _assert_same_steps(ours, plain)


@pytest.mark.slow
@pytest.mark.parametrize("name,zero,extra", SP_UNDER_ZERO,
                         ids=[f"{z}-{Path(n).stem}" + ("-ref-model" if e else "") for n, z, e in SP_UNDER_ZERO])
def test_sequence_parallel_under_deepspeed_equals_one_process(name, zero, extra, harness, tmp_path):
    """The 8B full fine-tuning long-context recipes (SP 2 over both processes, DeepSpeed's Ulysses attention, tiles,
    offloaded checkpoints, padding-free rows) under each ZeRO stage log the per-step losses and gradient norms of plain
    TRL in ONE process without SP on the same 16 sequences a step (gradient accumulation doubled), in float32: the two
    paths then agree to ~1e-6 (bf16 rounds them apart by up to 3e-3 after 4 steps). Every weight trains and the saved
    model reloads with from_pretrained (resuming: test_recipe_path_two_processes, with each recipe's ZeRO-3)."""
    models, data = harness
    recipe = H.ROOT / name
    cfg = H.load_yaml(recipe)
    fp32 = ["--bf16", "false", "--dtype", "float32", *extra]
    ours, plain = tmp_path / "ours", tmp_path / "plain"
    args = H.tiny_args(recipe, models["llama-3.1-8b"], data, ours, processes=2, lr="1e-3") + fp32
    proc = _launch(recipe, args, accelerate_config=f"accelerate_configs/{zero}.yaml")
    assert "sequence parallel over 2 processes" in proc.stdout
    _assert_trained(ours)
    _assert_reloads(ours, lora=False)

    one = H.tiny_args(recipe, models["llama-3.1-8b"], data, plain, processes=1, lr="1e-3") + fp32 + \
        H.switches_off(recipe) + ["--gradient_accumulation_steps", str(2 * cfg["gradient_accumulation_steps"])]
    _run_in_process(recipe, one)
    a, b = H.logged(ours), H.logged(plain)
    # Up to the end of the first epoch: there the last step of 2 processes holds one more sequence than one process's
    # (SFT packs the 64 rows into 43; accelerate's even_batches repeats one to give both ranks as many).
    full = [step for step in sorted(b) if b[step]["epoch"] < 1]
    assert len(full) >= 2, b
    for step in full:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), (step, a[step], b[step])
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), (step, a[step], b[step])

"""Long-context switches: every switch and combination gives the plain path's loss and gradients (tiny models, CPU).

The multi-process sequence-parallel checks are in tests/test_longctx_sp.py (marked slow).
"""

import json
import subprocess
import sys

import pytest
import torch
import trl.trainer.utils as trl_utils

from pipeline.longctx import LongContextArguments, long_context_trainer
from pipeline.longctx.fused_forward import wrap_fused_forward
from pipeline.longctx.offload import offload_saved_tensors
from pipeline.longctx.rmsnorm import patch_rmsnorm
from pipeline.longctx.tiled_mlp import patch_tiled_mlp
from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION

from conftest import ROOT

ATOL = 2e-5
TRL_CHUNK = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def tiny_lm(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
    from trl.trainer.utils import add_fused_lm_head

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    add_fused_lm_head(model)
    return model


def batch(rows=4, width=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate([width, width - 6, 9, width - 1][:rows]):
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a "prompt"
    return ids, mask, labels


def loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    # per-sequence sums (DPO) and the token mean (SFT) both feed the loss, so both are checked
    loss = out.loss + 0.1 * (out.log_probs.sum(1) * torch.arange(1, ids.shape[0] + 1)).sum()
    loss.backward()
    return out.log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (lp_a, g_a), (lp_b, g_b) = a, b
    assert lp_a.shape == lp_b.shape
    torch.testing.assert_close(lp_a, lp_b, atol=ATOL, rtol=1e-4)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_plain(arch, checkpointing):
    data = batch()
    plain = loss_and_grads(tiny_lm(arch), *data)
    model = tiny_lm(arch)
    assert patch_tiled_mlp(model, tile_tokens=7) == 2  # 92 tokens -> 14 tiles per layer
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    assert_same(plain, loss_and_grads(model, *data))


def test_tiled_mlp_short_input_takes_plain_path_and_patch_is_idempotent():
    model = tiny_lm("llama")
    assert patch_tiled_mlp(model, tile_tokens=10_000) == 2
    assert patch_tiled_mlp(model, tile_tokens=10_000) == 0
    assert list(model.state_dict()) == list(tiny_lm("llama").state_dict())  # checkpoints keep their names


def test_tiled_mlp_rejects_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="no (gated MLP|decoder layers)"):
        patch_tiled_mlp(model, 8)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_rmsnorm_equals_plain(arch, checkpointing):
    data = batch()
    plain = loss_and_grads(tiny_lm(arch), *data)
    model = tiny_lm(arch)
    assert patch_rmsnorm(model, tile_tokens=7) == 5  # 2 per layer + the final norm
    assert patch_rmsnorm(model, tile_tokens=7) == 0
    patch_tiled_mlp(model, tile_tokens=7)
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    assert_same(plain, loss_and_grads(model, *data))


def _saved_bytes(fn, *inputs):
    """Bytes of the tensors autograd saves for backward while running fn (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, sum(seen.values())


def test_lean_rmsnorm_bf16_matches_and_saves_two_thirds():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    norms = [LlamaRMSNorm(64).to(torch.bfloat16) for _ in range(2)]
    norms[0].weight.data.uniform_(0.5, 1.5)
    norms[1].load_state_dict(norms[0].state_dict())
    patch_rmsnorm(norms[1], tile_tokens=16)
    grad = torch.randn(3, 50, 64, dtype=torch.bfloat16)
    results = []
    for norm in norms:
        out, saved = _saved_bytes(norm, x)
        dx, dw = torch.autograd.grad(out, (x, norm.weight), grad)
        results.append((out, dx, dw, saved))
    (out, dx, dw, plain_saved), (lean_out, lean_dx, lean_dw, lean_saved) = results
    assert torch.equal(out, lean_out)  # same forward formula, bit for bit
    torch.testing.assert_close(lean_dx, dx, atol=2e-2, rtol=2e-2)  # bf16 rounding of a different op order
    torch.testing.assert_close(lean_dw, dw, atol=5e-2, rtol=2e-2)
    # plain: the fp32 input (2 units) + the rounded normalised bf16 (1); lean: the bf16 input (1) + 1 float per token
    assert lean_saved <= x.numel() * 2 + 3 * 50 * 4 + 64 * 2
    assert plain_saved >= 3 * x.numel() * 2
    short = LlamaRMSNorm(64).to(torch.bfloat16)
    short.load_state_dict(norms[0].state_dict())
    patch_rmsnorm(short, tile_tokens=150)  # 150 tokens: one tile, so the plain path (bit-for-bit, same saves)
    short_out, short_saved = _saved_bytes(short, x)
    assert short_out.grad_fn.name() == out.grad_fn.name() and short_saved == plain_saved


def test_offload_saves_copies_and_skips_parameters():
    # On CPU the hooks normally leave tensors alone; told to treat CPU as the device, they copy like on a GPU.
    x = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000))
    with offload_saved_tensors(device_types=("cpu",), min_bytes=0):
        y = (x * x * w).sum()
    x.data.add_(1.0)  # no version bump: a saved reference would see this, a copy does not
    w.data.mul_(2.0)  # parameters are kept by reference, so the gradient sees the new weight
    y.backward()
    torch.testing.assert_close(x.grad, 2 * (x.data - 1.0) * w.data)
    with offload_saved_tensors():  # CPU tensors are not offloaded by default
        y = (x * x).sum()
    x.data.add_(1.0)
    x.grad = None
    y.backward()
    torch.testing.assert_close(x.grad, 2 * x.data)


def test_offloaded_reentrant_checkpoints_equal_plain():
    data = batch()
    plain = loss_and_grads(tiny_lm("llama"), *data)
    model = tiny_lm("llama")
    patch_rmsnorm(model, 7)
    patch_tiled_mlp(model, 7)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask, labels = data
    model.zero_grad()
    with offload_saved_tensors(device_types=("cpu",), min_bytes=0):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        loss = out.loss + 0.1 * (out.log_probs.sum(1) * torch.arange(1, ids.shape[0] + 1)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same(plain, (out.log_probs.detach(), grads))


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("attention", [ATTN_IMPLEMENTATION, "sdpa"])  # per-sequence SDPA / transformers' packed mask
def test_packed_rows_equal_padded_rows(tiled, attention):
    data = batch()
    plain = loss_and_grads(tiny_lm("llama"), *data)
    model = tiny_lm("llama")
    model.set_attn_implementation(attention)
    wrap_fused_forward(model, pack=True)
    if tiled:
        patch_tiled_mlp(model, 5)
        model.train()
        model.gradient_checkpointing_enable()
    assert_same(plain, loss_and_grads(model, *data))


def test_packed_sequences_do_not_see_each_other():
    ids, mask, labels = batch()
    model = tiny_lm("llama")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    wrap_fused_forward(model, pack=True)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        changed = ids.clone()
        changed[0] = (changed[0] + 1) % 300  # the first sequence comes before all others in the packed row
        after = model(input_ids=changed, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(before[1:], after[1:])
    assert not torch.allclose(before[0], after[0])


def test_packing_rejects_left_padding():
    ids, mask, labels = batch()
    model = tiny_lm("llama")
    wrap_fused_forward(model, pack=True)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=mask.flip(1), labels=labels, fused_lm_head=True)


# ----------------------------------------------------------------------------------------------------------
# Through the trainers: the recipe switches against TRL's plain path, loss and gradients of one batch
# ----------------------------------------------------------------------------------------------------------

def _pairs(n=4):
    rows = []
    for i in range(n):
        prompt = " ".join(["the answer is"] * (3 + 4 * i)) + f" {i}?"
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": f"it is {i * 7}" + " yes" * (i % 3)}],
                     "rejected": [{"role": "assistant", "content": f"no {i}" + " so" * (3 - i % 3)}]})
    return rows


def _trainer_grads(trainer_cls, args, model_dir, dataset, ref=False):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    kwargs = dict(ref_model=AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")) if ref else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(dataset), processing_class=tok,
                          **kwargs)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_trainers_agree(a, b):
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=1e-4)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("switches", [
    dict(padding_free=True),
    dict(tiled_mlp_tile_tokens=16),
    dict(loss_vocab_chunk=8),
    dict(padding_free=True, tiled_mlp_tile_tokens=16, loss_vocab_chunk=8, checkpoint_offload=True),
])
def test_dpo_switches_equal_plain_dpo(tiny_model_dir, tmp_path, switches):
    from trl import DPOConfig, DPOTrainer

    def config(**kw):
        return DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=None,
                         per_device_train_batch_size=4, gradient_checkpointing=False, **kw)

    plain = _trainer_grads(DPOTrainer, config(), tiny_model_dir, _pairs(), ref=True)
    lc = LongContextArguments(tiled_mlp=True, lean_rmsnorm=True,
                              **{k: v for k, v in switches.items() if k != "padding_free"})
    args = config(padding_free=switches.get("padding_free", False))
    ours = _trainer_grads(long_context_trainer(DPOTrainer, lc, args), args, tiny_model_dir, _pairs(), ref=True)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == TRL_CHUNK  # set only around our forwards, then restored
    _assert_trainers_agree(plain, ours)


def _chats(n=4):
    return [{"messages": [{"role": "user", "content": "add " + " ".join(str(j) for j in range(i + 2))},
                          {"role": "assistant", "content": "the sum is " + str(sum(range(i + 2))) + " ok" * i}]}
            for i in range(n)]


@pytest.mark.parametrize("switches", [dict(padding_free=True),
                                      dict(padding_free=True, tiled_mlp_tile_tokens=16, loss_vocab_chunk=8)])
def test_sft_switches_equal_plain_sft(tiny_model_dir, tmp_path, switches):
    from trl import SFTConfig, SFTTrainer

    def config(**kw):
        return SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=None,
                         per_device_train_batch_size=4, gradient_checkpointing=False, **kw)

    plain = _trainer_grads(SFTTrainer, config(), tiny_model_dir, _chats())
    lc = LongContextArguments(tiled_mlp=True, lean_rmsnorm=True,
                              **{k: v for k, v in switches.items() if k != "padding_free"})
    args = config(padding_free=True)
    ours = _trainer_grads(long_context_trainer(SFTTrainer, lc, args), args, tiny_model_dir, _chats())
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == TRL_CHUNK
    _assert_trainers_agree(plain, ours)


def test_sequence_parallel_needs_divisible_heads(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # 4 heads, 2 KV heads
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    cls = long_context_trainer(SFTTrainer, LongContextArguments(sequence_parallel_size=4), args)
    with pytest.raises(ValueError, match="must divide the attention heads"):
        cls(model=model, args=args, train_dataset=Dataset.from_list(_chats()),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/longctx_*.yaml")
                 if not p.name.endswith(("_data.yaml", "_pipeline.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_longctx_recipes_parse_strictly(recipe):
    from pipeline.config import DataArguments, ModelArguments, parse
    from trl import DPOConfig, SFTConfig

    stage = DPOConfig if "dpo" in recipe.name else SFTConfig
    (_, training, _, lc), _, _ = parse([DataArguments, stage, ModelArguments, LongContextArguments],
                                       ["--config", str(recipe)])
    assert lc.tiled_mlp and training.activation_checkpointing


def test_bad_switch_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "pipeline.sft", "--config", "recipes/tiny/longctx_sft.yaml",
                           "--dry_run", "--sequence_parallel_size", "0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: recipes/tiny/longctx_sft.yaml: key 'sequence_parallel_size' must be >= 1"


def test_passkey_data(tmp_path):
    from pipeline.longctx.data import main

    out = main(["--output_dir", str(tmp_path), "--rows", "3", "--min_words", "20", "--max_words", "40"])
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    assert len(dpo) == 3 and all(r["chosen"] != r["rejected"] for r in dpo)
    key = dpo[0]["chosen"][0]["content"].split()[-1].rstrip(".")
    assert f"The pass key is {key}." in dpo[0]["prompt"][0]["content"]


def test_sequence_parallel_under_every_zero_stage_parses(monkeypatch):
    """SP is accepted under each DeepSpeed config (it was refused before); with accelerate's own parallelism_config SP
    on as well it is a one-line error naming both."""
    from trl import DPOConfig

    from pipeline.config import DataArguments, ModelArguments, parse, zero_stage
    from pipeline.longctx.trainer import check_switches

    recipe = ROOT / "recipes/llama-3.1-8b/longctx_dpo_full.yaml"
    for zero, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        (data, training, _, lc), _, _ = parse(
            [DataArguments, DPOConfig, ModelArguments, LongContextArguments],
            ["--config", str(recipe), "--accelerate_config", str(ROOT / f"accelerate_configs/{zero}.yaml")])
        assert zero_stage(training, data) == stage and lc.sequence_parallel_size == 8
        assert check_switches(lc, training, stage) is None, zero
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    problem = check_switches(lc, training, 3)
    assert "parallelism_config sp_size" in problem and "sequence_parallel_size" in problem


def test_sequence_parallel_without_deepspeed_is_one_line_error(monkeypatch):
    import importlib.util

    from trl import SFTConfig

    from pipeline.longctx.trainer import check_switches

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    problem = check_switches(LongContextArguments(sequence_parallel_size=2), SFTConfig(output_dir="x", use_cpu=True),
                             None)
    assert "DeepSpeed's Ulysses attention" in problem and "[deepspeed]" in problem

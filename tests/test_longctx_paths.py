"""The long-context paths the 8B recipes take, defect by defect (issue #15): dropout under the tiled MLP, what
checkpointing and offload really run, the per-sequence plain path, DPO's reference precompute, the SP guard, and
plain TRL with every switch off. The multi-process cases (sharded optimizer state with epoch / best saves, ZeRO-3)
are in tests/test_longctx_sp.py and tests/test_recipe_paths.py (slow)."""

import json

import pytest
import torch
import trl.trainer.utils as trl_utils

from pipeline.longctx import LongContextArguments, long_context_trainer
from pipeline.longctx import offload as offload_module
from pipeline.longctx.tiled_mlp import TiledMLPFunction, patch_tiled_mlp
from tests.conftest import ROOT
from tests.test_longctx import tiny_lm

TRL_CHUNK = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


# ------------------------------------------------------------------------------------------------ 1. dropout


def test_tiled_mlp_replays_dropout_masks_in_backward():
    """LoRA dropout (TRL's default 0.05; 0.5 here to make every mask matter) inside a tiled MLP: backward must use
    the forward's masks. The reference runs the same tiles with plain autograd and the same RNG stream."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm("llama"), LoraConfig(r=4, lora_dropout=0.5, target_modules=["gate_proj", "up_proj",
                                                                                              "down_proj"]))
    model.train()
    mlp = model.get_base_model().model.layers[0].mlp
    for p in mlp.parameters():  # LoRA B starts at zero: give the adapters a nonzero effect
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 20, 64, requires_grad=True)
    grad = torch.randn(2, 20, 64)
    params = [p for p in mlp.parameters() if p.requires_grad]

    torch.manual_seed(7)
    ref = torch.cat([mlp(tile) for tile in x.reshape(-1, 64).split(8)]).view(2, 20, 64)  # same tiles, plain autograd
    ref_grads = torch.autograd.grad(ref, [x, *params], grad)

    patch_tiled_mlp(model, tile_tokens=8)
    torch.manual_seed(7)
    out = mlp(x)
    assert out.grad_fn.name().startswith("TiledMLPFunction")
    grads = torch.autograd.grad(out, [x, *params], grad)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.manual_seed(7)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))  # replaying in backward left the global RNG stream alone


# ------------------------------------------------------------------------------------------------ 3. per sequence


def test_plain_path_is_decided_per_sequence_not_per_batch():
    calls = []
    original = TiledMLPFunction.apply
    model = tiny_lm("llama")
    patch_tiled_mlp(model, tile_tokens=64)
    x = torch.randn(8, 48, 64, requires_grad=True)  # 384 tokens in the batch, 48 per sequence: one tile each
    try:
        TiledMLPFunction.apply = staticmethod(lambda *a: calls.append(1) or original(*a))
        model.model.layers[0].mlp(x).sum().backward()
        assert not calls
        model.model.layers[0].mlp(torch.randn(1, 100, 64, requires_grad=True)).sum().backward()
        assert calls  # a 100-token sequence is tiled
    finally:
        TiledMLPFunction.apply = original


# ------------------------------------------------------------------------------------------------ 2. offload


def _counting_offload(sizes):
    """Our offload hooks, with the CPU treated as the device (what they do on a GPU) and every size counted."""

    def factory():
        hooks = offload_module.offload_saved_tensors(device_types=("cpu",), min_bytes=0)

        def pack(t):
            packed = hooks.pack_hook(t)
            if packed is not t:
                sizes.append(tuple(t.shape))
            return packed

        return torch.autograd.graph.saved_tensors_hooks(pack, hooks.unpack_hook)

    return factory


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_offload_runs_in_the_recipes_checkpointing_mode(tiny_model_dir, sft_jsonl, dpo_jsonl, tmp_path,
                                                                   monkeypatch, stage, reentrant):
    """Through the stage and `train()`: the Trainer checkpoints in the recipe's own mode (what it reads is
    activation_checkpointing_kwargs), every layer input goes through the offload hooks in every step, also after
    DPO's reference passes, and the losses equal the same run without offload."""
    from pipeline import dpo, sft
    from pipeline.longctx import trainer as trainer_module

    sizes, modes = [], []
    monkeypatch.setattr(trainer_module, "offload_saved_tensors", _counting_offload(sizes))
    original_step = trainer_module.long_context_trainer

    def spying(cls, lc, args):
        built = original_step(cls, lc, args)

        class Spy(built):
            def training_step(self, model, inputs, num_items_in_batch=None):
                layer = self.accelerator.unwrap_model(model).get_base_model().model.layers[0] \
                    if hasattr(self.accelerator.unwrap_model(model), "get_base_model") else \
                    self.accelerator.unwrap_model(model).model.layers[0]
                modes.append((layer.gradient_checkpointing,
                              layer._gradient_checkpointing_func.keywords.get("use_reentrant")))
                return super().training_step(model, inputs, num_items_in_batch)

        return Spy

    monkeypatch.setattr(dpo if stage == "dpo" else sft, "long_context_trainer", spying)
    main = dpo.main if stage == "dpo" else sft.main
    data = dpo_jsonl if stage == "dpo" else sft_jsonl
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
              "--learning_rate", "1e-3", "--max_length", "96", "--seed", "0", "--use_peft", "true",
              "--lora_target_modules", "all-linear", "--lora_dropout", "0.0",
              "--gradient_checkpointing", "true",
              "--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": reentrant})]
    plain = main([*common, "--output_dir", str(tmp_path / "plain")])
    ours = main([*common, "--output_dir", str(tmp_path / "ours"), "--checkpoint_offload", "true"])
    assert modes == [(True, reentrant)] * 4  # the recipe's mode, both runs, both steps (DPO: after reference passes)
    layer_inputs = [s for s in sizes if len(s) == 3 and s[-1] == 64]  # [batch, tokens, hidden]
    assert len(layer_inputs) >= 2 * 2, sizes  # 2 layers x 2 steps (plus the LM head's saved hidden states)
    assert ours["first_logged_loss"] == pytest.approx(plain["first_logged_loss"], abs=1e-5)
    assert ours["last_logged_loss"] == pytest.approx(plain["last_logged_loss"], abs=1e-5)


def _cli_errors(stage: str, argv: list[str], capsys, monkeypatch) -> list[str]:
    """Run a stage's command line in this process: exit code 2 and its `error:` lines, with no traceback."""
    from pipeline import dpo, sft
    from pipeline.config import cli

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        cli((sft if stage == "sft" else dpo).main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-2000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_checkpoint_offload_without_checkpointing_is_one_line_error(capsys, monkeypatch):
    argv = ["--config", "recipes/tiny/longctx_sft.yaml", "--dry_run", "--checkpoint_offload", "true",
            "--gradient_checkpointing", "false"]
    assert _cli_errors("sft", argv, capsys, monkeypatch) == [
        "error: recipes/tiny/longctx_sft.yaml: key 'checkpoint_offload' offloads activation checkpoints: it needs "
        "'gradient_checkpointing: true' (or activation_checkpointing: true)"]


# ------------------------------------------------------------------------------------------------ 6. DPO precompute


def test_dpo_reference_precompute_runs_through_the_long_context_path(tiny_model_dir, dpo_jsonl, tmp_path,
                                                                       monkeypatch):
    """precompute_ref_log_probs happens inside DPOTrainer.__init__: it must already be packed and tiled, and give the
    reference log-probs plain TRL precomputes."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import pipeline.longctx.fused_forward as fused

    packed, tiled = [], []
    original_pack, original_apply = fused.pack_rows, TiledMLPFunction.apply
    monkeypatch.setattr(fused, "pack_rows", lambda *a: packed.append(1) or original_pack(*a))
    # TRL caches precomputed log-probs by (data, weights) fingerprint: each run reads its own copy of the data
    copies = {}
    for name in ("plain", "ours"):
        copies[name] = tmp_path / f"{name}.jsonl"
        copies[name].write_text("".join(dpo_jsonl.read_text().splitlines(keepends=True)[:8]))

    def precomputed(lc):
        rows = load_dataset("json", data_files=str(copies["ours" if lc else "plain"]), split="train",
                            cache_dir=str(tmp_path / "cache"))
        args = DPOConfig(output_dir=str(tmp_path / str(lc is not None)), report_to="none", bf16=False, use_cpu=True,
                         max_length=None, per_device_train_batch_size=4, precompute_ref_log_probs=True,
                         padding_free=lc is not None, gradient_checkpointing=False)
        cls = long_context_trainer(DPOTrainer, lc, args) if lc else DPOTrainer
        trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa"),
                      args=args, train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        return torch.tensor(trainer.train_dataset["ref_chosen_logps"])

    plain = precomputed(None)
    try:
        TiledMLPFunction.apply = staticmethod(lambda *a: tiled.append(1) or original_apply(*a))
        ours = precomputed(LongContextArguments(tiled_mlp=True, tiled_mlp_tile_tokens=8, loss_vocab_chunk=64))
    finally:
        TiledMLPFunction.apply = original_apply
    assert packed, "the reference precompute did not run packed"
    assert not tiled  # no grad in the reference pass: the tiles run without the autograd function ...
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-5)  # ... and give TRL's reference log-probs


def test_tiled_mlp_tiles_the_no_grad_reference_pass():
    model = tiny_lm("llama")
    patch_tiled_mlp(model, tile_tokens=16)
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2]))
    with torch.no_grad():
        out = mlp(torch.randn(1, 50, 64))
    handle.remove()
    assert seen == [13, 13, 12, 12] and out.shape == (1, 50, 64)  # 4 tiles of <= 16 tokens


# ------------------------------------------------------------------------------------------------ 7. SP guard


def test_sequence_parallel_needs_token_averaging_across_devices(capsys, monkeypatch):
    argv = ["--config", "recipes/tiny/longctx_sft.yaml", "--dry_run", "--sequence_parallel_size", "2",
            "--average_tokens_across_devices", "false"]
    assert _cli_errors("sft", argv, capsys, monkeypatch) == [
        "error: recipes/tiny/longctx_sft.yaml: key 'sequence_parallel_size' > 1 needs "
        "'average_tokens_across_devices: true': the ranks of a sequence-parallel group must scale the shared loss "
        "by the same token count"]


# ------------------------------------------------------------------------------------------------ 8. plain TRL


def test_every_switch_off_is_plain_trl(tiny_model_dir, sft_jsonl, tmp_path, monkeypatch):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from pipeline import sft

    off, cpu = LongContextArguments(), dict(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    assert long_context_trainer(SFTTrainer, off, SFTConfig(**cpu, padding_free=True)) is SFTTrainer
    assert long_context_trainer(DPOTrainer, off, DPOConfig(**cpu)) is DPOTrainer
    assert long_context_trainer(DPOTrainer, off, DPOConfig(**cpu, padding_free=True)) \
        is not DPOTrainer  # DPO's padding_free is ours (TRL 1.16 ignores it)

    seen = {}
    original = SFTTrainer.train

    def train(self, *a, **k):
        base = self.model
        seen.update(cls=type(self), mlp_patched="forward" in vars(base.model.layers[0].mlp),
                    norm_patched="forward" in vars(base.model.norm), chunk=trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
        return original(self, *a, **k)

    monkeypatch.setattr(SFTTrainer, "train", train)
    sft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(sft_jsonl), "--output_dir",
              str(tmp_path / "out"), "--max_steps", "1", "--max_length", "64", "--save_strategy", "no"])
    assert seen == dict(cls=SFTTrainer, mlp_patched=False, norm_patched=False, chunk=TRL_CHUNK)


def test_switch_on_an_unsupported_architecture_fails_before_loading(tmp_path, sft_jsonl, tiny_model_dir, capsys,
                                                                      monkeypatch):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not weights: loading them would fail loudly")
    argv = ["--config", "recipes/tiny/longctx_sft.yaml", "--model_name_or_path", str(model_dir), "--tiny_model", "null",
            "--dataset_name", str(sft_jsonl), "--output_dir", str(tmp_path / "out")]
    assert _cli_errors("sft", argv, capsys, monkeypatch) == [(
        "error: recipes/tiny/longctx_sft.yaml: key 'tiled_mlp' supports llama, mistral, qwen2, qwen3 models "
        "(gated MLP, LlamaRMSNorm/MistralRMSNorm/Qwen2RMSNorm/Qwen3RMSNorm), not model_type 'gpt2': "
        "set tiled_mlp: false")]


def test_zero3_tiles_go_through_deepspeeds_tiled_mlp_with_exact_tile_counts(monkeypatch):
    """Under ZeRO-3 (parameters carry DeepSpeed's `ds_id`) the tiles run through DeepSpeed's TiledMLP, which splits
    with torch.chunk. A 9-token sequence on a rank whose peers agreed on 4 tiles (torch.chunk alone gives 3 pieces)
    must still make exactly 4 MLP calls each way (a rank that makes fewer all-gathers deadlocks the others), and
    give plain autograd's output and gradients. One process: DeepSpeed's function needs no engine for this."""
    pytest.importorskip("deepspeed")
    from pipeline.longctx import tiled_mlp

    monkeypatch.setattr(tiled_mlp, "_agreed_tiles", lambda mlp, x, tile_tokens: (4, True))  # a longer peer's count
    plain, tiled = tiny_lm("llama"), tiny_lm("llama")
    patch_tiled_mlp(tiled, tile_tokens=4)
    for p in tiled.model.layers[0].mlp.parameters():
        p.ds_id = 0  # what ZeRO-3's partitioning marks its parameters with
    calls = []
    tiled.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
    x = torch.randn(1, 9, 64)
    grad = torch.randn(1, 9, 64)
    results = []
    for model in (plain, tiled):
        xi = x.clone().requires_grad_(True)
        out = model.model.layers[0].mlp(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, [p.grad for p in model.model.layers[0].mlp.parameters()]))
    assert calls == [3] * 8  # 9 tokens padded to 12: 4 tiles in forward, 4 in backward
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    for got, want in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

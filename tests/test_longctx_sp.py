"""Sequence parallelism over 2 processes (gloo on CPU): SP loss and gradients == single-process / plain DDP.

Run by pytest (slow): the test launches this file with torchrun; as a script it is the worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sequence_parallel_two_processes(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tiny_model_dir), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert set(report["checked"]) == {"model/rows", "model/packed", "trainer/sft", "trainer/dpo"}


# ------------------------------------------------------------------------------------------------ worker


def _model_level(model_dir):
    """Fused forward on the same batch: SP (gradients summed over ranks) == one process; right-padded and packed."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.longctx.fused_forward import wrap_fused_forward
    from pipeline.longctx.tiled_mlp import patch_tiled_mlp
    from pipeline.longctx.ulysses import ATTN_IMPLEMENTATION

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 250, (4, 37), generator=g)  # < the tiny vocabulary
    mask = torch.ones_like(ids)
    for i, n in enumerate([37, 30, 11, 36]):
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100

    def run(model, reduce):
        model.train()
        model.gradient_checkpointing_enable()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        (out.loss + 0.1 * (out.log_probs.sum(1) * torch.arange(1, 5)).sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        if reduce:
            for grad in grads.values():
                dist.all_reduce(grad)
        return out.log_probs.detach(), grads

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        add_fused_lm_head(model)
        return model

    checked = []
    for pack in (False, True):
        lp_ref, g_ref = run(load(), reduce=False)
        model = load()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        patch_tiled_mlp(model, 16)
        wrap_fused_forward(model, pack=pack, sp_group=dist.group.WORLD)
        lp, grads = run(model, reduce=True)
        torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-4)
        for name in g_ref:
            torch.testing.assert_close(grads[name], g_ref[name], atol=2e-5, rtol=1e-4, msg=name)
        checked.append("model/packed" if pack else "model/rows")
    return checked


def _trainer_level(model_dir, out):
    """Three optimizer steps of the stages' trainers: SP=2 (+ tiled MLP, packing) logs the losses of plain DDP, and
    resumes from its checkpoint."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp

    from pipeline.longctx import LongContextArguments, long_context_trainer

    all_to_alls = []  # proves the SP runs really sharded attention, DeepSpeed's (equal losses alone would not)
    original = ulysses_sp._dim_zero_all_to_all
    ulysses_sp._dim_zero_all_to_all = lambda *a, **k: all_to_alls.append(1) or original(*a, **k)

    chats = [{"messages": [{"role": "user", "content": "add " + " ".join(str(j) for j in range(i + 3))},
                           {"role": "assistant", "content": f"the sum is {sum(range(i + 3))}" + " ok" * i}]}
             for i in range(8)]
    pairs = [{"prompt": [{"role": "user", "content": "the answer is " * (2 + i) + f"{i}?"}],
              "chosen": [{"role": "assistant", "content": f"it is {i * 7}" + " yes" * (i % 3)}],
              "rejected": [{"role": "assistant", "content": f"no {i}" + " so" * (3 - i % 3)}]} for i in range(8)]
    common = dict(report_to="none", bf16=False, use_cpu=True, max_steps=3, logging_steps=1, learning_rate=1e-3,
                  per_device_train_batch_size=2, save_strategy="no", gradient_checkpointing=True, seed=0,
                  max_length=None)
    checked = []
    for stage, config_cls, trainer_cls, data in (("sft", SFTConfig, SFTTrainer, chats),
                                                 ("dpo", DPOConfig, DPOTrainer, pairs)):
        losses = {}
        for mode in ("ddp", "sp", "sp/resumed", "sp+offload"):
            # sp+offload: the 8B recipes' combination (reentrant checkpointing under DDP, several backwards a step)
            lc = LongContextArguments(sequence_parallel_size=2, tiled_mlp=True, lean_rmsnorm=True,
                                      tiled_mlp_tile_tokens=16, gradient_as_bucket_view=True,
                                      checkpoint_offload=mode == "sp+offload") if mode != "ddp" else None
            # ours saves a checkpoint every step; the run resumed from step 1's must log step 3's loss, which depends
            # on the restored AdamW state through step 2
            saving = dict(save_strategy="steps", save_steps=1) if mode == "sp" else {}
            args = config_cls(output_dir=str(out / f"{stage}-{mode.split('/')[0].replace('+', '-')}"),
                              padding_free=mode != "ddp",
                              **{**common, **saving})
            cls = long_context_trainer(trainer_cls, lc, args) if lc else trainer_cls
            trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
                          args=args, train_dataset=Dataset.from_list(data),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
            assert trainer.args.world_size == 2
            all_to_alls.clear()
            trainer.train(resume_from_checkpoint=str(out / f"{stage}-sp" / "checkpoint-1") if mode == "sp/resumed"
                          else None)
            assert bool(all_to_alls) == (mode != "ddp"), (mode, len(all_to_alls))
            # ours: DDP's gradients are views of its buckets (one gradient copy less); the later losses below show
            # the optimizer still sees the right gradients
            assert trainer.model_wrapped.gradient_as_bucket_view == (mode != "ddp")
            losses[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            if mode == "sp":
                saved = torch.load(out / f"{stage}-sp" / "checkpoint-3" / "optimizer.pt", weights_only=True)
                assert len(saved["state"]) == len([p for p in trainer.model.parameters() if p.requires_grad])
        assert len(losses["sp"]) == 3 and len(losses["sp/resumed"]) == 3, losses  # step 1's comes from the checkpoint
        torch.testing.assert_close(torch.tensor(losses["sp"]), torch.tensor(losses["ddp"]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(losses["sp/resumed"][1:], losses["sp"][1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(losses["sp+offload"]), torch.tensor(losses["ddp"]), atol=1e-4,
                                   rtol=1e-4)
        checked.append(f"trainer/{stage}")
    return checked


def main(model_dir: str, out: str) -> None:
    import torch.distributed as dist

    out = Path(out)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    checked = _model_level(model_dir)
    checked += _trainer_level(model_dir, out)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps({"world_size": world, "checked": checked}))


if __name__ == "__main__":
    main(*sys.argv[1:3])

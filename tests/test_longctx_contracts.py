"""The private details of TRL and transformers that pipeline/longctx depends on. Each test says what changed when it
breaks, so that a minor release that moves one of them fails here, not silently in a long run."""

import inspect

import torch
import trl.trainer.utils as trl_utils
from transformers import Trainer
from trl import DPOTrainer

from pipeline.longctx.trainer import VOCAB_CHUNK_GLOBAL


def _fused_forward_code():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trl_utils.add_fused_lm_head(model)
    return model.forward.__func__.__code__


def test_trl_reads_its_vocabulary_chunk_global_at_call_time():
    assert isinstance(getattr(trl_utils, VOCAB_CHUNK_GLOBAL, None), int), (
        f"trl.trainer.utils.{VOCAB_CHUNK_GLOBAL} is gone: loss_vocab_chunk would do nothing (find TRL's new knob)")
    assert VOCAB_CHUNK_GLOBAL in _fused_forward_code().co_names, (
        f"TRL's fused LM head no longer reads {VOCAB_CHUNK_GLOBAL} when it runs: loss_vocab_chunk would do nothing")


def test_vocabulary_chunk_reaches_trls_function_and_is_restored():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.longctx.trainer import _vocab_chunk

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trl_utils.add_fused_lm_head(model)
    seen, original = [], trl_utils._ChunkedLogProbFunction.apply
    trl_utils._ChunkedLogProbFunction.apply = staticmethod(lambda *a: seen.append(a[5]) or original(*a))
    try:
        ids = torch.randint(0, 64, (1, 9))
        before = getattr(trl_utils, VOCAB_CHUNK_GLOBAL)
        with _vocab_chunk(8):
            model(input_ids=ids, labels=ids, fused_lm_head=True)
        model(input_ids=ids, labels=ids, fused_lm_head=True)
    finally:
        trl_utils._ChunkedLogProbFunction.apply = original
    assert seen == [8, before], ("TRL's _ChunkedLogProbFunction.apply no longer takes the vocabulary chunk as its "
                                 f"6th argument (saw {seen})")
    assert getattr(trl_utils, VOCAB_CHUNK_GLOBAL) == before


def test_dpo_precompute_hook_is_where_we_patch():
    params = list(inspect.signature(DPOTrainer._precompute_ref_logps).parameters)
    assert params == ["self", "dataset", "name", "batch_size"], (
        f"DPOTrainer._precompute_ref_logps is now {params}: the long-context trainer applies its packing layer there "
        "before the reference precompute")
    assert "self._precompute_ref_logps(" in inspect.getsource(DPOTrainer.__init__), (
        "DPOTrainer.__init__ no longer precomputes through _precompute_ref_logps: the reference pass may run before "
        "the long-context switches again")
    params = list(inspect.signature(DPOTrainer.compute_ref_log_probs).parameters)
    assert params == ["self", "model", "inputs"], f"DPOTrainer.compute_ref_log_probs is now {params} (SP uses it)"


def test_deepspeed_steps_only_at_the_boundary_accelerate_marks():
    from accelerate import Accelerator
    from accelerate.state import GradientState
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    assert callable(getattr(GradientState, "_set_sync_gradients", None)), (
        "accelerate's GradientState._set_sync_gradients is gone: sequence parallelism under DeepSpeed marks all but the "
        "last of a group's backwards as non-boundaries through it")
    source = inspect.getsource(DeepSpeedEngineWrapper.backward)
    assert "set_gradient_accumulation_boundary(is_boundary=sync_gradients)" in source and \
        "if sync_gradients:" in source, (
            "accelerate's DeepSpeedEngineWrapper.backward no longer steps the engine only when sync_gradients: the "
            "group's several backwards per micro-step would each step the optimizer (or none would)")
    assert "sync_gradients=self.sync_gradients" in inspect.getsource(Accelerator.backward), (
        "Accelerator.backward no longer passes its sync_gradients to DeepSpeed's backward")


def test_deepspeed_ulysses_attention_passes_our_layout_to_the_core():
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    params = set(inspect.signature(UlyssesSPAttentionHF.__init__).parameters)
    assert {"attn", "batch_size", "attn_head_count", "attn_head_size", "kv_head_count", "num_hidden_layers",
            "process_group", "seq_length_is_variable"} <= params, (
        f"DeepSpeed's UlyssesSPAttentionHF takes {sorted(params)} now: pipeline/longctx/ulysses.py builds one")
    source = inspect.getsource(UlyssesSPAttentionHF.forward)
    assert "self.attn(module, query_layer, key_layer, value_layer, attention_mask, *args" in source and \
        "**kwargs)" in source, (
            "UlyssesSPAttentionHF.forward no longer hands its keyword arguments to the core attention: our core reads "
            "the packed sequences' spans (longctx_layout) from them")


def test_trainer_reads_activation_checkpointing_not_the_aliases():
    source = inspect.getsource(Trainer)
    assert "args.activation_checkpointing_kwargs" in source, (
        "the Trainer no longer reads activation_checkpointing_kwargs: pipeline.training.checkpointing() would print "
        "the wrong mode")


def test_trainer_resumes_peft_models_through_load_adapter():
    import peft

    assert "model.load_adapter(" in inspect.getsource(Trainer._load_from_checkpoint), (
        "Trainer._load_from_checkpoint no longer resumes PEFT models through load_adapter: "
        "pipeline.modeling.keep_adapter_dtype_on_resume would not keep a QLoRA adapter's bf16 on resume")
    assert "autocast_adapter_dtype" in inspect.signature(peft.PeftModel.load_adapter).parameters, (
        "peft.PeftModel.load_adapter lost autocast_adapter_dtype (keep_adapter_dtype_on_resume passes it)")

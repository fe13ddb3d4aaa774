"""The offline tiny-model builder: three architectures, GQA, a chat template that masks assistant turns."""

import json

import pytest
import torch

from pipeline.config import RecipeError
from pipeline.tiny import TinyModelSpec, build_tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_build_each_arch_with_gqa(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = TinyModelSpec(output_dir=str(tmp_path / arch), arch=arch, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=400)
    path = build_tiny_model(spec)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch and model.config.num_key_value_heads == 2
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3  # pad == bos would freeze bos
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok("Answer: 12345", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Answer: 12345"
    assert [tok.decode([i]) for i in ids[0][-5:]] == list("12345")  # digits one per token
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_chat_template_marks_assistant_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Answer: 4"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Answer: 4<|im_end|>"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_rebuild_reuses_and_refuses_other_specs(tmp_path):
    spec = TinyModelSpec(output_dir=str(tmp_path / "m"), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=320)
    path = build_tiny_model(spec)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(spec) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((path / "stage_result.json").read_text())["metrics"]["parameters"] > 0
    other = TinyModelSpec(output_dir=str(tmp_path / "m"), hidden_size=64, num_hidden_layers=1,
                          num_attention_heads=2, vocab_size=320)
    with pytest.raises(RecipeError, match="not built from this spec"):
        build_tiny_model(other)


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_size=30, num_attention_heads=4), "divisible"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "must divide"),
    (dict(sliding_window=64), "only for arch mistral or qwen2"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**kwargs)

"""QLoRA on a bitsandbytes 4-bit base with the super weight held out and added back exactly (CPU)."""

import pytest
import torch

from pipeline.config import RecipeError
from pipeline.quant.plant import Plant, copy_task_ids, plant_super_weight
from pipeline.quant.qlora import (REGISTRY_NAME, check_exact, load_quantized_preserving_super_weights,
                                  merge_adapter_preserving_super_weights)
from pipeline.quant.registry import SuperWeight, read_registry

bnb = pytest.importorskip("bitsandbytes")
V = Plant().value  # the planted super weight
SW = SuperWeight(1, 17, 100, V)


@pytest.fixture(scope="module")
def planted_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plant_super_weight(model, tok.bos_token_id, Plant(layer=1, row=17, col=100))
    out = tmp_path_factory.mktemp("planted_q")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_hook_path_equals_dequantized_weights_with_exact_super_weight(planted_dir, tmp_path):
    model, reg = load_quantized_preserving_super_weights(str(planted_dir), load_in_4bit=True, output_dir=str(tmp_path))
    assert [(s["layer"], s["row"], s["col"], s["value"]) for s in reg["super_weights"]] == [(1, 17, 100, V)]
    assert (tmp_path / REGISTRY_NAME).is_file()
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear4bit) and isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    w_q = bnb.functional.dequantize_4bit(down.weight.data, down.weight.quant_state)
    assert w_q[17, 100] == 0  # held out: quantized as 0, which NF4 represents exactly
    x = torch.randn(3, 5, 128).to(w_q.device)  # the quantized weights' device (CUDA where bnb runs there)
    with torch.no_grad():
        expected = x @ w_q.T
        expected[..., 17] += x[..., 100] * V
        torch.testing.assert_close(down(x), expected, rtol=1e-5, atol=1e-5)
    # Block-mates of the super weight quantize with a normal scale once it is held out.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ref = AutoModelForCausalLM.from_pretrained(planted_dir, dtype=torch.float32).model.layers[1].mlp.down_proj.weight
    ref = ref.to(w_q.device)
    mates = slice(64, 128)  # NF4 blocks are 64 consecutive entries of a row: row 17, cols 64..127
    plain = AutoModelForCausalLM.from_pretrained(
        planted_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    pd = plain.model.layers[1].mlp.down_proj
    w_plain = bnb.functional.dequantize_4bit(pd.weight.data, pd.weight.quant_state)
    keep = torch.arange(64, 128) != 100
    err_held = (w_q[17, mates] - ref[17, mates])[keep].abs().mean()
    err_plain = (w_plain[17, mates] - ref[17, mates])[keep].abs().mean()
    assert err_held < 0.2 * err_plain


def test_qlora_train_save_load_merge_keeps_super_weight_exact(planted_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    out = tmp_path / "adapter"
    model, _ = load_quantized_preserving_super_weights(str(planted_dir), load_in_4bit=True, output_dir=str(out))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    ids = copy_task_ids(AutoTokenizer.from_pretrained(planted_dir), 8, digits=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(out)

    # load: same base (registry checked against it), adapter on top; the hooks are already there
    base, _ = load_quantized_preserving_super_weights(str(planted_dir), registry_path=str(out / REGISTRY_NAME))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=1e-6)

    merged = merge_adapter_preserving_super_weights(str(planted_dir), str(out)).eval()
    assert check_exact(merged, [SW]) == [True]  # bit-exact: down_proj was not a LoRA target
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
    assert read_registry(out / REGISTRY_NAME)["quantization"]["load_in_4bit"] is True


def test_merge_with_down_proj_lora_adds_delta_to_exact_super_weight(planted_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    out = tmp_path / "adapter"
    model, _ = load_quantized_preserving_super_weights(str(planted_dir), load_in_4bit=True, output_dir=str(out))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        lora_out = model(input_ids=ids).logits
    model.save_pretrained(out)
    delta = PeftModel.from_pretrained(
        load_quantized_preserving_super_weights(str(planted_dir), registry_path=str(out / REGISTRY_NAME))[0], out
    ).base_model.model.model.layers[1].mlp.down_proj.get_delta_weight("default")
    merged = merge_adapter_preserving_super_weights(str(planted_dir), str(out))
    w = merged.model.layers[1].mlp.down_proj.weight
    assert w[17, 100].item() == (torch.tensor(V) + delta[17, 100]).item()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora_out, rtol=0, atol=1e-4)


def test_registry_for_another_model_is_rejected(planted_dir, tiny_model_dir, tmp_path):
    _, reg = load_quantized_preserving_super_weights(str(planted_dir), output_dir=str(tmp_path))
    with pytest.raises(RecipeError, match="fingerprint"):
        load_quantized_preserving_super_weights(str(tiny_model_dir), registry_path=str(tmp_path / REGISTRY_NAME))


def test_8bit_base_keeps_super_weight(planted_dir):
    model, _ = load_quantized_preserving_super_weights(str(planted_dir), load_in_4bit=False, load_in_8bit=True)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear8bitLt)
    x = torch.zeros(1, 1, 128)
    x[..., 100] = 1.0
    with torch.no_grad():
        y = down(x)
    assert abs(y[0, 0, 17].item() - V) < 0.05  # int8 row of the SW is ~0 there; the hook adds V exactly


def test_model_without_super_weights_loads_as_plain_qlora(tiny_model_dir, tmp_path):
    model, reg = load_quantized_preserving_super_weights(str(tiny_model_dir), output_dir=str(tmp_path))
    assert reg["super_weights"] == [] and read_registry(tmp_path / REGISTRY_NAME)["super_weights"] == []
    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    assert lin and all(isinstance(m, bnb.nn.Linear4bit) for m in lin)
    assert not any(hasattr(m, "super_weight_hook") for m in model.modules())


@pytest.mark.slow
def test_trl_sft_trainer_with_preserved_super_weight(planted_dir, tmp_path):
    """The call sequence the SFT stage uses: our loader, then TRL's SFTTrainer with a LoRA config."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "sft"
    model, _ = load_quantized_preserving_super_weights(str(planted_dir), load_in_4bit=True, output_dir=str(out))
    rows = [{"messages": [{"role": "user", "content": f"copy {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(16)]
    trainer = SFTTrainer(
        model=model, processing_class=AutoTokenizer.from_pretrained(planted_dir), train_dataset=Dataset.from_list(rows),
        args=SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, use_cpu=True, bf16=False,
                       report_to=[], save_strategy="no", gradient_checkpointing=True),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert hasattr(trainer.model.base_model.model.model.layers[1].mlp.down_proj, "super_weight_hook")  # not a LoRA target
    trainer.train()
    trainer.save_model(str(out))
    merged = merge_adapter_preserving_super_weights(str(planted_dir), str(out))
    assert check_exact(merged, [SW]) == [True]

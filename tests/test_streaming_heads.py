"""The streaming_heads switch: SFT / DPO train with the attention HeadKVCache(prefill: local) serves, the saved model
declares it, and every loader of the pipeline serves it that way (the recipe path of recipes/tiny/sft.yaml)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.kv.cache import HeadKVCache, use_headwise_attention
from pipeline.kv.detect import save_registry
from pipeline.kv.streaming_heads import is_streaming, use_declared_attention, use_streaming_heads
from tests.conftest import ROOT


def _registry(model_dir, path, scores):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    save_registry(path, model, "wu", scores, {})
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sft_jsonl, tmp_path_factory):
    """Two SFT steps with streaming heads on: the tiny model's KV head 1 of layer 0 kept whole."""
    from pipeline import sft

    tmp = tmp_path_factory.mktemp("streaming")
    reg = _registry(tiny_model_dir, tmp / "heads.json", [[0.0, 0.0, 0.9, 0.0], [0.0, 0.1, 0.0, 0.0]])
    out = tmp / "sft"
    metrics = sft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(sft_jsonl),
                        "--output_dir", str(out), "--max_steps", "2", "--max_length", "64", "--save_strategy", "no",
                        "--streaming_heads", str(reg), "--streaming_full_heads", "1", "--streaming_sink", "2",
                        "--streaming_window", "8"])
    return out, reg, metrics


def test_trained_model_declares_its_attention(trained):
    out, reg, metrics = trained
    assert metrics["global_step"] == 2
    spec = json.loads((out / "config.json").read_text())["streaming_heads"]
    assert spec == {"full_heads": [[1], []], "sink": 2, "window": 8, "registry": str(reg)}
    plain = AutoModelForCausalLM.from_pretrained(out)  # outside the pipeline: transformers' own attention
    assert not is_streaming(plain)


def test_every_loader_serves_the_declared_attention(trained):
    """load_for_generation (evaluate, pairs' student, EvoPrompt), load_model (DPO, CPPO) and HeadKVCache all give
    the logits the model was trained with, which full attention does not."""
    from pipeline.config import ModelArguments
    from pipeline.evaluate import load_for_generation
    from pipeline.modeling import load_model

    out, _, _ = trained
    gen, _ = load_for_generation(str(out))
    ids = torch.randint(5, gen.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    trainer_model = load_model(str(out), ModelArguments(), type("Args", (), {"gradient_checkpointing": False})())
    assert is_streaming(gen) and is_streaming(trainer_model)
    with torch.no_grad():
        want = gen(ids).logits
        torch.testing.assert_close(trainer_model.eval()(ids).logits, want)
        use_headwise_attention(gen)
        cache = HeadKVCache(gen.config, [[1], []], 2, 8, "local")
        outs = [gen(ids[:, :30], past_key_values=cache).logits]
        outs += [gen(ids[:, t:t + 1], past_key_values=cache).logits for t in range(30, 40)]
        torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-5, rtol=1e-4)
        assert (gen(ids).logits - want).abs().max() > 1e-3  # plain tensors: full causal attention


def test_attention_weights_variant_matches_and_is_a_distribution(tiny_model_dir):
    """Retrieval-head detection scores a streaming model through the weights variant: same outputs, and the
    streaming heads put no weight outside their sink + window."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    use_streaming_heads(model, [[0], []], 2, 5)
    with torch.no_grad():
        want = model(ids).logits
        use_streaming_heads(model, [[0], []], 2, 5, weights=True)
        out = model(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    probs = out.attentions[1][0]  # layer 1: every head streaming; [H, q, kv]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    q, k = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    outside = (q - k >= 5) & (k >= 2)
    assert probs[:, outside].abs().max() == 0
    assert out.attentions[0][0, :2][:, outside].max() > 0  # layer 0, KV head 0 (query heads 0-1): full


@pytest.mark.parametrize("groups", [1, 2])
def test_split_heads_attention_is_bitwise_the_per_head_mask(groups):
    """Training and prefill run a layer's full and streaming heads as two SDPA calls: outputs and gradients equal
    (bitwise) the one call with a per-head [B, H, q, kv] mask it replaced, with GQA and left padding."""
    from types import SimpleNamespace

    from pipeline.kv.streaming_heads import streaming_heads_attention

    g = torch.Generator().manual_seed(0)
    b, n_kv, t, d = 3, 4, 40, 8
    q = torch.randn(b, n_kv * groups, t, d, generator=g, requires_grad=True)
    k = torch.randn(b, n_kv, t, d, generator=g, requires_grad=True)
    v = torch.randn(b, n_kv, t, d, generator=g, requires_grad=True)
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :7] = False  # left padding
    mask = real[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    out, _ = streaming_heads_attention([[0, 2]], 2, 6)(SimpleNamespace(layer_idx=0, training=True), q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))

    qp, kp = torch.arange(t)[:, None], torch.arange(t)[None, :]
    first = (~real).sum(1)[:, None, None, None]
    local = mask & ((qp - kp < 6) | ((kp >= first) & (kp < first + 2)))
    is_full = torch.tensor([h // groups in (0, 2) for h in range(n_kv * groups)])
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(is_full[None, :, None, None], mask, local), enable_gqa=groups > 1)
    want = want.transpose(1, 2).contiguous()
    assert torch.equal(out, want)
    for got, ref in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        assert torch.equal(got, ref)


def test_declared_attention_round_trips_through_save(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not use_declared_attention(model)
    use_streaming_heads(model, [[], [0, 1]], 4, 16, registry="r.json")
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert use_declared_attention(again) and is_streaming(again)
    assert again.config.streaming_heads == {"full_heads": [[], [0, 1]], "sink": 4, "window": 16, "registry": "r.json"}
    with pytest.raises(ValueError, match="do not fit"):
        use_streaming_heads(again, [[5], []], 4, 16)


def _errors(argv, capsys, monkeypatch, module="sft"):
    from pipeline import niah, sft
    from pipeline.config import cli

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        cli((sft if module == "sft" else niah).main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-2000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_bad_switch_values_are_one_line_errors(capsys, monkeypatch, tmp_path):
    base = ["--config", "recipes/tiny/sft.yaml", "--dry_run"]
    assert _errors(base + ["--streaming_heads", str(tmp_path / "none.json")], capsys, monkeypatch) == [
        f"error: recipes/tiny/sft.yaml: key 'streaming_heads': registry {tmp_path / 'none.json'} not found"]
    [line] = _errors(base + ["--padding_free", "true"], capsys, monkeypatch)
    assert "key 'streaming_heads' sets its own attention" in line
    [line] = _errors(base + ["--streaming_window", "0"], capsys, monkeypatch)
    assert "'streaming_window' >= 1" in line


def test_niah_on_declared_heads_checks_the_cache_is_the_trained_one(trained, tiny_model_dir, capsys, monkeypatch,
                                                                    tmp_path):
    out, _, _ = trained
    argv = ["--config", "recipes/tiny/niah.yaml", "--model_name_or_path", str(out), "--output_dir", str(tmp_path),
            "--full_heads_from", "model", "--full_heads", "1", "--sink", "2", "--window", "8"]
    assert _errors(argv, capsys, monkeypatch, "niah") == [
        "error: recipes/tiny/niah.yaml: key 'prefill': the model was trained with streaming heads for every query; "
        "set prefill: local"]
    assert _errors(argv + ["--prefill", "local", "--window", "16"], capsys, monkeypatch, "niah") == [
        "error: recipes/tiny/niah.yaml: key 'window': 16, but the model was trained with window 8 "
        "(config.streaming_heads)"]
    [line] = _errors(argv + ["--prefill", "local", "--model_name_or_path", str(tiny_model_dir)], capsys, monkeypatch,
                     "niah")
    assert "declares no streaming heads" in line


def test_dpo_on_a_declaring_model_keeps_its_attention(trained, dpo_jsonl, tmp_path, monkeypatch):
    """The demo's path: DPO starts from the streaming-heads SFT model with no switch in its recipe. Policy and
    TRL's reference both run the declared attention (the reference's rewards start at 0), and the DPO model
    declares it too."""
    from trl import DPOTrainer

    from pipeline import dpo

    out, _, _ = trained
    seen = {}
    original = DPOTrainer.train

    def train(self, *a, **k):
        seen.update(policy=is_streaming(self.model), ref=is_streaming(self.ref_model))
        return original(self, *a, **k)

    monkeypatch.setattr(DPOTrainer, "train", train)
    dpo.main(["--model_name_or_path", str(out), "--dataset_name", str(dpo_jsonl), "--output_dir", str(tmp_path / "d"),
              "--max_steps", "1", "--max_length", "64", "--save_strategy", "no", "--per_device_train_batch_size", "2",
              "--report_to", "none"])
    assert seen == {"policy": True, "ref": True}
    spec = json.loads((tmp_path / "d" / "config.json").read_text())["streaming_heads"]
    assert spec["full_heads"] == [[1], []] and (spec["sink"], spec["window"]) == (2, 8)


def test_niah_stage_compresses_with_the_declared_heads(trained, tmp_path):
    from pipeline import niah

    out, _, _ = trained
    metrics = niah.main(["--model_name_or_path", str(out), "--output_dir", str(tmp_path), "--full_heads_from", "model",
                         "--sink", "2", "--window", "8", "--prefill", "local", "--lengths", "[64]", "--depths", "[0.5]",
                         "--n_per_cell", "2", "--chat", "true"])
    assert metrics["full_heads"] == "L0H1"
    assert set(metrics) >= {"niah_acc/full", "niah_acc/retrieval_heads", "niah_acc/uniform_window"}
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert saved["full_heads"] == [[1], []] and saved["registry"] is None


def test_a_registry_of_another_shape_is_refused_before_the_weights_load(tiny_model_dir, capsys, monkeypatch):
    [line] = _errors(["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(tiny_model_dir),
                      "--output_dir", "/nonexistent/never-written"], capsys, monkeypatch)
    assert line == ("error: recipes/tiny/sft.yaml: key 'streaming_heads': data/models/demo-base/retrieval_heads.json "
                    "scores 4 layers x 8 KV heads, the model has 2 x 2")


def test_wu_detection_scores_a_declaring_model_under_its_own_attention(trained):
    """Retrieval-head detection (the demo's heads stage) runs a declaring model with its streaming heads and
    their attention weights, not with eager full attention."""
    import random

    from transformers import AutoTokenizer

    from pipeline.kv.detect import wu_scores
    from pipeline.tasks.needle import Passkey

    out, _, _ = trained
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    exs = [Passkey(key_digits=3).make(random.Random(i), 30, 0.5) for i in range(2)]
    res = wu_scores(model, tok, exs, max_new_tokens=4)
    assert is_streaming(model) and res["n_prompts"] == 2
    assert len(res["scores"]) == 2 and len(res["scores"][0]) == model.config.num_attention_heads

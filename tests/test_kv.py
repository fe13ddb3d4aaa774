"""Head-level KV cache, retrieval-head detection, registry, needle tasks."""

import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from pipeline.kv.cache import HeadKVCache, expected_bytes, kv_ratio, use_headwise_attention
from pipeline.kv.detect import (head_hits, heads_by_layer, kv_scores, load_registry, masked_heads, save_registry,
                                top_heads)
from pipeline.tasks.needle import FILLER_WORDS, KVHaystack, Passkey, prompt_of


def _model(n_layers=2, heads=4, kv_heads=2, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _stepwise_logits(model, ids, cache, prefill: int):
    outs = [model(ids[:, :prefill], past_key_values=cache).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def model_and_ref():
    model = _model()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _stepwise_logits(model, ids, DynamicCache(config=model.config), 24)
    use_headwise_attention(model)
    return model, ids, ref


def test_all_heads_full_matches_default_cache(model_and_ref):
    model, ids, ref = model_and_ref
    cache = HeadKVCache(model.config, [[0, 1], [0, 1]], sink=2, window=4)
    got = _stepwise_logits(model, ids, cache, 24)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefill", ["full", "local"])
def test_all_streaming_with_window_covering_length_matches(model_and_ref, prefill):
    model, ids, ref = model_and_ref
    cache = HeadKVCache(model.config, [[], []], sink=4, window=40, prefill=prefill)
    torch.testing.assert_close(_stepwise_logits(model, ids, cache, 24), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefill", ["full", "local"])
def test_small_window_changes_logits(model_and_ref, prefill):
    # The equality tests above could pass with a cache that ignores its budget; this one could not.
    model, ids, ref = model_and_ref
    cache = HeadKVCache(model.config, [[1], []], sink=2, window=4, prefill=prefill)
    got = _stepwise_logits(model, ids, cache, 24)
    assert (got[:, -1] - ref[:, -1]).abs().max() > 1e-3
    if prefill == "full":  # the prompt itself is attended in full
        torch.testing.assert_close(got[:, :24], ref[:, :24], rtol=0, atol=1e-5)


@pytest.mark.parametrize("full,sink,window,batch", [([[0], [1]], 2, 6, 2), ([[], [0, 1]], 0, 3, 3),
                                                     ([[0, 1], [0]], 4, 100, 1)])
def test_measured_bytes_match_formula(full, sink, window, batch):
    model = use_headwise_attention(_model())
    ids = torch.randint(3, 64, (batch, 30))
    cache = HeadKVCache(model.config, full, sink=sink, window=window)
    _stepwise_logits(model, ids, cache, 20)
    assert cache.nbytes() == expected_bytes(model.config, full, 30, batch, sink, window)
    n_full = sum(map(len, full)) / 4
    full_bytes = expected_bytes(model.config, [[0, 1], [0, 1]], 30, batch, 0, 1)
    assert cache.nbytes() / full_bytes == pytest.approx(kv_ratio(n_full, 30, sink, window))
    for layer in cache.layers:  # separate tensors per group of heads, each really that small
        assert layer.full_k.shape[1] + layer.sink_k.shape[1] == 2
        assert layer.sink_k.shape[-2] + layer.recent_k.shape[-2] == min(30, sink + window)


def test_generate_batched_left_padded_matches_default():
    model = _model(kv_heads=2)
    ids = torch.randint(3, 64, (3, 20), generator=torch.Generator().manual_seed(3))
    ids[0, :5] = 0  # left padding
    mask = (ids != 0).long()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    use_headwise_attention(model)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         past_key_values=HeadKVCache(model.config, [[0, 1], [0, 1]], sink=1, window=2))
    assert torch.equal(got, ref)
    small = HeadKVCache(model.config, [[0], []], sink=1, window=2)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=small)
    assert out.shape == ref.shape and small.get_seq_length() == 20 + 5
    assert small.nbytes() < expected_bytes(model.config, [[0, 1], [0, 1]], 25, 3, 0, 1)


def _planted_copy_model():
    """2 layers x 2 heads; every weight zero except layer 1 / head 1, which attends to the (single) digit token
    and writes its identity to the logits. Tokens 0-9 are digits; 10+ are words."""
    cfg = LlamaConfig(vocab_size=24, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=8, rope_theta=1e12, tie_word_embeddings=False, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in model.state_dict():
            if n.endswith("norm.weight"):
                model.state_dict()[n].fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0  # constant direction: the planted query
        for t in range(10):
            emb[t, 1] = 1.0  # "is a digit": the planted key
            emb[t, 2 + t] = 1.0  # identity: the planted value
        for t in range(10, 24):
            emb[t, 12 + t - 10] = 1.0
        attn, hd = model.model.layers[1].self_attn, 24
        slow = hd + hd // 2 - 1  # the lowest-frequency rotary pair of head 1: RoPE leaves it (almost) unrotated
        attn.q_proj.weight[slow, 0] = 10.0
        attn.k_proj.weight[slow, 1] = 10.0
        for t in range(10):
            attn.v_proj.weight[hd + t, 2 + t] = 1.0
            attn.o_proj.weight[38 + t, hd + t] = 1.0
            model.lm_head.weight[t, 38 + t] = 50.0
    return model


def test_detection_finds_planted_copying_head():
    model = _planted_copy_model()
    rng = random.Random(0)
    total = torch.zeros(2, 2)
    for _ in range(5):
        words = [rng.randrange(10, 24) for _ in range(30)]
        pos, digit = rng.randrange(1, 30), rng.randrange(10)
        ids = words[:pos] + [digit] + words[pos:]
        gen, hits = head_hits(model, ids, (pos, pos + 1), max_new_tokens=1)
        assert gen == [digit]
        total += hits
    assert total[1, 1] == 5.0 and total.sum() == 5.0
    assert top_heads(kv_scores((total / 5).tolist(), 2), 1) == [(1, 1)]


def test_masking_gives_uniform_attention():
    model = _model(attn="eager")
    ids = torch.randint(3, 64, (1, 12))
    with masked_heads(model, [(1, 2)]):
        att = model(ids, output_attentions=True).attentions
    row = att[1][0, 2, -1]
    torch.testing.assert_close(row, torch.full_like(row, 1 / 12))
    assert not torch.allclose(att[1][0, 1, -1], torch.full_like(row, 1 / 12))
    att2 = model(ids, output_attentions=True).attentions  # hook removed on exit
    assert not torch.allclose(att2[1][0, 2, -1], torch.full_like(row, 1 / 12))


def test_registry_round_trip(tmp_path):
    model = _model()
    scores = [[0.1, 0.0, 0.7, 0.2], [0.0, 0.5, 0.0, 0.0]]
    saved = save_registry(tmp_path / "r.json", model, "wu", scores, {"lengths": [128]}, "m")
    loaded = load_registry(tmp_path / "r.json", model)
    assert loaded == saved
    assert loaded["kv_scores"] == [[0.1, 0.7], [0.5, 0.0]]  # max over each GQA group
    assert heads_by_layer(top_heads(loaded["kv_scores"], 2), 2) == [[1], [0]]
    with pytest.raises(ValueError, match="fingerprint"):
        load_registry(tmp_path / "r.json", _model(seed=1))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_registry(tmp_path / "bad.json")


@pytest.mark.parametrize("task", [Passkey(), KVHaystack()])
def test_needle_tasks(task):
    rng = random.Random(0)
    for d in (1, 2, 3):
        ex = task.generate(rng, d)
        assert task.verify(ex, f"Answer: {ex.answer}") and not task.verify(ex, "Answer: 0")
        context = ex.question.split("\nWhat is")[0]
        # digits occur only inside the needle sentences
        assert all(re.search(r"\d", s) is None or s.startswith("The ") for s in context.split(". "))
        assert ex.answer in context
    assert not set(FILLER_WORDS) & set("0123456789")
    early = task.make(random.Random(1), 200, 0.0)
    late = task.make(random.Random(1), 200, 1.0)
    assert early.question.index(early.answer) < 40 < late.question.index(late.answer)
    assert prompt_of(early).endswith("\nAnswer:")


def test_cache_without_headwise_attention_fails_clearly():
    model = _model()
    with pytest.raises(TypeError, match="use_headwise_attention"):
        model(torch.randint(3, 64, (1, 8)), past_key_values=HeadKVCache(model.config, [[0], [1]], 1, 2))


def test_decode_mask_is_dropped_once_per_step_only_without_padding():
    """A decode step without padding gets no mask at all (no layer reads mask values: no host sync per layer on
    a GPU); with padding, and in the prefill, the boolean mask is kept."""
    from pipeline.kv.cache import _bool_mask

    pad = torch.ones(2, 9, dtype=torch.bool)
    assert _bool_mask(batch_size=2, q_length=1, kv_length=9, attention_mask=pad) is None
    pad[0, 0] = False
    decode = _bool_mask(batch_size=2, q_length=1, kv_length=9, attention_mask=pad)
    assert decode.dtype == torch.bool and decode.shape == (2, 1, 1, 9) and not decode[0, 0, 0, 0]
    prefill = _bool_mask(batch_size=1, q_length=9, kv_length=9, attention_mask=None)
    assert prefill.shape == (1, 1, 9, 9) and torch.equal(prefill[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA and MHA
def test_streaming_heads_training_attention_is_what_the_local_cache_serves(kv_heads):
    """The training attention of `streaming_heads` gives, in one full-sequence forward, the logits a
    HeadKVCache(prefill="local") gives token by token; and it is not full attention."""
    from pipeline.kv.streaming_heads import use_streaming_heads

    model = _model(heads=4, kv_heads=kv_heads)
    ids = torch.randint(3, 64, (2, 48), generator=torch.Generator().manual_seed(2))
    full_heads = [[0], []]
    with torch.no_grad():
        plain = model(ids).logits
        use_streaming_heads(model, full_heads, sink=2, window=6)
        trained = model(ids).logits
        use_headwise_attention(model)
        served = _stepwise_logits(model, ids, HeadKVCache(model.config, full_heads, 2, 6, "local"), 20)
    torch.testing.assert_close(trained, served, atol=1e-5, rtol=1e-4)
    assert (trained - plain).abs().max() > 1e-2


def test_streaming_heads_reads_a_parent_models_registry(tmp_path):
    """A fine-tuned model trains on its parent's heads: shape is checked, weights are not."""
    from pipeline.kv.streaming_heads import registry_heads

    parent, child = _model(seed=0), _model(seed=1)
    scores = [[0.0, 0.9, 0.0, 0.1], [0.5, 0.0, 0.0, 0.0]]
    save_registry(tmp_path / "r.json", parent, "wu", scores, {})
    assert registry_heads(tmp_path / "r.json", child, 2) == [[0], [0]]
    with pytest.raises(ValueError, match="fingerprint"):
        load_registry(tmp_path / "r.json", child)
    with pytest.raises(ValueError, match="num_layers"):
        registry_heads(tmp_path / "r.json", _model(n_layers=3), 2)


def test_chat_decode_budget_covers_the_worked_reply():
    """A chat model quotes the needle sentence before its Answer line; with the demo base's character-level
    tokenizer that reply is 66 tokens, and the old fixed budget (50) cut every one of them off."""
    from transformers import AutoTokenizer

    from pipeline.generation.teachers import render
    from pipeline.kv.evaluate import niah_examples, reply_tokens

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "data/models/demo-base")
    ex = niah_examples(tok, "passkey", 128, 0.5, 1, 0)[0]
    reply = render(ex, "steps")
    assert reply.endswith(f"Answer: {ex.answer}") and ex.answer in reply.splitlines()[0]
    assert reply_tokens(tok, ex) == len(reply) > 50


@pytest.mark.parametrize("served_by", ["training attention", "local", "full"])
def test_streaming_heads_sinks_are_each_rows_first_tokens_under_left_padding(served_by):
    """A left-padded row decodes as it does alone: its streaming heads keep its own first `sink` tokens, not the
    padding in front of it, in the training attention (a plain cache) and in HeadKVCache (both prefills)."""
    from pipeline.kv.streaming_heads import use_streaming_heads

    model = _model(heads=4, kv_heads=2)
    if served_by != "full":
        use_streaming_heads(model, [[0], []], sink=2, window=6)
    if served_by != "training attention":
        use_headwise_attention(model)
    rows = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 19)]
    ids = torch.zeros(2, 30, dtype=torch.long)
    ids[0], ids[1, 11:] = rows[0], rows[1]  # 11 pads: more than the sinks and the window

    def steps(input_ids, mask):
        cache = None if served_by == "training attention" else HeadKVCache(model.config, [[0], []], 2, 6, served_by)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, past_key_values=cache)
        return torch.stack(out.logits, 1)  # [B, steps, vocab]

    batched = steps(ids, (ids != 0).long())
    for i, row in enumerate(rows):
        alone = steps(row[None], torch.ones(1, len(row), dtype=torch.long))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model,chat", [("demo-base", True), ("demo-base", False), ("retrieval-tiny", False)])
def test_niah_prompts_are_as_long_as_their_label(model, chat):
    """A NIAH cell labelled n tokens holds prompts of about n tokens as the model reads them. The fixed part (needle,
    question, chat template, system prompt) was once taken as 25 tokens: with the demo base's character-level
    tokenizer the "256" and "512" chat cells held 325-380 and 568-623 tokens, past the SFT's max_length."""
    from transformers import AutoTokenizer

    from pipeline.kv.evaluate import niah_cells, niah_examples, prompt_text

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "data/models" / model)
    render = lambda e: prompt_text(tok, e, chat, "Give only the final answer.")  # noqa: E731
    for task in ("passkey", "kv_haystack"):
        cells = niah_cells(tok, (256, 512, 1024), (0.1, 0.5, 0.9), 6, task, 0, render=render)  # one fit, same prompts
        for n in (256, 512, 1024):
            exs = [e for d in (0.1, 0.5, 0.9) for e in niah_examples(tok, task, n, d, 6, 0, render=render)]
            assert exs == [e for d in (0.1, 0.5, 0.9) for e in cells[n, d]]
            lengths = [len(tok(render(e), add_special_tokens=False)["input_ids"]) for e in exs]
            assert abs(sum(lengths) / len(lengths) - n) <= 0.05 * n, (task, n, lengths)
            assert max(lengths) <= 1.15 * n and min(lengths) >= 0.85 * n, (task, n, lengths)

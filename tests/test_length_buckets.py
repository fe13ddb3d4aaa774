"""`length_buckets` (SFT): batches hold rows of one length bucket, in random order, through the trainer's own
dataloader; bad values are refused with one line."""

import bisect

import pytest

from pipeline import dpo, sft
from pipeline.config import RecipeError
from pipeline.data import batch_by_length, length_bucketed_order


def test_order_batches_within_buckets_in_random_order():
    lengths = [10 + (i * 7) % 50 if i % 5 else 300 + i for i in range(203)]
    edges, bs = [64, 256], 8
    order = length_bucketed_order(lengths, edges, bs, seed=3)
    assert sorted(order) == list(range(203))
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    bucket = [{bisect.bisect_left(edges, lengths[j]) for j in b} for b in batches]
    # one bucket per batch: only the last batches hold the buckets' remainders
    assert all(len(b) == 1 for b in bucket[:-len(edges)])
    seq = [min(b) for b in bucket]
    assert seq != sorted(seq) and seq != sorted(seq, reverse=True), "batches must not come sorted by length"
    assert order == length_bucketed_order(lengths, edges, bs, seed=3) != length_bucketed_order(lengths, edges, bs, 4)
    # an edge is the longest row of the bucket below it: the two 256-token rows share a batch
    o = length_bucketed_order([256, 257, 256, 257], [256], 2, 0)
    assert {frozenset(o[:2]), frozenset(o[2:])} == {frozenset({0, 2}), frozenset({1, 3})}


def test_trainer_dataloader_follows_the_bucketed_order(tiny_model_dir, tmp_path):
    """The contract with transformers: `train_sampling_strategy: sequential` reads train_dataset in its order, so
    every batch pads only to its own bucket's lengths."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": [{"role": "user", "content": "word " * (3 if i % 4 else 60) + str(i)},
                          {"role": "assistant", "content": f"Answer: {i}"}]} for i in range(48)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", max_length=512,
                     bf16=False, seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    lengths = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    edge = (lengths[0] + lengths[-1]) // 2
    batch_by_length(trainer, [edge], "recipe.yaml")
    seen, kinds = 0, []
    for batch in trainer.get_train_dataloader():
        real = batch["attention_mask"].sum(1).tolist()
        assert len({n > edge for n in real}) == 1, f"a batch mixes buckets: {real}"
        assert batch["input_ids"].shape[1] == max(real)
        kinds.append(real[0] > edge)
        seen += len(real)
    assert seen == 48 and kinds.count(True) == 3 and kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


@pytest.mark.parametrize("extra,message", [
    (["--length_buckets", "[256, 128]"], "key 'length_buckets' must be increasing token lengths >= 1"),
    (["--length_buckets", "[0]"], "key 'length_buckets' must be increasing token lengths >= 1"),
    (["--length_buckets", "[256]", "--packing", "true"],
     "key 'length_buckets' batches padded rows by length: packed or padding-free rows have no padding to save"),
    (["--length_buckets", "[256]", "--train_sampling_strategy", "group_by_length"],
     "key 'length_buckets' sets the batch order itself: drop 'train_sampling_strategy: group_by_length'"),
])
def test_bad_length_buckets_are_one_line(tiny_model_dir, sft_jsonl, tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(sft_jsonl), "--output_dir",
                  str(tmp_path / "out"), "--report_to", "none", *extra])


def test_length_buckets_is_refused_for_dpo(tiny_model_dir, dpo_jsonl, tmp_path):
    with pytest.raises(RecipeError, match="key 'length_buckets' is an SFT key"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(dpo_jsonl), "--output_dir",
                  str(tmp_path / "out"), "--report_to", "none", "--length_buckets", "[256]"])

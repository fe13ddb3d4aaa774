"""The demo's look-inside stages on small inputs: retrieval-head detection as a stage (pipeline.kv.detect),
the super-weight quantization comparison (pipeline.quant.compare), and SFT's held-out scoring under a system
prompt (eval_system_prompt)."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ROOT / "data/models/retrieval-tiny"


def test_detect_stage_finds_the_committed_models_retrieval_heads(tmp_path):
    from pipeline.kv.detect import main as detect_main

    out = tmp_path / "heads"
    metrics = detect_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", str(out),
                           "--compare_with", str(RETRIEVAL / "retrieval_heads.json"),
                           "--lengths", "[128]", "--depths", "[0.5]", "--per_cell", "2", "--top_k", "2"])
    assert metrics["passkey_solved"] == 1.0 and metrics["top_score"] > 0.5
    # the committed registry was scored at longer contexts: its two strongest heads are found again
    assert metrics["top2_overlap"] == 1.0, metrics
    reg = json.loads((out / "retrieval_heads.json").read_text())
    assert reg["method"] == "wu" and (out / "retrieval_heads.png").is_file()
    assert json.loads((out / "stage_result.json").read_text())["metrics"] == metrics


def test_detect_stage_rejects_a_registry_of_another_shape(tmp_path, tiny_model_dir):
    from pipeline.kv.detect import main as detect_main, save_registry
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other.json"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_registry(other, m, "wu", [[0.0] * m.config.num_attention_heads] * m.config.num_hidden_layers, {})
    with pytest.raises(RecipeError, match="key 'compare_with'.*another shape"):
        detect_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", str(tmp_path / "h"),
                     "--compare_with", str(other), "--lengths", "[64]", "--depths", "[0.5]", "--per_cell", "1"])


def test_quant_compare_keeps_the_super_weight_exact(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quant.compare import main as compare_main
    from pipeline.quant.plant import Plant, plant_super_weight

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sw = plant_super_weight(model, tok.bos_token_id, Plant(layer=1, row=17, col=100))
    planted = tmp_path / "planted"
    model.save_pretrained(planted)
    tok.save_pretrained(planted)
    out = tmp_path / "quant"
    metrics = compare_main(["--model_name_or_path", str(planted), "--output_dir", str(out), "--tasks", "[copy]",
                            "--n", "2", "--max_new_tokens", "4", "--nf4", "false"])
    assert metrics["super_weights"] == 1 and metrics["super_weight"].startswith("L1 [17,100]")
    report = json.loads((out / "quant.json").read_text())
    assert set(report["variants"]) == {"fp", "fp_sw_zeroed", "rtn", "rtn_clip", "rtn_clip_restore_sw"}
    assert all(v["nll"] > 0 and 0 <= v["accuracy"] <= 1 for v in report["variants"].values())
    assert report["super_weights"][0]["value"] == pytest.approx(sw.value)
    saved = AutoModelForCausalLM.from_pretrained(out / "rtn_sw", dtype=torch.float32)
    assert saved.model.layers[1].mlp.down_proj.weight[17, 100].item() == pytest.approx(sw.value, abs=0)
    assert (out / "rtn_sw" / "super_weights.json").is_file()


def test_sft_scores_held_out_examples_under_eval_system_prompt(monkeypatch):
    import pipeline.evaluate as ev
    from pipeline.config import DataArguments

    seen = []

    def fake_generate(model, tokenizer, conversations, batch_size=64, max_new_tokens=128, **kw):
        seen.extend(conversations)
        return [""] * len(conversations)

    monkeypatch.setattr(ev, "generate_replies", fake_generate)
    ev.evaluate(None, None, ["copy"], n=3, system_prompt="Think step by step.")
    assert len(seen) == 3 and all(c[0] == {"role": "system", "content": "Think step by step."} for c in seen)
    assert DataArguments.__dataclass_fields__["eval_system_prompt"].default is None


def test_chat_mode_asks_through_the_template_and_reads_the_answer_line():
    import random

    from transformers import AutoTokenizer

    from pipeline.kv.evaluate import answer_of, prompt_text
    from pipeline.tasks.needle import Passkey

    tok = AutoTokenizer.from_pretrained(ROOT / "data/models/demo-base")
    ex = Passkey(key_digits=5).make(random.Random(0), 20, 0.5)
    raw, chat = prompt_text(tok, ex, False), prompt_text(tok, ex, True)
    assert raw.endswith("\nAnswer:") and ex.question in chat
    assert chat.startswith(tok.bos_token) and chat.endswith("<|im_start|>assistant\n")
    quoted = f"The context says: The passkey is {ex.answer}. Remember it.\nAnswer: {ex.answer}"
    assert answer_of(quoted, True) == ex.answer and answer_of(" " + ex.answer + "\nmore", False) == ex.answer
    assert answer_of("no answer line", True) == ""


def test_quant_compare_rejects_an_unknown_variant():
    from pipeline.quant.compare import main as compare_main

    with pytest.raises((RecipeError, SystemExit, ValueError), match="variants"):
        compare_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", "/tmp/x", "--variants", "[fp, int3]"])


@pytest.mark.parametrize("z", ["0", "-3"])
def test_quant_compare_rejects_a_clip_that_is_not_positive(z):
    from pipeline.quant.compare import main as compare_main

    with pytest.raises(RecipeError, match=r"key 'clip_zscore' must be > 0 \(standard deviations\)"):
        compare_main(["--model_name_or_path", str(RETRIEVAL), "--output_dir", "/tmp/x", "--clip_zscore", z])


def test_demo_base_tokenizer_is_one_token_per_character():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "data/models/demo-base")
    for text in ("Copy: q p m", "x=5 c=7. What is x?", "Add 59 + 63."):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text)
    log = json.loads((ROOT / "data/models/demo-base/train_log.json").read_text())
    m = log["metrics"]
    # the built-in super weight is one the model depends on: zeroing it multiplies the document NLL
    assert m["probe_sw_zeroed"]["nll"] > 5 * m["probe"]["nll"] and m["passkey_acc@256-512"] == 1.0


def test_generate_task_counts_override_n_per_task_and_name_known_tasks(tmp_path):
    from pipeline.generate import GenerateArguments, load_queries

    args = GenerateArguments(output_dir=str(tmp_path), tasks=["copy", "passkey"], n_per_task=5,
                             task_counts={"passkey": 2})
    counts = {}
    for q in load_queries(args):
        counts[q.example.task] = counts.get(q.example.task, 0) + 1
    assert counts == {"copy": 5, "passkey": 2}
    with pytest.raises(ValueError, match="key 'task_counts'"):
        GenerateArguments(output_dir=str(tmp_path), tasks=["copy"], task_counts={"sort": 3})


def test_generate_task_difficulty_splits_a_task_across_levels(tmp_path):
    from pipeline.generate import GenerateArguments, load_queries
    from pipeline.tasks.needle import haystack_words

    args = GenerateArguments(output_dir=str(tmp_path), tasks=["copy", "passkey"], n_per_task=5,
                             task_difficulty={"passkey": [1, 2]})
    words = sorted(len(q.question.split("\n")[0].split()) for q in load_queries(args) if q.example.task == "passkey")
    # 3 at level 1 (48 filler words + the needle), 2 at level 2 (96 + the needle)
    assert len(words) == 5 and all(w < haystack_words(2) for w in words[:3]) and all(w > haystack_words(2) for w in words[3:])
    one = GenerateArguments(output_dir=str(tmp_path), tasks=["passkey"], n_per_task=2, task_difficulty={"passkey": 2})
    assert one.task_difficulty == {"passkey": [2]}
    for bad in ({"sort": 2}, {"passkey": []}, {"passkey": [0]}, {"passkey": [True]}):
        with pytest.raises(ValueError, match="key 'task_difficulty' must map tasks of 'tasks' to a level >= 1"):
            GenerateArguments(output_dir=str(tmp_path), tasks=["passkey"], task_difficulty=bad)


def test_eval_split_size_that_leaves_no_training_rows_is_one_clear_error(dpo_jsonl):
    from pipeline.config import DataArguments
    from pipeline.data import load_train_data

    args = DataArguments(dataset_name=str(dpo_jsonl), eval_split_size=64)  # the file has 64 pairs
    with pytest.raises(RecipeError, match=r"key 'eval_split_size' \(64 rows held out\) leaves no training rows: "
                                          r"the data has 64"):
        load_train_data(args, "dpo", "recipe.yaml")
    train, held_out = load_train_data(DataArguments(dataset_name=str(dpo_jsonl), eval_split_size=8), "dpo", "r")
    assert (len(train), len(held_out)) == (56, 8)


def test_report_chart_adds_kv_and_quant_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from pipeline import run

    rows = [("sft", {"accuracy/copy": 1.0, "accuracy/add": 0.8}), ("dpo", {"accuracy/copy": 0.9, "accuracy/add": 0.85})]
    metrics = {"niah_acc/full": 0.7, "niah_acc/retrieval_heads": 0.1, "kv_bytes_ratio@512/retrieval_heads": 0.26,
               "quant_accuracy/fp": 0.96, "quant_accuracy/rtn": 0.0}
    axes_seen, real_subplots = [], plt.subplots

    def subplots(*args, **kwargs):  # count the panels each chart gets
        fig, axes = real_subplots(*args, **kwargs)
        axes_seen.append(axes.size)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", subplots)
    assert run.plot_accuracy(rows, ["accuracy/add", "accuracy/copy"], tmp_path / "r.png", metrics)
    assert run.plot_accuracy(rows, ["accuracy/add", "accuracy/copy"], tmp_path / "plain.png")
    assert axes_seen == [3, 1] and (tmp_path / "r.png").stat().st_size > 0


def test_run_report_chart_gets_the_kv_and_quant_panels(tmp_path, monkeypatch):
    """Through the runner's report, from the stages' own stage_result.json: the NIAH stage's metrics are named
    niah_acc/..., not ...accuracy..., and the report once drew no KV panel for them; its table holds the per-task
    accuracies only (it had a column for every accuracy-named metric of every stage, 21 in the demo)."""
    from pipeline import run
    from pipeline.io import write_stage_result

    results = {"sft": {"accuracy/add": 0.8, "accuracy/copy": 1.0}, "dpo": {"accuracy/add": 0.9, "accuracy/copy": 1.0},
               "niah": {"niah_acc/full": 0.5, "niah_acc/retrieval_heads": 0.9, "niah_acc/uniform_window": 0.2,
                        "kv_bytes_ratio@512/retrieval_heads": 0.26, "kv_bytes_ratio@512/uniform_window": 0.26},
               "quant": {"quant_accuracy/fp": 0.97, "quant_accuracy/rtn": 0.0}}
    stages = []
    for name, metrics in results.items():
        write_stage_result(tmp_path / name, name, metrics, {})
        stages.append(run.Stage(name=name, module="m", config="c.yaml", args={"output_dir": str(tmp_path / name)}))
    seen = []
    monkeypatch.setattr(run, "plot_accuracy", lambda rows, tasks, path, metrics=None: seen.append(metrics) or True)
    run.write_report(run.PipelineRecipe(name="t"), stages, {}, tmp_path / "report.md")
    assert {k: v for k, v in seen[0].items() if not k.startswith("accuracy/")} == {
        **results["niah"], **results["quant"]}
    report = (tmp_path / "report.md").read_text()
    assert "![held-out accuracy by task after each stage](report.png)" in report
    # the per-stage table: a column per task, a row per stage that has task accuracies
    assert "| stage | add | copy |\n|---|---|---|\n| sft | 0.8 | 1 |\n| dpo | 0.9 | 1 |\n" in report


def test_tiny_sft_recipe_path_batches_passkey_rows_apart(tmp_path, monkeypatch):
    """recipes/tiny/sft.yaml's path (demo base, streaming heads, assistant-only loss) with length buckets, on the
    tiny generate recipe's rows with passkeys at two levels (the trial in docs/BENCHMARKS.md), shrunk to a few
    queries and 4 steps: the passkey rows of both levels make the long bucket, every batch of the trainer's own
    dataloader stays in one bucket, and the model declares its streaming heads."""
    from pipeline import generate, sft

    generate.main(["--config", "recipes/tiny/generate.yaml", "--output_dir", str(tmp_path / "data"), "--n_per_task", "6",
                   "--task_counts", "{passkey: 8}", "--task_difficulty", "{passkey: [1, 2]}", "--save_datasets", "false",
                   "--write_corpus", "false"])
    rows = [json.loads(line) for line in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    assert sum(r["task"] == "passkey" for r in rows) == 8
    seen = {}

    def spy(trainer, edges, source):
        seen.update(trainer=trainer, edges=edges)
        return real(trainer, edges, source)

    real = sft.batch_by_length
    monkeypatch.setattr(sft, "batch_by_length", spy)
    sft.main(["--config", "recipes/tiny/sft.yaml", "--dataset_name", str(tmp_path / "data" / "sft.jsonl"),
              "--output_dir", str(tmp_path / "sft"), "--max_steps", "4", "--per_device_train_batch_size", "4",
              "--eval_tasks", "[]", "--logging_steps", "1", "--max_length", "768", "--length_buckets", "[256]"])
    assert seen["edges"] == [256]
    long = []
    for batch in seen["trainer"].get_train_dataloader():
        real_lengths = batch["attention_mask"].sum(1).tolist()
        assert len({n > 256 for n in real_lengths}) == 1, real_lengths
        long += [n for n in real_lengths if n > 256]
    assert len(long) == 8 and max(long) > 600  # level 2 (96 filler words) reaches the NIAH stage's 512-token prompts
    log = json.loads((tmp_path / "sft" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4] and all(h["loss"] > 0 for h in log if "loss" in h)
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["streaming_heads"]["window"] == 64

"""scripts/bench_dpo_gain.py's paired comparison: the figures docs/BENCHMARKS.md quotes for "DPO over SFT"."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_dpo_gain", Path(__file__).parents[1] / "scripts/bench_dpo_gain.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def rows(bits):
    return [{"correct": bool(b)} for b in bits]


def test_paired_gain_counts_each_question_once_and_its_se_is_that_of_the_differences():
    sft = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    dpo = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]   # 3 questions only DPO gets, 1 only SFT gets
    got = bench.paired(rows(sft), rows(dpo))
    assert got["n"] == 10 and got["sft"] == 0.6 and got["dpo"] == 0.8
    assert got["gain"] == pytest.approx(0.2)
    assert got["dpo_only_right"] == 3 and got["sft_only_right"] == 1
    # differences 0,0,1,1,-1,0,0,0,1,0: mean 0.2, sample variance 3.6 / 9 = 0.4, SE sqrt(0.4 / 10) = 0.2
    assert got["paired_se"] == pytest.approx(0.2)


def test_identical_models_have_no_gain_and_no_noise():
    same = rows([1, 0, 1, 1])
    got = bench.paired(same, same)
    assert got["gain"] == 0 and got["paired_se"] == 0


@pytest.mark.parametrize("argv, line", [
    (["--n", "1"], "error: --n: must be >= 2, got 1"),
    (["--runs", "/nonexistent"], "error: /nonexistent/seed0/sft: no model there; run scripts/bench_demo.py first"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, line):
    r = subprocess.run([sys.executable, str(Path(bench.__file__)), *argv], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == line


def test_completion_logps_are_the_reply_tokens_of_the_whole_chat(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "Add 12 + 25."}]
    reply = [{"role": "assistant", "content": "2+5=7, write 7\n1+2=3, write 3\nAnswer: 37"}]

    def total(text):  # log-prob of every token after the first
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum().item()

    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template(prompt + reply, tokenize=False)
    assert whole.startswith(head)
    got = bench.completion_logps(model, tok, prompt, reply)
    assert got < 0 and got == pytest.approx(total(whole) - total(head), abs=1e-3)


def test_reward_accuracy_scores_cut_and_whole_rejects_and_a_policy_equal_to_its_reference_wins_none(tiny_model_dir,
                                                                                                     monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = {"prompt": [{"role": "user", "content": "Add 12 + 25."}],
            "chosen": [{"role": "assistant", "content": "Answer: 37"}],
            "rejected": [{"role": "assistant", "content": "Answer: 4"}], "rejected_full": "Answer: 47"}
    seen, logps = [], bench.completion_logps
    monkeypatch.setattr(bench, "completion_logps", lambda m, t, p, c: seen.append(c[0]["content"]) or logps(m, t, p, c))
    got = bench.reward_accuracy(model, model, tok, [pair, dict(pair, rejected_full=None)])
    assert got["n"] == 2
    rejected = [text for text in seen if text != "Answer: 37"][::2]  # the policy's call of each (policy, ref) pair
    assert rejected == ["Answer: 4", "Answer: 4", "Answer: 47", "Answer: 4"]  # as trained; whole (no full: as trained)
    for view in ("as_trained", "whole_replies"):
        assert got[view]["accuracy"] == 0 and got[view]["mean_margin_nats"] == pytest.approx(0, abs=1e-5)


def test_ablation_trains_on_whole_or_add_only_pairs_and_refuses_pairs_without_whole_replies(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_dpo_ablation",
                                                  Path(__file__).parents[1] / "scripts/bench_dpo_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    import json

    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "Answer: 37"}],
             "rejected": [{"role": "assistant", "content": "Answer: 4"}], "rejected_full": "Answer: 47", "task": t}
            for q, t in (("Add 12 + 25.", "add"), ("Sort: 3 1 2", "sort"))]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for which in ("cut", "whole", "cut_add"):
        ablation.write_pairs(src, tmp_path / f"{which}.jsonl", which)
        got[which] = [json.loads(x) for x in (tmp_path / f"{which}.jsonl").read_text().splitlines()]
    assert got["cut"] == rows
    assert [r["rejected"][0]["content"] for r in got["whole"]] == ["Answer: 47", "Answer: 47"]
    assert [r["task"] for r in got["cut_add"]] == ["add"]
    src.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "rejected_full"}) + "\n")
    with pytest.raises(SystemExit, match="no 'rejected_full' column"):
        ablation.write_pairs(src, tmp_path / "x.jsonl", "whole")

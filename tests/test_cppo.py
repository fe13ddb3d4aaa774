"""CPPO: weights, KR loss, the trainer's loss against hand-computed values, the frozen snapshot, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.rl.cppo_trainer import CPPOConfig, CPPOTrainer, cppo_weights, kr_loss, masked_seq_mean


def test_weights_on_a_constructed_batch():
    # rewards: mean 0.5, std 0.408 -> band 0.5 +- 0.204: 1 high, 0 low, 0.5 normal
    # log-probs: mean -1.042, std 0.776 -> band +- 0.388: -0.1 high, -2 low, -1 and -1.05 normal
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    logps = torch.tensor([-0.1, -2.0, -0.1, -2.0, -1.0, -1.05])
    alpha, beta = cppo_weights(rewards, logps, k=0.5, lb=0.2, ub=2.0)
    assert alpha.tolist() == pytest.approx([2.0, 2.0, 2.0, 0.2, 1.0, 1.0])
    assert beta.tolist() == pytest.approx([2.0, 0.2, 0.2, 0.2, 1.0, 1.0])
    # A wider band (k=3) leaves every sample normal; a batch with one reward value has no high/low reward.
    assert cppo_weights(rewards, logps, k=3.0, lb=0.2, ub=2.0)[0].tolist() == [1.0] * 6
    alpha, beta = cppo_weights(torch.ones(6), logps, k=0.5, lb=0.2, ub=2.0)
    assert alpha.tolist() == [1.0] * 6 and beta.tolist() == [1.0] * 6


def test_weights_use_batch_statistics_not_absolute_values():
    # The same ranking shifted and scaled gives the same categories: only the batch's own statistics count.
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    logps = torch.tensor([-3.0, -2.5, -2.0, -1.5, -1.0, -0.5])
    a1, b1 = cppo_weights(rewards, logps, 0.5, 0.2, 2.0)
    a2, b2 = cppo_weights(rewards * 10 + 7, logps / 4 - 5, 0.5, 0.2, 2.0)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.tolist() == pytest.approx([0.2, 0.2, 1.0, 1.0, 2.0, 2.0])


def test_length_normalised_logprob_ignores_padding():
    x = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert masked_seq_mean(x, mask).tolist() == pytest.approx([-2.0, -2.0])


def test_kr_loss_hand_computed():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    anchor = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    beta = torch.tensor([2.0, 0.2])
    # sample 1: (0.25 + 0) / 2 * 2 = 0.25; sample 2: (0 + 1 + 0) / 3 * 0.2 = 0.0667; mean = 0.15833
    assert kr_loss(logps, anchor, mask, beta).item() == pytest.approx((0.25 + 0.2 / 3) / 2)
    # Uniform scaling of beta scales the loss (it is not renormalised away by the sum of weights).
    assert kr_loss(logps, anchor, mask, beta * 3).item() == pytest.approx(3 * (0.25 + 0.2 / 3) / 2)


def test_config_rejects_bad_bounds(tmp_path):
    with pytest.raises(ValueError, match="lb"):
        CPPOConfig(output_dir=str(tmp_path), lb=1.5, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="weighting"):
        CPPOConfig(output_dir=str(tmp_path), weighting="learned", use_cpu=True, bf16=False)


def _length_reward(completions, **kwargs):
    # A dense reward an untrained model can improve on: shorter completions score higher.
    return [1.0 - min(len(c if isinstance(c, str) else c[-1]["content"]), 40) / 40 for c in completions]


def _trainer(model_dir, tmp_path, anchor, max_steps=3, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = CPPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, max_steps=max_steps, learning_rate=5e-3, loss_type="grpo",
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, seed=0, **overrides)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Copy: {c} b"}]} for c in "abcdefgh"])
    return CPPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=data,
                       processing_class=tok, anchor_model=anchor)


def test_trainer_loss_matches_hand_computed_value(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    anchor = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a different snapshot, so the KR term is non-zero
        for p in anchor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = _trainer(tiny_model_dir, tmp_path, anchor, c_kr=0.5)
    tok, model = trainer.processing_class, trainer.model
    prompt = tok(["<|im_start|>user\nCopy: a b<|im_end|>\n<|im_start|>assistant\n"] * 2, return_tensors="pt")
    completion_ids = torch.tensor([[40, 41, 42, 43], [44, 45, 46, 47]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages = torch.tensor([1.0, -0.5])
    beta = torch.tensor([2.0, 0.2])

    def per_token_logps(m):  # independent of TRL's fused head: plain logits and log_softmax
        ids = torch.cat([prompt["input_ids"], completion_ids], 1)
        attention = torch.cat([prompt["attention_mask"], completion_mask], 1)
        logits = m(input_ids=ids, attention_mask=attention).logits[:, -completion_ids.size(1) - 1:-1]
        return torch.log_softmax(logits.float() / trainer.args.temperature, -1).gather(
            -1, completion_ids.unsqueeze(-1)).squeeze(-1)

    model.train()
    with torch.no_grad():
        lp, anchor_lp = per_token_logps(model), per_token_logps(anchor)
    inputs = {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": advantages,
              "cppo_beta": beta, "anchor_per_token_logps": anchor_lp, "num_items_in_batch": completion_mask.sum()}
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; outside it, set by hand
    loss = trainer.compute_loss(model, inputs)
    # On-policy (ratio 1): the clipped surrogate of each sample is its advantage; GRPO averages -A over samples.
    mask = completion_mask.float()
    kr = [((lp[i] - anchor_lp[i]) ** 2 * mask[i]).sum().item() / mask[i].sum().item() for i in range(2)]
    expected = -(1.0 - 0.5) / 2 + 0.5 * (2.0 * kr[0] + 0.2 * kr[1]) / 2
    assert kr[0] > 1e-4 and kr[1] > 1e-4
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # And the KR part has a gradient towards the anchor.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_steps_change_weights_and_snapshot_is_frozen_and_used(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    anchor = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in anchor.named_parameters()}
    trainer = _trainer(tiny_model_dir, tmp_path, anchor, max_steps=3, c_kr=1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "cppo/kr" in h]
    # Step 1: the policy equals the snapshot, KR is exactly 0; once the policy moved, the snapshot pulls.
    assert logs[0]["cppo/kr"] == 0.0 and logs[-1]["cppo/kr"] > 0
    assert all("cppo/alpha_mean" in h for h in logs)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    assert all(not p.requires_grad for p in trainer.anchor_model.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.anchor_model.named_parameters())


def test_plain_mode_needs_no_snapshot_and_cppo_does(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="anchor_model"):
        _trainer(tiny_model_dir, tmp_path, None, c_kr=0.1)
    trainer = _trainer(tiny_model_dir, tmp_path, None, max_steps=1, c_kr=0.0, weighting="none")
    trainer.train()
    assert not any("cppo/kr" in h or "cppo/alpha_mean" in h for h in trainer.state.log_history)


def test_task_labels_name_the_difficulty_where_it_is_not_the_evals():
    from pipeline.cppo import task_labels

    assert task_labels([{"task": "kv_lookup", "difficulty": 1}, {"task": "multihop", "difficulty": 2}]) == \
        ["kv_lookup", "multihop_d2"]
    assert task_labels([{"task": "multihop", "difficulty": 1}, {"task": "multihop", "difficulty": 2}]) == \
        ["multihop_d1", "multihop_d2"]


def test_transfer_metrics():
    from pipeline.cppo import transfer_metrics

    m = transfer_metrics([[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]])
    assert m["average_score"] == pytest.approx(0.7)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def _stage_argv(model_dir, out):
    return ["--config", "recipes/tiny/cppo.yaml", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--tasks", "[{task: copy, max_steps: 3}, {task: reverse, max_steps: 4}]", "--n_train", "16",
            "--eval_n", "4", "--per_device_train_batch_size", "8", "--num_generations", "4",
            "--max_completion_length", "8", "--save_steps", "2", "--learning_rate", "5e-3", "--logging_steps", "1"]


class _Interrupt(Exception):
    pass


def test_stage_resumes_mid_task_like_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    import pipeline.tasks
    from pipeline import cppo

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(pipeline.tasks, "verifier_reward", _length_reward)  # an untrained model can learn this
    full = cppo.main(_stage_argv(tiny_model_dir, tmp_path / "full"))

    original = CPPOTrainer.training_step

    def crash_in_task2(self, *args, **kwargs):
        if "task2" in self.args.output_dir and self.state.global_step == 3:  # after checkpoint-2 of task 2
            raise _Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CPPOTrainer, "training_step", crash_in_task2)
    with pytest.raises(_Interrupt):
        cppo.main(_stage_argv(tiny_model_dir, tmp_path / "resumed"))
    progress = json.loads((tmp_path / "resumed/progress.json").read_text())
    assert [d["task"] for d in progress["done"]] == ["copy"]
    task1 = tmp_path / "resumed/task1-copy/model.safetensors"
    mtime = task1.stat().st_mtime
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CPPOTrainer, "training_step", counting)
    resumed = cppo.main(_stage_argv(tiny_model_dir, tmp_path / "resumed"))

    assert task1.stat().st_mtime == mtime  # task 1 was not retrained
    assert calls == [2, 3]  # task 2 went on from checkpoint-2
    state = json.loads((tmp_path / "resumed/task2-reverse/trainer_state.json").read_text())
    assert state["global_step"] == 4
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full/task2-reverse/model.safetensors")
    b = load_file(tmp_path / "resumed/task2-reverse/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    t1 = load_file(task1)
    assert any(not torch.equal(a[k], t1[k]) for k in a)  # task 2 did train: the equality above is not vacuous
    for k, v in full.items():
        assert math.isclose(v, resumed[k], abs_tol=1e-9), k
    report = json.loads((tmp_path / "resumed/forgetting.json").read_text())
    assert len(report["matrix"]) == 2 and len(report["matrix"][0]) == 2
    assert (tmp_path / "resumed/forgetting.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("[{task: copy, steps: 3}]", "unknown key 'tasks[0].steps'"),
    ("[{task: nope}]", "unknown task 'nope'"),
    ("[{task: copy, reward: no/such/rm}]", "key 'tasks[0].reward' must be 'verifier'"),
    ("[]", "key 'tasks' must list at least one task"),
])
def test_bad_task_sequence_is_one_line_error(override, message, capsys, monkeypatch):
    from pipeline import cppo
    from pipeline.config import cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as e:
        cli(cppo.main, ["--config", "recipes/tiny/cppo.yaml", "--tasks", override, "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err


def test_reward_model_task(tiny_model_dir, tmp_path, monkeypatch):
    """A task rewarded by a sequence-classification reward model; evaluation still uses the verifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import cppo

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    rm_dir = tmp_path / "rm"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    argv = _stage_argv(tiny_model_dir, tmp_path / "out")
    argv[argv.index("--tasks") + 1] = f"[{{task: copy, max_steps: 2, reward: {rm_dir}}}]"
    metrics = cppo.main(argv)
    assert "accuracy/copy" in metrics
    logs = json.loads((tmp_path / "out/task1-copy/trainer_state.json").read_text())["log_history"]
    rewards = [h["rewards/rm/std"] for h in logs if "rewards/rm/std" in h]
    assert rewards and all(r > 0 for r in rewards)  # the reward model scored the rollouts (not a constant)


def test_kl_baseline_anchors_each_task_to_its_starting_policy(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO + KL (scripts/cppo_experiment.py's plain_kl: --beta > 0, c_kr 0): TRL's reference model is the task's
    own starting policy, so task 2 starts at KL 0 although task 1 moved the weights away from the input model."""
    import pipeline.tasks
    from pipeline import cppo

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(pipeline.tasks, "verifier_reward", _length_reward)  # so the policy moves
    out = tmp_path / "out"
    cppo.main(_stage_argv(tiny_model_dir, out) + ["--beta", "0.04", "--c_kr", "0", "--weighting", "none"])
    for task in ("task1-copy", "task2-reverse"):
        kl = [h["kl"] for h in json.loads((out / task / "trainer_state.json").read_text())["log_history"] if "kl" in h]
        assert kl[0] == pytest.approx(0.0, abs=1e-6) and max(kl[1:]) > 0  # the penalty is live, from the task's start


def test_cppo_experiment_summary_compares_with_the_first_method():
    """scripts/cppo_experiment.py's summary: every method against the first (the baseline, as its --methods help
    says). It read a method named "plain" whatever came first, so `--methods cppo` lost its summary to a KeyError
    after all its runs, and `--methods cppo plain` compared plain with itself."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts/cppo_experiment.py"
    spec = importlib.util.spec_from_file_location("cppo_experiment", path)
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)

    def run(method, seed, forgot, task2):
        return {"method": method, "seed": seed, "task1_after_task1": 0.9, "task1_after_task2": 0.9 - forgot,
                "task1_forgetting": forgot, "task2_after_task2": task2}

    runs = [run("plain", 0, 0.4, 0.5), run("plain", 1, 0.6, 0.5), run("cppo", 0, 0.1, 0.5), run("cppo", 1, 0.1, 0.4)]
    ratios = exp.summarise(runs, ["plain", "cppo"])["ratios"]
    assert ratios == {"cppo": pytest.approx({"forgetting_over_plain": 0.2, "forgetting_reduction": 0.8,
                                             "task2_over_plain": 0.9})}
    assert exp.summarise(runs, ["cppo", "plain"])["ratios"]["plain"]["forgetting_over_plain"] == pytest.approx(5.0)
    only = exp.summarise([r for r in runs if r["method"] == "cppo"], ["cppo"])
    assert only["ratios"] == {} and only["cppo"]["task1_forgetting"]["mean"] == pytest.approx(0.1)

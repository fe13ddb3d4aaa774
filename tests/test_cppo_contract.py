"""What CPPOTrainer relies on in TRL's GRPOTrainer, pinned: the underscore methods it extends (GRPO has no
public hook for its rewards or for the policy log-probs inside its loss), the keys of the rollout batch, the
attributes it reads, and GRPO's own reward aggregation. A failure names what changed in TRL."""

from __future__ import annotations

import inspect

import pytest
import torch
from trl import GRPOTrainer

from pipeline.rl.cppo_trainer import CPPOConfig, CPPOTrainer, grpo_rewards

# method -> the leading parameters CPPOTrainer passes (positionally or by name)
EXTENDED = {
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_get_per_token_logps_and_entropies": ["self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size"],
    "_generate_and_score_completions": ["self", "inputs"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
}
# (and transformers' Trainer sets current_gradient_accumulation_steps in its training loop)
READ_ATTRIBUTES = ["_metrics", "reward_weights", "num_generations", "num_generations_eval",
                   "multi_objective_aggregation", "temperature", "is_deepspeed_enabled", "is_fsdp_enabled", "accelerator"]
ROLLOUT_KEYS = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages"]


@pytest.mark.parametrize("name", list(EXTENDED))
def test_extended_methods_keep_their_signatures(name):
    method = getattr(GRPOTrainer, name, None)
    assert method is not None, f"trl's GRPOTrainer no longer has {name}(): CPPOTrainer extends it"
    params = list(inspect.signature(method).parameters)
    want = EXTENDED[name]
    assert params[:len(want)] == want, (f"trl changed GRPOTrainer.{name}{inspect.signature(method)}: "
                                        f"CPPOTrainer calls it with {want}")


def test_grpo_loss_goes_through_the_extended_methods():
    # CPPO captures the policy's log-probs inside GRPO's loss: compute_loss must still reach them.
    src = inspect.getsource(GRPOTrainer.compute_loss) + inspect.getsource(GRPOTrainer._compute_loss)
    assert "_get_per_token_logps_and_entropies(" in src, \
        "GRPOTrainer.compute_loss no longer calls _get_per_token_logps_and_entropies: CPPO's KR term has no log-probs"
    assert "self._calculate_rewards(" in inspect.getsource(GRPOTrainer._generate_and_score_completions), \
        "GRPOTrainer._generate_and_score_completions no longer calls _calculate_rewards: CPPO sees no rewards"


def _length_reward(completions, **kwargs):
    return [None if i % 5 == 0 else 1.0 - min(len(c[-1]["content"]), 40) / 40 for i, c in enumerate(completions)]


def _vowel_reward(completions, **kwargs):
    return [None if i % 5 == 0 or i % 3 == 0 else sum(ch in "aeiou" for ch in c[-1]["content"]) / 10
            for i, c in enumerate(completions)]


def _trainer(model_dir, tmp_path, aggregation):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = CPPOConfig(output_dir=str(tmp_path / aggregation), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, max_steps=1, loss_type="grpo", report_to="none", use_cpu=True,
                      bf16=False, gradient_checkpointing=False, seed=0, c_kr=0.0, weighting="heuristic",
                      lb=1.0, ub=1.0, multi_objective_aggregation=aggregation, reward_weights=[1.0, 0.5])
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Copy: {c} b"}]} for c in "abcdefgh"])
    return CPPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                       reward_funcs=[_length_reward, _vowel_reward],
                       processing_class=AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_rewards_are_aggregated_as_grpo_aggregates_them(tiny_model_dir, tmp_path, aggregation):
    trainer = _trainer(tiny_model_dir, tmp_path, aggregation)
    for name in READ_ATTRIBUTES:
        assert hasattr(trainer, name), f"trl's GRPOTrainer no longer sets self.{name}: CPPOTrainer reads it"
    trainer.model.train()
    rows = [r for r in trainer.train_dataset.select(range(2)) for _ in range(4)]  # 2 prompts x 4 generations
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rows)
    missing = [k for k in ROLLOUT_KEYS if k not in out]
    assert not missing, f"trl's _generate_and_score_completions no longer returns {missing}"
    per_func = trainer._last_rewards_per_func
    assert per_func.shape == (8, 2) and torch.isnan(per_func[0]).all(), \
        "trl's _calculate_rewards no longer returns (samples, functions) with NaN for None"

    # With CPPO's weights at 1 the advantages are GRPO's own; rebuilt from CPPO's rewards they must match.
    rewards = trainer._last_rewards
    assert torch.isnan(rewards[0]) and torch.isnan(rewards[5]) and not torch.isnan(rewards[1:5]).any()
    if aggregation == "sum_then_normalize":  # scale_rewards "group"
        grouped = rewards.view(-1, 4)
        mean = torch.nanmean(grouped, 1, keepdim=True)
        std = torch.stack([torch.tensor(r[~torch.isnan(r)].std().item()) for r in grouped]).unsqueeze(1)
        expected = ((grouped - mean) / (std + 1e-4)).view(-1)
    else:
        scored = rewards[~torch.isnan(rewards)]
        expected = (rewards - scored.mean()) / (scored.std() + 1e-4)
    expected = torch.nan_to_num(expected, nan=0.0)
    assert out["advantages"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert out["advantages"][0] == 0 and out["advantages"].abs().sum() > 0
    # And the plain aggregation would differ: a nansum of the weighted functions is not what GRPO normalises.
    if aggregation == "normalize_then_sum":
        plain = (per_func * torch.tensor([1.0, 0.5])).nansum(1)
        assert not torch.allclose(torch.nan_to_num(rewards), plain)


def test_grpo_rewards_by_hand():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, 2.0], [float("nan"), float("nan")], [3.0, 1.0]])
    r = grpo_rewards(per_func, torch.tensor([1.0, 0.5]), 2, "sum_then_normalize")
    assert r[:2].tolist() == [1.0, 1.0] and torch.isnan(r[2]) and r[3].item() == 3.5
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        grpo_rewards(per_func, torch.ones(2), 2, "mean")

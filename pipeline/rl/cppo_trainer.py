"""CPPO (Zhang et al., ICLR 2024) on TRL's GRPOTrainer: per-sample weights and a knowledge-retention loss.

Per rollout x the loss is

    -alpha(x) * clipped policy-gradient term  +  c_KR * beta(x) * mean_t (log pi_theta - log pi_old)^2

where pi_old is a frozen snapshot of the policy as it was at the end of the previous task (with
`num_iterations=1` the rollout policy equals the current one, so anchoring to it would give a zero
gradient). alpha scales the GRPO advantages; the KR term is added to GRPO's loss.

alpha and beta come from the *current* rollout batch: each sample is high/low/normal in reward and in
length-normalised generation log-prob against the batch mean +- k * std (one value per sample, not per
token), and the weights are applied as plain per-sample factors (never renormalised by their sum, which
would cancel a uniform up- or down-weighting). These are the three bugs of the public TRL port. The
reward of a sample is the one GRPO normalises into its advantage (`grpo_rewards`: both of GRPO's
`multi_objective_aggregation` modes, NaN for a sample no reward function could score).

GRPOTrainer has no public hook for the rewards it computes or for the policy's log-probs inside its loss,
so three of its underscore methods are extended (each calls `super()` and returns its result unchanged):
`_calculate_rewards`, `_get_per_token_logps_and_entropies` and `_generate_and_score_completions`; the loss
goes through the public `compute_loss`. tests/test_cppo_contract.py pins their signatures and the keys and
attributes used here, and names what changed when a TRL release breaks them.
"""

from __future__ import annotations

import dataclasses

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer import add_fused_lm_head
from trl.trainer.utils import nanstd


@dataclasses.dataclass
class CPPOConfig(GRPOConfig):
    k: float = dataclasses.field(
        default=0.5, metadata={"help": "A sample is high/low when it is more than k batch std from the batch mean."})
    lb: float = dataclasses.field(default=0.2, metadata={"help": "Lower bound of the heuristic weights."})
    ub: float = dataclasses.field(default=2.0, metadata={"help": "Upper bound of the heuristic weights."})
    c_kr: float = dataclasses.field(
        default=0.1, metadata={"help": "Coefficient of the knowledge-retention loss (0 = none: plain online RL)."})
    weighting: str = dataclasses.field(
        default="heuristic",
        metadata={"help": "'heuristic': CPPO's per-sample (alpha, beta) from the current batch; 'none': all 1 "
                  "(with c_kr: 0 this is plain GRPO, the baseline)."})

    def __post_init__(self):
        super().__post_init__()
        if self.weighting not in ("heuristic", "none"):
            raise ValueError(f"key 'weighting' must be one of 'heuristic', 'none', got {self.weighting!r}")
        if not 0 < self.lb <= 1 <= self.ub:
            raise ValueError(f"keys 'lb'/'ub' must satisfy 0 < lb <= 1 <= ub, got lb={self.lb}, ub={self.ub}")
        if self.k < 0 or self.c_kr < 0:
            raise ValueError("keys 'k' and 'c_kr' must be >= 0")


def grpo_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                 aggregation: str) -> torch.Tensor:
    """The per-sample reward GRPO turns into its advantage (trl 1.16 `_generate_and_score_completions`):
    `sum_then_normalize`: the weighted nansum of the reward functions; `normalize_then_sum`: the weighted sum
    of each function's group-normalised reward. NaN for a sample every function returned None for (GRPO
    gives it advantage 0)."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    w = reward_weights.to(rewards_per_func.device).unsqueeze(0)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * w).nansum(dim=1)
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.size(1))
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
        rewards = (((grouped - mean) / (std + 1e-4)).view(-1, rewards_per_func.size(1)) * w).nansum(dim=1)
    else:
        raise ValueError(f"unknown multi_objective_aggregation {aggregation!r}")
    rewards[unscorable] = torch.nan
    return rewards


def cppo_weights(rewards: torch.Tensor, gen_logps: torch.Tensor, k: float, lb: float, ub: float):
    """Per-sample (alpha, beta) from a batch of rewards and length-normalised generation log-probs, both (B,).
    A NaN reward (an unscorable sample) is neither high nor low, and is left out of the batch statistics.

    high/high -> (ub, ub): good and already likely: learn it and keep it;
    high/low  -> (ub, lb): good but unlikely: learn it, nothing to retain yet;
    low/high  -> (ub, lb): bad but likely: push it down, do not anchor to it;
    low/low   -> (lb, lb): bad and unlikely: mostly noise;
    otherwise -> (1, 1).
    """
    def level(x: torch.Tensor) -> torch.Tensor:  # +1 high, -1 low, 0 normal, against this batch's statistics
        x = x.float()
        mean = torch.nanmean(x)
        std = torch.nanmean((x - mean) ** 2).sqrt()  # population std of the scored samples
        return (x > mean + k * std).long() - (x < mean - k * std).long()  # NaN compares False: normal

    r, p = level(rewards), level(gen_logps)
    alpha = torch.ones_like(rewards, dtype=torch.float32)
    beta = torch.ones_like(alpha)
    hh, hl, lh, ll = (r == 1) & (p == 1), (r == 1) & (p == -1), (r == -1) & (p == 1), (r == -1) & (p == -1)
    alpha[hh | hl | lh], alpha[ll] = ub, lb
    beta[hh], beta[hl | lh | ll] = ub, lb
    return alpha, beta


def masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's unmasked tokens: (B, T) -> (B,)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def kr_loss(logps: torch.Tensor, anchor_logps: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """mean_x beta(x) * mean_t (log pi_theta - log pi_old)^2 (without c_KR)."""
    return (beta * masked_seq_mean((logps - anchor_logps) ** 2, mask)).mean()


class CPPOTrainer(GRPOTrainer):
    """GRPOTrainer plus CPPO's weights and KR loss. `anchor_model`: the frozen previous-task policy."""

    def __init__(self, *args, anchor_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.c_kr > 0 and anchor_model is None:
            raise ValueError("c_kr > 0 needs an anchor_model (a frozen snapshot of the previous task's policy)")
        self.anchor_model = None
        if anchor_model is not None:
            anchor_model.eval().requires_grad_(False)
            # Score it as GRPO scores its reference model: per-token log-probs at the sampling temperature.
            add_fused_lm_head(anchor_model, temperature=self.temperature,
                              cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            if self.is_deepspeed_enabled:
                self.anchor_model = prepare_deepspeed(anchor_model, self.accelerator)
            elif self.is_fsdp_enabled:
                self.anchor_model = prepare_fsdp(anchor_model, self.accelerator)
            else:
                self.anchor_model = self.accelerator.prepare_model(anchor_model, evaluation_mode=True)
        self._capture_logps = False
        self._captured_logps = None

    # GRPO computes the rewards inside _generate_and_score_completions but returns only advantages: keep them.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._last_rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._last_rewards_per_func

    # GRPO's loss computes the policy's per-token log-probs (with grad) internally; reuse them for the KR term
    # instead of a second forward pass.
    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._capture_logps:
            self._captured_logps = out[0]
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mask = out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]
        n_local, n_tokens = out["prompt_ids"].size(0), out["completion_ids"].size(1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

        with torch.no_grad():
            if self.args.weighting == "heuristic":
                logps = out.get("old_per_token_logps")
                if logps is None:  # aligned steps: GRPO skipped it, the rollout policy is the current one
                    logps = self._get_per_token_logps_and_entropies(self.model, ids, attention, n_tokens,
                                                                    batch_size=batch_size)[0]
                # Statistics over the whole generation batch (all processes), one value per sample.
                gen_logps = self.accelerator.gather(masked_seq_mean(logps, mask))
                num_generations = self.num_generations if mode == "train" else self.num_generations_eval
                rewards = grpo_rewards(self._last_rewards_per_func, self.reward_weights, num_generations,
                                       self.multi_objective_aggregation)
                self._last_rewards = rewards
                alpha, beta = cppo_weights(rewards, gen_logps.to(rewards.device), self.args.k, self.args.lb,
                                           self.args.ub)
                local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
                alpha, beta = alpha[local].to(ids.device), beta[local].to(ids.device)
                for name, w in (("alpha", alpha), ("beta", beta)):
                    self._metrics[mode][f"cppo/{name}_mean"].append(self.accelerator.gather(w).mean().item())
            else:
                alpha = beta = torch.ones(n_local, device=ids.device)
            out["advantages"] = out["advantages"] * alpha
            out["cppo_beta"] = beta
            if self.anchor_model is not None and self.args.c_kr > 0:
                out["anchor_per_token_logps"] = self._get_per_token_logps_and_entropies(
                    self.anchor_model, ids, attention, n_tokens, batch_size=batch_size)[0]
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._capture_logps = True
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._capture_logps = False
        if "anchor_per_token_logps" not in inputs:
            return loss
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        kr = kr_loss(self._captured_logps, inputs["anchor_per_token_logps"], mask, inputs["cppo_beta"])
        self._captured_logps = None
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["cppo/kr"].append(self.accelerator.gather(kr.detach()).mean().item())
        # GRPO's policy loss is already divided for gradient accumulation; divide the KR term the same way.
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + self.args.c_kr * kr / normalizer

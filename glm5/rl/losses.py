"""RL objectives on per-token log-probs: advantages, policy losses, KL to a reference, entropy bonus, and the
train/inference mismatch corrections (TIS, IcePop). Pure tensor functions, no model.

    from glm5.rl.losses import group_advantages, policy_loss, LossConfig
    adv = group_advantages(rewards, group_size=4, algo="grpo")          # [N] one per response
    out = policy_loss(logp, old_logp, rollout_logp, adv, mask, LossConfig(algo="grpo"), ref_logp=ref, entropy=ent)
    out.loss.backward(); out.metrics                                    # {"pg_loss", "kl", "mismatch_kl", ...}

Shapes: every per-token tensor is [N, T] (N responses, T their longest length, `mask` 1 on tokens the loss
trains: the model's own sampled tokens, not prompts or tool results). Conventions:

- `logp`: the trainer's log-probs of the sampled tokens under the weights being trained (with gradient).
- `old_logp`: the same, computed by the trainer before this update (detached). With one update per batch it
  equals `logp.detach()`, so the ratio logp - old_logp is 0 in value and carries only the gradient.
- `rollout_logp`: what the engine reported when it sampled the token (its "behaviour" log-prob). It differs
  from old_logp by the engine/trainer numerics and, in async / APRIL modes, by the policy versions that passed
  since the token was sampled. The importance weight old/rollout corrects both: TIS (Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training") caps it; IcePop (GLM-4.5/-5 report's
  "mask tokens whose ratio left [low, high]") zeroes the tokens instead. This is AReaL's decoupled objective
  (arXiv 2505.24298): clip against the proximal policy, reweight by proximal / behaviour.

Algorithms (names as slime's `--advantage-estimator`):
- "grpo" (DeepSeekMath): A_i = (r_i - mean_group) / (std_group + eps), std unbiased (torch's default, as
  slime); `std_normalization=False` is Dr. GRPO's r_i - mean_group. PPO's clipped token ratio.
- "gspo" (Qwen, arXiv 2507.18071): GRPO's advantages, one ratio per sequence, exp(mean_t(logp - old_logp)),
  clipped with a small range; the token form sg[s_i] * exp(logp_t - sg[logp_t]) gives its gradient.
- "cispo" (MiniMax-M1, arXiv 2506.13585): -sg(min(ratio, 1 + eps_high)) * A * logp: the IS weight is clipped and
  detached, every token keeps a gradient (PPO's clip drops the gradient of clipped tokens).
- "reinforce++" (REINFORCE++-baseline, arXiv 2501.03262): A_i = r_i - mean_group, then normalized over the
  whole batch; PPO's clipped token ratio.
Loss reduction: the mean over all trained tokens of the batch (DAPO's token-level mean), except GSPO, which
averages per-sequence losses (its objective is per sequence).

KL estimators of KL(pi || ref) on tokens sampled from pi (Schulman, "Approximating KL divergence"), with
d = ref_logp - logp: k1 = -d; k2 = d^2 / 2; k3 = exp(d) - d - 1 (unbiased, >= 0); low_var_kl = k3 clamped to
[-10, 10] (verl's name for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm5.rl.names import ALGOS, KL_ESTIMATORS, MISMATCH_FIXES  # noqa: F401  (the names it implements; defined torch-free)


@dataclass
class LossConfig:
    algo: str = "grpo"
    std_normalization: bool = True  # GRPO: divide by the group's reward std (False: Dr. GRPO)
    clip_low: float = 0.2  # PPO ratio clip [1 - low, 1 + high] (GRPO, REINFORCE++)
    clip_high: float = 0.28  # DAPO's clip-higher
    gspo_clip_low: float = 3e-4  # GSPO's sequence ratios sit near 1: the paper's range
    gspo_clip_high: float = 4e-4
    cispo_clip_high: float = 0.28  # CISPO: upper cap of the detached IS weight (no lower one)
    kl_coef: float = 0.0  # KL to the frozen reference, added to the loss (0: no reference model needed)
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * mean token entropy
    mismatch: str = "tis"  # engine vs trainer log-probs: "tis" (capped IS weight), "icepop" (mask), "none"
    tis_cap: float = 2.0  # slime's default cap
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    eps: float = 1e-6

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo {self.algo!r}: must be one of {', '.join(ALGOS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl estimator {self.kl_estimator!r}: must be one of {', '.join(KL_ESTIMATORS)}")
        if self.mismatch not in MISMATCH_FIXES:
            raise ValueError(f"mismatch correction {self.mismatch!r}: must be one of {', '.join(MISMATCH_FIXES)}")
        if not self.tis_cap > 0:
            raise ValueError(f"tis cap {self.tis_cap}: must be > 0")
        if not 0 <= self.icepop_low < 1 < self.icepop_high:
            raise ValueError(f"IcePop range [{self.icepop_low}, {self.icepop_high}]: needs 0 <= low < 1 < high")
        for name in ("clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high", "cispo_clip_high", "kl_coef",
                     "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 0")


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, algo: str = "grpo", std_normalization: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] (N = groups x group_size, a group's responses next to each other) -> advantages [N]."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [groups * {group_size}], got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(-1, keepdim=True)
    if algo == "reinforce++":
        flat = centered.flatten()
        if flat.numel() < 2:
            return flat
        return (flat - flat.mean()) / (flat.std() + eps)
    if std_normalization and algo in ("grpo", "gspo", "cispo"):
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(centered)
        centered = centered / (std + eps)
    return centered.flatten()


# ---------------------------------------------------------------------------------------------- pieces
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) for tokens drawn from pi. [N, T] -> [N, T]."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator in ("k3", "low_var_kl"):
        kl = torch.exp(d) - d - 1
        return kl.clamp(-10, 10) if estimator == "low_var_kl" else kl
    raise ValueError(f"kl estimator {estimator!r}: must be one of {', '.join(KL_ESTIMATORS)}")


def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(pi_trainer / pi_engine, cap) per token, detached."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def icepop_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """1.0 where pi_trainer / pi_engine lies in [low, high], 0.0 where the token is dropped."""
    ratio = torch.exp(old_logp - rollout_logp)
    return ((ratio >= low) & (ratio <= high)).float()


def mismatch_kl(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(engine || trainer) over the masked tokens (the engine sampled them), k3: mean(r - 1 - log r) with
    r = pi_trainer / pi_engine; 0 when both give the same log-probs. In float64: the k3 of a 1e-6 gap is 5e-13,
    which float32 rounds to 0."""
    d = (old_logp.double() - rollout_logp.double())
    k3 = torch.exp(d) - d - 1
    return float(masked_mean(k3, mask.double()))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's distribution: logits [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------- the loss
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, config: LossConfig, ref_logp: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None) -> LossOutput:
    """The scalar loss to minimize and its metrics. advantages [N] per response (broadcast over its tokens)."""
    mask = mask.float()
    old_logp, rollout_logp = old_logp.detach(), rollout_logp.detach()
    adv = advantages.float().view(-1, 1).expand_as(logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)

    # train/inference mismatch: a per-token weight (TIS) or mask (IcePop) from trainer vs engine log-probs
    weight = torch.ones_like(logp)
    train_mask = mask
    if config.mismatch == "tis":
        weight = tis_weight(old_logp, rollout_logp, config.tis_cap)
    elif config.mismatch == "icepop":
        train_mask = mask * icepop_mask(old_logp, rollout_logp, config.icepop_low, config.icepop_high)

    metrics: dict = {}
    if config.algo == "gspo":
        lengths = mask.sum(-1).clamp(min=1)
        seq_log_ratio = (log_ratio * mask).sum(-1) / lengths  # [N]
        seq_ratio = torch.exp(seq_log_ratio)
        # token form: value s_i on every token, gradient s_i * grad(logp_t) / |y_i| after the mean below
        token_ratio = seq_ratio.detach().view(-1, 1) * torch.exp(logp - logp.detach())
        clipped = token_ratio.clamp(1 - config.gspo_clip_low, 1 + config.gspo_clip_high)
        per_token = -torch.minimum(token_ratio * adv, clipped * adv) * weight
        per_seq = (per_token * train_mask).sum(-1) / lengths
        has_tokens = (mask.sum(-1) > 0).float()
        pg_loss = (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
        clipped_frac = (seq_ratio.detach() - seq_ratio.detach().clamp(1 - config.gspo_clip_low, 1 + config.gspo_clip_high)).ne(0)
        metrics["clip_frac"] = float((clipped_frac.float() * has_tokens).sum() / has_tokens.sum().clamp(min=1))
    elif config.algo == "cispo":
        is_weight = ratio.detach().clamp(max=1 + config.cispo_clip_high)
        per_token = -is_weight * adv * logp * weight
        pg_loss = masked_mean(per_token, train_mask)
        metrics["clip_frac"] = float(masked_mean((ratio.detach() > 1 + config.cispo_clip_high).float(), mask))
    else:  # grpo, reinforce++: PPO's clipped surrogate per token
        clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv) * weight
        pg_loss = masked_mean(per_token, train_mask)
        metrics["clip_frac"] = float(masked_mean((ratio.detach() != clipped.detach()).float(), mask))
    loss = pg_loss
    metrics["pg_loss"] = float(pg_loss.detach())

    if ref_logp is not None:
        kl = masked_mean(kl_penalty(logp, ref_logp.detach(), config.kl_estimator), mask)
        metrics["kl"] = float(kl.detach())
        if config.kl_coef:
            loss = loss + config.kl_coef * kl
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mask)
        metrics["entropy"] = float(mean_entropy.detach())
        if config.entropy_coef:
            loss = loss - config.entropy_coef * mean_entropy
    metrics["mismatch_kl"] = mismatch_kl(old_logp, rollout_logp, mask)
    if config.mismatch == "tis":
        metrics["tis_clip_frac"] = float(masked_mean((torch.exp(old_logp - rollout_logp) > config.tis_cap).float(), mask))
    if config.mismatch == "icepop":
        metrics["icepop_masked_frac"] = float(1 - train_mask.sum() / mask.sum().clamp(min=1))
    return LossOutput(loss, metrics)

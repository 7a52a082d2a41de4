"""The RL trainer: recompute the sampled tokens' log-probs with the model, apply the loss, step AdamW.

    trainer = RLTrainer(model, TrainerConfig(algo="grpo", lr=1e-5), group_size=4)
    metrics = trainer.train_step(groups)           # groups: [[Episode x group_size], ...] from the buffer
    state, version = trainer.weights(), trainer.version   # what the rollout workers load (weight sync)

One optimizer step per batch (slime's default): the log-probs before the update are the detached log-probs of
the same forward, so the PPO ratio is 1 in value and the off-policy / engine-mismatch correction comes from
the engine's log-probs (TIS or IcePop, glm5/rl/losses.py). The optimizer is glm5/train/optim.py's AdamW; a
reference model for the KL term is a frozen copy of the starting weights, built only when kl_coef > 0.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from glm5.rl.losses import LossConfig, group_advantages, policy_loss, token_entropy
from glm5.rl.names import OVERLONG  # noqa: F401  (defined torch-free: the command's parser reads it)
from glm5.rl.rollout import Episode
from glm5.train import losses as train_losses
from glm5.train.optim import build_optimizer


@dataclass
class TrainerConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mask_offpolicy: bool = False  # train only on tokens the current policy sampled (APRIL's option)
    overlong: str = "keep"  # responses cut at max_new_tokens: keep, mask (no loss), penalty (reward - overlong_penalty)
    overlong_penalty: float = 0.5
    micro_batch: int = 8  # episodes per forward (memory), gradients accumulated

    def validate(self) -> None:
        self.loss.validate()
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong {self.overlong!r}: must be one of {', '.join(OVERLONG)}")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr}: must be > 0")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch {self.micro_batch}: must be >= 1")


def prepare_for_rl(model: nn.Module) -> nn.Module:
    """Sparse attention with DSA's top-k as a mask (same math as the engine's, faster on a CPU at these
    lengths), no indexer loss, no routing capture; the indexers stay frozen (the policy gradient cannot reach
    a top-k choice)."""
    for attn in train_losses.attention_modules(model):
        attn.dense_attention, attn.indexer_loss_mode, attn.sparse_as_mask = False, None, True
    for moe in train_losses.moe_modules(model):
        moe.record_routing = False
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." not in name)
    return model.train()


def sequence_logprobs(model: nn.Module, episodes: list[Episode], with_entropy: bool = False):
    """Per response token: the model's log-prob of the token, [N, T] (T: longest response), and entropy."""
    rows = [e.prompt_ids + e.tokens for e in episodes]
    longest = max(len(r) for r in rows)
    T = max(len(e.tokens) for e in episodes)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)  # right padding: causal attention never sees it
    ids = ids.to(device)
    logits = model(ids).logits.float()  # [N, L, V]
    logp = torch.zeros(len(rows), T, device=device)
    ent = torch.zeros(len(rows), T, device=device) if with_entropy else None
    for i, e in enumerate(episodes):
        n, p = len(e.tokens), len(e.prompt_ids)
        if not n:
            continue
        row = torch.log_softmax(logits[i, p - 1 : p - 1 + n], dim=-1)  # position t predicts token t + 1
        logp[i, :n] = row.gather(-1, ids[i, p : p + n].unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            ent[i, :n] = token_entropy(logits[i, p - 1 : p - 1 + n].detach())
    return logp, ent


class RLTrainer:
    def __init__(self, model: nn.Module, config: TrainerConfig, group_size: int, version: int = 0):
        config.validate()
        self.model = prepare_for_rl(model)
        self.config, self.group_size, self.version = config, group_size, version
        self.optimizer = build_optimizer(self.model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
        self.reference = None
        if config.loss.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def weights(self) -> dict:
        """The policy's weights for the rollout workers (CPU tensors)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])

    def _rewards(self, episodes: list[Episode]) -> torch.Tensor:
        rewards = []
        for e in episodes:
            r = e.reward
            if self.config.overlong == "penalty" and e.truncated:
                r -= self.config.overlong_penalty
            rewards.append(r)
        return torch.tensor(rewards, dtype=torch.float32)

    def _mask(self, e: Episode, T: int) -> list[float]:
        mask = list(e.loss_mask)
        if self.config.overlong == "mask" and e.truncated:
            mask = [0] * len(mask)
        if self.config.mask_offpolicy:
            mask = [m if v == self.version else 0 for m, v in zip(mask, e.versions)]
        return [float(m) for m in mask] + [0.0] * (T - len(mask))

    def train_step(self, groups: list[list[Episode]]) -> dict:
        """One update on complete groups; -> metrics (the policy version after it included)."""
        started = time.perf_counter()
        episodes = [e for g in groups for e in g]
        cfg = self.config.loss
        rewards = self._rewards(episodes)
        advantages = group_advantages(rewards, self.group_size, cfg.algo, cfg.std_normalization, cfg.eps)
        T = max(1, max(len(e.tokens) for e in episodes))
        masks = torch.tensor([self._mask(e, T) for e in episodes])
        total_tokens = float(masks.sum())
        total_seqs = float((masks.sum(-1) > 0).sum())
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        with_entropy = True
        trained = 0
        for start in range(0, len(episodes), self.config.micro_batch):
            part = episodes[start : start + self.config.micro_batch]
            mask = masks[start : start + len(part), : max(1, max(len(e.tokens) for e in part))]
            if mask.sum() == 0:
                continue
            Tp = mask.shape[1]
            logp, entropy = sequence_logprobs(self.model, part, with_entropy)
            rollout = torch.tensor([e.logprobs + [0.0] * (Tp - len(e.logprobs)) for e in part])
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = sequence_logprobs(self.reference, part)
            out = policy_loss(logp, logp.detach(), rollout, advantages[start : start + len(part)], mask, cfg,
                              ref_logp=ref, entropy=entropy)
            # the loss is a mean over this micro-batch's tokens (sequences for GSPO): weight it to the batch's
            share = float((mask.sum(-1) > 0).sum()) / total_seqs if cfg.algo == "gspo" else float(mask.sum()) / total_tokens
            (out.loss * share).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
            trained += int(mask.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                         self.config.grad_clip)) if trained else 0.0
        if trained and math.isfinite(grad_norm):
            self.optimizer.step()
        self.version += 1
        seconds = time.perf_counter() - started
        staleness = [self.version - 1 - v for e in episodes for v, m in zip(e.versions, e.loss_mask) if m]
        return {
            **sums, "grad_norm": grad_norm, "trained_tokens": trained, "train_seconds": seconds,
            "train_tokens_per_s": trained / seconds if seconds > 0 else 0.0,
            "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
            "staleness_max": max(staleness) if staleness else 0,
            "offpolicy_token_share": sum(s > 0 for s in staleness) / len(staleness) if staleness else 0.0,
        }

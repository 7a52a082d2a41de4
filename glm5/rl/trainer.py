"""The RL trainer: recompute the sampled tokens' log-probs with the model, apply the loss, step AdamW.

    trainer = RLTrainer(model, TrainerConfig(algo="grpo", lr=1e-5), group_size=4)
    metrics = trainer.train_step(groups)           # groups: [[Episode x group_size], ...] from the buffer
    state, version = trainer.weights(), trainer.version   # what the rollout workers load (weight sync)

One optimizer step per batch (slime's default): the log-probs before the update are the detached log-probs of
the same forward, so the PPO ratio is 1 in value and the off-policy / engine-mismatch correction comes from
the engine's log-probs (TIS or IcePop, glm5/rl/losses.py). The optimizer is glm5/train/optim.py's AdamW; a
reference model for the KL term is a frozen copy of the starting weights, built only when kl_coef > 0.

Data parallel: built inside a torch.distributed process group of N ranks (glm5/rl/actors.py's TrainerGroup
starts one), the model is wrapped by glm5/train/parallel.py (`config.parallel`: DDP or FSDP2). Every rank
gets the whole batch and computes the advantages and the batch's token / sequence counts on all of it
(REINFORCE++ normalizes over the batch; the counts are the loss's denominators), then runs forward and
backward on its own slice: groups [r * G/N, (r + 1) * G/N) of the G groups (G must divide by N). DDP / FSDP2
average the gradients over ranks, so each micro-batch's loss is weighted by N x its share of the batch's
tokens (sequences for GSPO): the average is then the single-trainer gradient, to fp32 rounding. Clipping
uses the global norm (DDP's gradients are already all-reduced; FSDP2's clip_grad_norm_ reduces the
sharded norm). weights() and state_dict() gather the full tensors (collectives under FSDP2: every rank calls
them; rank 0's result is the one to use); the optimizer state is kept in torch.optim's own layout, so a
checkpoint resumes with any number of ranks and either mode.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from glm5.rl.losses import LossConfig, group_advantages, policy_loss, token_entropy
from glm5.rl.names import OVERLONG, TRAINER_PARALLEL  # noqa: F401  (defined torch-free: the command's parser reads them)
from glm5.rl.rollout import Episode
from glm5.train import losses as train_losses
from glm5.train.optim import build_optimizer
from glm5.train.parallel import all_reduce_sum, is_distributed, parallelize


@dataclass
class TrainerConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient norm cap (0: none)
    mask_offpolicy: bool = False  # train only on tokens the current policy sampled (APRIL's option)
    overlong: str = "keep"  # responses cut at max_new_tokens: keep, mask (no loss), penalty (reward - overlong_penalty)
    overlong_penalty: float = 0.5
    micro_batch: int = 8  # episodes per forward (memory), gradients accumulated
    parallel: str = "ddp"  # inside a process group of several ranks: ddp or fsdp (glm5/train/parallel.py)
    ternary: bool = False  # train through absmean-ternary views of the weights (glm5/train/ternary.py)

    def validate(self) -> None:
        self.loss.validate()
        if self.parallel not in TRAINER_PARALLEL:
            raise ValueError(f"trainer parallel {self.parallel!r}: must be one of {', '.join(TRAINER_PARALLEL)}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong {self.overlong!r}: must be one of {', '.join(OVERLONG)}")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr}: must be > 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad clip {self.grad_clip}: must be >= 0 (0: no clipping)")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch {self.micro_batch}: must be >= 1")
        if self.ternary and self.parallel == "fsdp":
            raise ValueError("ternary training runs without FSDP (its parametrized weights are not sharded); use ddp")


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
    """Per response token: the model's log-prob of the token, [N, T] (T: longest response), and entropy. The LM
    head runs only on the positions that predict response tokens (from the shortest prompt's last token to the
    longest row's end), not on the prompts."""
    rows = [e.prompt_ids + e.tokens for e in episodes]
    longest = max(len(r) for r in rows)
    T = max(len(e.tokens) for e in episodes)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)  # right padding: causal attention never sees it
    ids = ids.to(device)
    # position t predicts token t + 1: a response of n tokens after a prompt of p needs positions [p - 1, p - 1 + n)
    first = min((len(e.prompt_ids) - 1 for e in episodes if e.tokens), default=0)
    last = max((len(e.prompt_ids) - 1 + len(e.tokens) for e in episodes if e.tokens), default=1)
    logits = model(ids, logits_to_keep=torch.arange(first, last, device=device)).logits.float()  # [N, last-first, V]
    logp = torch.zeros(len(rows), T, device=device)
    ent = torch.zeros(len(rows), T, device=device) if with_entropy else None
    for i, e in enumerate(episodes):
        n, p = len(e.tokens), len(e.prompt_ids)
        if not n:
            continue
        rows_i = logits[i, p - 1 - first : p - 1 - first + n]
        logp[i, :n] = torch.log_softmax(rows_i, dim=-1).gather(-1, ids[i, p : p + n].unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            ent[i, :n] = token_entropy(rows_i.detach())
    return logp, ent


class RLTrainer:
    def __init__(self, model: nn.Module, config: TrainerConfig, group_size: int, version: int = 0):
        config.validate()
        if config.ternary:
            # BitNet's straight-through views over the given weights (the shadows; shadows_from_ternary when the
            # model was loaded from a ternary checkpoint), weights only: the engine runs activations in full
            # precision, and the trainer's log-probs must be the engine's (mismatch_kl measures it)
            from glm5.train.ternary import make_ternary

            make_ternary(model, activations=False)
        self.inner = prepare_for_rl(model)
        self.config, self.group_size, self.version = config, group_size, version
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        self.reference = None
        if config.loss.kl_coef > 0:  # a whole frozen copy on every rank: forward only, no collectives
            self.reference = copy.deepcopy(self.inner).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        # DDP wraps the model; FSDP2 shards it in place (self.model is self.inner, its parameters DTensors)
        self.model = parallelize(self.inner, config.parallel) if self.world_size > 1 else self.inner
        self.optimizer = build_optimizer(self.inner, "adamw", lr=config.lr, weight_decay=config.weight_decay)

    def _fsdp(self) -> bool:
        return self.world_size > 1 and self.config.parallel == "fsdp"

    def weights(self) -> dict:
        """The policy's weights for the rollout workers (CPU tensors); {} on ranks other than 0."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # a collective: every rank gathers, rank 0 keeps the full tensors on the CPU
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank:
            return {}
        # no copy on a CPU: a worker's set_weights copies them into its own model, and on Ray the answer is
        # serialized into the object store when this call returns (the next update cannot reach it)
        return {k: v.detach().to("cpu") for k, v in self._state(view=True).items()}

    def _state(self, view: bool) -> dict:
        """The model's tensors under the plain model's names; ternary: the views (`view`) or the shadows."""
        if not self.config.ternary:
            return self.inner.state_dict()
        from glm5.train.ternary import plain_state_dict

        return plain_state_dict(self.inner, view)

    def state_dict(self) -> dict:
        """Model, optimizer (torch.optim's layout, whatever the parallel mode) and version; complete on rank 0."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            model_state = self.weights()
            optim = get_optimizer_state_dict(self.model, self.optimizer.optimizers[0],
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            optim_state = {"optimizers": [_by_position(optim)]} if not self.rank else {}
        elif self.rank:
            model_state, optim_state = {}, {}
        else:
            model_state, optim_state = self._state(view=False), self.optimizer.state_dict()
        return {"model": model_state, "optimizer": optim_state, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """The full state (as rank 0's state_dict writes it), given to every rank."""
        saved = state["optimizer"]
        if len(saved.get("optimizers", [])) != len(self.optimizer.optimizers):
            raise ValueError("the checkpoint's optimizer state does not match this trainer's AdamW")
        own = self.optimizer.optimizers[0]
        saved = _with_kernel(saved["optimizers"][0], own)
        if self._fsdp():
            from glm5.train.parallel import load_full_state

            load_full_state(self.model, state["model"], own, _by_name(saved, own, self.inner))
        else:
            model_state = state["model"]
            if self.config.ternary:
                from glm5.train.ternary import parametrized_state

                model_state = parametrized_state(self.inner, model_state)
            self.inner.load_state_dict(model_state)
            self.optimizer.load_state_dict({"optimizers": [saved]})
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

    def _sync(self, last: bool):
        """Gradient accumulation: DDP / FSDP2 reduce gradients over ranks only in the last micro-batch's backward."""
        if self.world_size == 1:
            return contextlib.nullcontext()
        if self._fsdp():
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.model.no_sync()

    def train_step(self, groups: list[list[Episode]]) -> dict:
        """One update on complete groups; -> metrics (the policy version after it included). With N ranks every
        rank is given all the groups, trains on its slice, and returns the batch's metrics (reduced over ranks)."""
        started = time.perf_counter()
        if len(groups) < self.world_size or len(groups) % self.world_size:
            raise ValueError(f"{len(groups)} groups cannot be split evenly over {self.world_size} trainer ranks")
        episodes = [e for g in groups for e in g]
        cfg = self.config.loss
        rewards = self._rewards(episodes)
        advantages = group_advantages(rewards, self.group_size, cfg.algo, cfg.std_normalization, cfg.eps)
        T = max(1, max(len(e.tokens) for e in episodes))
        masks = torch.tensor([self._mask(e, T) for e in episodes])
        # the batch's counts, from the whole batch on every rank: the denominators of the loss's mean
        total_tokens = float(masks.sum())
        total_seqs = float((masks.sum(-1) > 0).sum())
        per_rank = len(episodes) // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        # micro-batches of similar lengths (each is padded to its longest row): the same sum over tokens, in
        # another order, with far less padding when a few answers are long
        order = sorted(range(lo, hi), key=lambda j: len(episodes[j].prompt_ids) + len(episodes[j].tokens))
        chunks = [order[k : k + self.config.micro_batch] for k in range(0, len(order), self.config.micro_batch)]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        with_entropy = True
        trained = 0
        for i, chunk in enumerate(chunks):
            part = [episodes[j] for j in chunk]
            index = torch.tensor(chunk)
            mask = masks[index, : max(1, max(len(e.tokens) for e in part))]
            if mask.sum() == 0 and self.world_size == 1:
                continue  # with several ranks every rank runs the same forwards and backwards (collectives)
            Tp = mask.shape[1]
            with self._sync(last=i == len(chunks) - 1):
                logp, entropy = sequence_logprobs(self.model, part, with_entropy)
                rollout = torch.tensor([e.logprobs + [0.0] * (Tp - len(e.logprobs)) for e in part])
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref, _ = sequence_logprobs(self.reference, part)
                out = policy_loss(logp, logp.detach(), rollout, advantages[index], mask, cfg,
                                  ref_logp=ref, entropy=entropy)
                # the loss is a mean over this micro-batch's tokens (sequences for GSPO): weight it to the batch's;
                # DDP / FSDP2 average the ranks' gradients, so x world size makes the average the batch's gradient
                if cfg.algo == "gspo":
                    share = float((mask.sum(-1) > 0).sum()) / max(total_seqs, 1.0)
                else:
                    share = float(mask.sum()) / max(total_tokens, 1.0)
                (out.loss * (share * self.world_size)).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
            trained += int(mask.sum())
        if self.world_size > 1:  # each rank summed its shares of the batch's means: the sum over ranks is the mean
            keys = sorted(sums)
            reduced = all_reduce_sum([sums[k] for k in keys] + [float(trained)])
            sums, trained = dict(zip(keys, reduced[:-1])), int(round(reduced[-1]))
        grad_norm = 0.0
        if trained:  # the same on every rank (reduced): all of them clip and step, or none
            params = [p for p in self.inner.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
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


# ---------------------------------------------------------------------------------------------- optimizer state
def _by_position(state: dict) -> dict:
    """torch.distributed.checkpoint's full optimizer state (keyed by parameter name) in torch.optim's own layout
    (keyed by position over the param groups): the layout a single trainer saves and loads."""
    index: dict[str, int] = {}
    groups = [{**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The inverse of _by_position for this optimizer's parameters (named as in `model`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def _with_kernel(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """torch.optim's load_state_dict takes the saved groups' settings, the kernel choice included: keep this
    optimizer's (fused AdamW on plain tensors, the loop on FSDP2's DTensors; glm5/train/optim.py)."""
    own = optimizer.param_groups
    if len(own) != len(state["param_groups"]):
        raise ValueError("the checkpoint's optimizer state does not match this trainer's AdamW")
    groups = [{**g, **{k: o[k] for k in ("fused", "foreach") if k in o}} for g, o in zip(state["param_groups"], own)]
    return {**state, "param_groups": groups}

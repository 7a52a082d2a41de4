"""The training loop shared by every stage: pretraining, the two DSA stages and SFT.

    from glm5.train.config import TrainConfig
    from glm5.train.trainer import Trainer
    trainer = Trainer(model, rows, TrainConfig(stage="pretrain", steps=200), out_dir="runs/x")
    summary = trainer.run()                  # or trainer.run(resume=True) to continue from the last checkpoint

Stages (DeepSeek-V3.2's DSA recipe, which GLM-5 follows, after MLA pretraining):
  pretrain     dense MLA attention; LM + MTP + MoE balance losses; the indexer is frozen (it has no loss yet)
  dsa-warmup   dense attention, everything frozen but the indexers; loss = KL(main attention || indexer)
  dsa-sparse   each query attends to its indexer top-k; all weights train on LM + MTP; the indexer on its
               KL over the selected tokens, from a detached input
  sft          as dsa-sparse, the LM loss only on the assistant's tokens (labels -100 elsewhere)
Every step: loss normalized by the step's global target count (so gradient accumulation and N processes
match one process), gradient clipping, the schedule, the router-bias update from the step's expert load.
Metrics go to `out/metrics.jsonl` (one object per logged step), checkpoints to `out/checkpoints/<stage>/`.
With `probe` rows (a fixed held-out set), the stage scores them before its first step and after its last, under
the stage's own attention (dense, or the top-k), so "did this stage lower the loss" has an answer free of batch
noise: summary["probe_start"] / ["probe_end"] = {"loss", "lm_loss", "indexer_kl"} (loss: the stage's own
objective, the indexer KL in dsa-warmup, else the LM loss).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from glm5.train import losses
from glm5.train.checkpoints import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glm5.train.config import TrainConfig
from glm5.train.data import Batches, PackedRows
from glm5.train.moe_balance import all_reduce_loads, expert_loads, imbalance, update_router_bias
from glm5.train.optim import build_optimizer, lr_factor
from glm5.train.parallel import all_reduce_sum, is_distributed, parallelize, unwrap


def configure_stage(model: nn.Module, stage: str, sparse_as_mask: bool = True) -> None:
    """Set the model's DSA switches, which parameters train, and routing capture for `stage`."""
    model = unwrap(model)
    for name, p in model.named_parameters():
        in_indexer = ".indexer." in name
        if stage == "pretrain":
            p.requires_grad_(not in_indexer)
        elif stage == "dsa-warmup":
            p.requires_grad_(in_indexer)
        else:
            p.requires_grad_(True)
    for attn in losses.attention_modules(model):
        attn.dense_attention = stage in ("pretrain", "dsa-warmup")
        # the top-k as a mask over dense latent attention: same math, much faster on a CPU at training lengths
        attn.sparse_as_mask = sparse_as_mask
        attn.indexer_loss_mode = {"pretrain": None, "dsa-warmup": "dense"}.get(stage, "sparse")
    for moe in losses.moe_modules(model):
        moe.record_routing = True


def release_stage(model: nn.Module) -> None:
    """Back to the plain inference model: sparse attention, no indexer loss, no routing capture, all trainable."""
    model = unwrap(model)
    for attn in losses.attention_modules(model):
        attn.dense_attention, attn.indexer_loss_mode, attn.indexer_kl = False, None, None
        attn.sparse_as_mask = False
    for moe in losses.moe_modules(model):
        moe.record_routing, moe.last_routing = False, None
    for p in model.parameters():
        p.requires_grad_(True)


class ThreadGovernor:
    """Use one CPU thread instead of all while that is faster: when another busy process shares the cores.

    torch's CPU threads meet at a barrier after every op; with a third busy process on two cores, one of ours
    is often descheduled while the other spins waiting, and a step was measured 10-20x slower (dev/LOG.md).
    One thread has no barrier. So every `probe_every` steps one step runs with the other thread count and
    the faster one is kept; a step 2.5x slower than the other count's last one switches at once. Changing the thread count can change float rounding, so this is off where a run
    must be reproducible (the default) and on in `glm5 demo`."""

    def __init__(self, probe_every: int = 15):
        self.full = torch.get_num_threads()
        self.choice = self.full
        self.probe_every = probe_every
        self.last: dict[int, float] = {}
        self.steps = 0
        self.probing = False

    def after_step(self, seconds: float) -> None:
        self.steps += 1
        threads = torch.get_num_threads()
        if self.steps > 1:  # the first step of a stage pays one-off costs
            self.last[threads] = seconds
        other = 1 if threads != 1 else self.full
        if self.probing:
            self.probing = False
            self.choice = min(self.last, key=self.last.get)
            torch.set_num_threads(self.choice)
        elif self.steps > 1 and other in self.last and seconds > 2.5 * self.last[other]:
            self.choice = other  # the load changed since the last probe: switch now, not at the next probe
            torch.set_num_threads(other)
        elif self.steps >= 2 and (self.steps - 2) % self.probe_every == 0:
            torch.set_num_threads(1 if self.choice != 1 else self.full)
            self.probing = True

    def restore(self) -> None:
        torch.set_num_threads(self.full)


class Trainer:
    def __init__(self, model: nn.Module, rows: PackedRows, config: TrainConfig, out_dir: str | os.PathLike,
                 rank: int = 0, world_size: int = 1, probe: PackedRows | None = None):
        config.validate()
        self.config, self.rank, self.world_size = config, rank, world_size
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints" / config.stage
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if config.batch_size < world_size:
            raise ValueError(f"batch size {config.batch_size} is smaller than the {world_size} processes: each needs a row")
        if rows.seq_len < 2:
            raise ValueError(f"sequence length {rows.seq_len}: rows need at least 2 tokens (an input and its next token)")
        micro = config.micro_batch_size or config.batch_size // world_size
        if config.batch_size % (micro * world_size):
            raise ValueError(f"batch size {config.batch_size} must be a multiple of micro batch {micro} x {world_size} processes")
        self.micro, self.accum = micro, config.batch_size // (micro * world_size)
        max_pos = unwrap(model).config.max_position_embeddings
        if rows.seq_len > max_pos:
            raise ValueError(f"sequence length {rows.seq_len} is longer than the model's {max_pos} positions")
        if config.parallel == "fsdp" and config.optimizer == "muon":
            raise ValueError("Muon needs whole matrices; with --parallel fsdp use --optimizer adamw")
        self.batches = Batches(rows, config.batch_size, seed=config.seed, rank=rank, world_size=world_size)
        self.inner = unwrap(model)
        self.device = next(self.inner.parameters()).device  # batches go where the model is
        configure_stage(self.inner, config.stage)
        self.model = parallelize(self.inner, config.parallel)
        self.optimizer = build_optimizer(self.inner, config.optimizer, lr=config.lr, muon_lr=config.muon_lr,
                                         weight_decay=config.weight_decay)
        self.moes = losses.moe_modules(self.inner)
        self.step = 0
        self.probe, self.probe_start = probe, None

    # ------------------------------------------------------------------ checkpoints
    def _fsdp(self) -> bool:
        return self.config.parallel == "fsdp" and is_distributed()

    def state_dict(self) -> dict:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer.optimizers, options=options)
        else:
            model_state, optim_state = self.inner.state_dict(), self.optimizer.state_dict()
        return {"model": model_state, "optimizer": optim_state, "step": self.step, "stage": self.config.stage,
                "scheduler": {"step": self.step}, "data": self.batches.state_dict(), "rng": rng_state(),
                "config": asdict(self.config), "probe_start": self.probe_start}

    def load_state_dict(self, state: dict) -> None:
        if state["stage"] != self.config.stage:
            raise ValueError(f"checkpoint is from stage {state['stage']!r}, this run is {self.config.stage!r}")
        if self._fsdp():
            from glm5.train.parallel import load_full_state

            load_full_state(self.model, state["model"], self.optimizer.optimizers, state["optimizer"])
        else:
            self.inner.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.probe_start = state.get("probe_start")

    def adopt_optimizer_state(self, previous) -> int:
        """Continue the optimizer moments of an earlier stage (a Trainer's or a CombinedOptimizer): every
        parameter both train keeps its AdamW / Muon state (moments and step count), the others start fresh.
        A fresh AdamW moves every parameter by ~lr in its first steps whatever its gradient's usual scale; after
        pretraining that shock alone raised the held-out loss (dev/LOG.md). Single process or DDP (the
        parameters must be the same tensors). Returns how many parameters took a state."""
        previous = getattr(previous, "optimizer", previous)
        if self._fsdp():
            raise ValueError("adopt_optimizer_state needs the same parameter tensors; not under FSDP")
        old = {p: (type(opt), state) for opt in previous.optimizers for p, state in opt.state.items()}
        taken = 0
        for opt in self.optimizer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p in old and old[p][0] is type(opt):
                        opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in old[p][1].items()}
                        taken += 1
        return taken

    def save(self) -> None:
        state = self.state_dict()  # collective under FSDP: every rank takes part
        if self.rank == 0:
            save_checkpoint(self.ckpt_dir, self.step, state, keep_last=self.config.keep_last)

    def resume(self) -> bool:
        """Load the stage's latest checkpoint; False when there is none. Metrics logged after it are dropped,
        since the resumed run logs those steps again."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        return True

    def _drop_metrics_after_step(self) -> None:
        """Drop this stage's metrics lines past self.step (the run logs those steps again), and a last line cut
        short by a kill mid-write."""
        if self.rank != 0 or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (record["stage"] == self.config.stage and record["step"] > self.step):
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    # ------------------------------------------------------------------ the fixed probe rows
    @torch.no_grad()
    def score(self, rows: PackedRows, batch_size: int = 8) -> dict:
        """LM loss (mean over labelled tokens) and indexer KL (mean over batches, summed over layers) of `rows`
        under the stage's attention, in eval mode; nothing trains, the router bias does not move."""
        self.model.eval()
        lm_sum, count, kls = 0.0, 0, []
        threads = torch.get_num_threads()
        if self.config.probe_threads:
            torch.set_num_threads(self.config.probe_threads)
        for start in range(0, len(rows), batch_size):
            ids = rows.ids[start : start + batch_size].to(self.device)
            labels = rows.labels[start : start + batch_size].to(self.device)
            with self._autocast():
                out = self.model(ids, targets=labels)  # summed losses, no [rows, T, vocab] logits
            total, n = out.lm_loss_sum, int((labels[:, 1:] != losses.IGNORE_INDEX).sum())
            lm_sum, count = lm_sum + float(total), count + n
            kl = losses.indexer_kl(self.inner)
            if kl is not None:
                kls.append(float(kl))
        for moe in self.moes:
            moe.last_routing = None
        torch.set_num_threads(threads)
        lm = lm_sum / max(count, 1)
        kl = sum(kls) / len(kls) if kls else None
        return {"loss": kl if self.config.stage == "dsa-warmup" else lm, "lm_loss": lm, "indexer_kl": kl,
                "rows": len(rows), "targets": count}

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.config.dtype == "bfloat16":
            device = next(self.inner.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        ids, labels = self.batches.next()  # this rank's batch_size / world_size rows of the global batch
        ids, labels = ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        micro_batches = list(zip(ids.split(self.micro), labels.split(self.micro)))
        # the tokens of each row up to its last target: a padded SFT row's padding is neither throughput nor load
        real = (labels != losses.IGNORE_INDEX).flip(1).cumsum(1).flip(1) > 0
        real_micro = real.split(self.micro)
        # this step's counts over all processes, in one all-reduce: real tokens, LM targets, MTP targets per depth
        targets = [int((labels[:, d:] != losses.IGNORE_INDEX).sum()) for d in range(1, len(self.inner.mtp) + 2)]
        step_tokens, global_targets, *mtp_targets = all_reduce_sum([int(real.sum()), *targets])
        global_targets = max(global_targets, 1.0)
        mtp_depths = max(1, sum(1 for n in mtp_targets if n > 0))
        warmup_stage = cfg.stage == "dsa-warmup"
        sums = {"lm": 0.0, "mtp": 0.0, "mtp_correct": 0.0, "mtp_counted": 0.0, "aux": 0.0, "kl": 0.0}
        step_loads = None
        for (ids, labels), keep in zip(micro_batches, real_micro):
            for moe in self.moes:  # only this forward's routing: a layer it skips must not show an old one
                moe.last_routing = None
            with self._autocast():
                # summed losses straight from the hidden states (glm5.model.loss): no [rows, T, vocab] logits
                out = self.model(ids, return_mtp=cfg.mtp_weight > 0 or warmup_stage, targets=labels)
            lm_sum = out.lm_loss_sum
            mtp_sums, mtp_correct, mtp_counted = out.mtp_loss_sums or [], out.mtp_correct, out.mtp_counted
            # each depth's sum over this step's global target count of that depth: this rank's share of the mean
            mtp = sum(s * (self.world_size / n) for s, n in zip(mtp_sums, mtp_targets) if n > 0) / mtp_depths
            aux = losses.sequence_balance_loss(self.moes, ids.shape[0])
            kl = losses.indexer_kl(self.inner)
            if warmup_stage:
                total = kl / self.accum
            else:
                # DDP / FSDP average gradients over processes: scale by world size so the sum is the global mean
                total = lm_sum * (self.world_size / global_targets) + cfg.mtp_weight * mtp + cfg.aux_loss_weight * aux / self.accum
                if kl is not None:
                    total = total + cfg.indexer_kl_weight * kl / self.accum
            total.backward()
            loads = expert_loads(self.moes, keep)
            step_loads = loads if step_loads is None else [a + b for a, b in zip(step_loads, loads)]
            sums["lm"] += float(lm_sum.detach())
            sums["mtp"] += float(mtp.detach() if torch.is_tensor(mtp) else mtp) / self.world_size  # all-reduced below
            sums["mtp_correct"] += mtp_correct
            sums["mtp_counted"] += mtp_counted
            sums["aux"] += float(aux.detach()) / self.accum
            sums["kl"] += float(kl.detach()) / self.accum if kl is not None else 0.0
        params = [p for p in self.inner.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        factor = lr_factor(self.step, cfg.steps, cfg.schedule, cfg.warmup, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_loads = all_reduce_loads(step_loads)
        if not warmup_stage:
            update_router_bias(self.moes, step_loads, cfg.bias_update_speed)
        self.step += 1
        lm, mtp, mtp_correct, mtp_counted, aux, kl = all_reduce_sum(
            [sums["lm"], sums["mtp"], sums["mtp_correct"], sums["mtp_counted"], sums["aux"], sums["kl"]])
        n = self.world_size
        lm_loss = lm / global_targets
        record = {"stage": cfg.stage, "step": self.step, "loss": kl / n if warmup_stage else lm_loss,
                  "lm_loss": lm_loss, "mtp_loss": mtp, "mtp_acc": mtp_correct / mtp_counted if mtp_counted else None, "aux_loss": aux / n,
                  "indexer_kl": kl / n if kl else None, "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": float(grad_norm), "targets": int(global_targets), "step_tokens": int(step_tokens),
                  "expert_load": [load.tolist() for load in step_loads],
                  "expert_imbalance": [imbalance(load) for load in step_loads]}
        return record

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if resume and not self.resume() and self.rank == 0:
            print(f"[train] --resume: no checkpoint in {self.ckpt_dir}; starting {cfg.stage} from step 0", flush=True)
        self._drop_metrics_after_step()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        tokens_per_step = cfg.batch_size * self.batches.rows.seq_len
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, unit="step", dynamic_ncols=True)
        if self.probe is not None and self.step == 0:
            self.probe_start = self.score(self.probe)
        governor = ThreadGovernor() if cfg.adaptive_threads and torch.get_num_threads() > 1 else None
        started = time.perf_counter()
        first = last = None
        stopped_early = False
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            record = self.train_step()
            elapsed = time.perf_counter() - t0
            record["tokens_per_s"] = record["step_tokens"] / elapsed  # real tokens: padding excluded
            record["step_time_s"] = elapsed
            record["threads"] = torch.get_num_threads()
            if governor is not None:
                governor.after_step(elapsed)
            record["tokens"] = self.step * tokens_per_step
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"{cfg.stage} step {self.step}: loss is {record['loss']}")
            first = first or record
            last = record
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == 1):
                with open(self.metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
            over_time = cfg.max_minutes > 0 and (time.perf_counter() - started) > cfg.max_minutes * 60
            if is_distributed():
                (over_time,) = all_reduce_sum([float(over_time)])
            if over_time and self.step < cfg.steps:
                stopped_early = True
                break
        if bar is not None:
            bar.close()
        if governor is not None:
            governor.restore()
        seconds = time.perf_counter() - started
        probe_end = self.score(self.probe) if self.probe is not None else None
        self.save()
        return {"stage": cfg.stage, "steps": self.step, "first": first, "last": last, "stopped_early": stopped_early,
                "seconds": seconds, "probe_start": self.probe_start, "probe_end": probe_end}

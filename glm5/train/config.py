"""One training stage's settings, and the names the trainer and `glm5 train` share. No torch here: the CLI
builds its parser from these names (and `glm5 --help` runs) without loading torch.

    from glm5.train.config import TrainConfig
    config = TrainConfig(stage="sft", steps=200, lr=1e-3)
    config = TrainConfig.from_args(parsed_args)        # glm5 train: the flags are named after the fields
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# DeepSeek-V3.2's DSA recipe after MLA pretraining, then SFT (glm5/train/trainer.py says what each does)
STAGES = ("pretrain", "dsa-warmup", "dsa-sparse", "sft")
OPTIMIZERS = ("adamw", "muon")  # glm5/train/optim.py
SCHEDULES = ("cosine", "wsd", "constant")  # glm5/train/optim.py
PARALLEL_MODES = ("none", "ddp", "fsdp")  # glm5/train/parallel.py
DTYPES = ("float32", "bfloat16")  # compute dtypes: fp32, or bf16 autocast of the forward


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    steps: int = 100
    batch_size: int = 8  # global rows per optimizer step (all processes, all micro-batches)
    micro_batch_size: int = 0  # rows per forward on one process; 0: batch_size / processes (no accumulation)
    lr: float = 3e-3  # AdamW
    muon_lr: float = 0.02
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"  # "bfloat16": autocast the forward (weights and optimizer stay fp32)
    mtp_weight: float = 0.3
    aux_loss_weight: float = 1e-4  # the sequence-wise balance loss (alpha)
    bias_update_speed: float = 1e-3  # aux-loss-free balancing (gamma)
    indexer_kl_weight: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    parallel: str = "none"
    max_minutes: float = 0.0  # stop early once the stage has run this long (0: no limit)
    progress: bool = True
    adaptive_threads: bool = False  # ThreadGovernor: one thread while other processes load the CPU
    probe_threads: int = 0  # torch threads while scoring the probe rows (0: as training)

    @classmethod
    def from_args(cls, args, **overrides) -> TrainConfig:
        """The config from parsed command-line flags: every field whose name is an attribute of `args` (the
        flags are named after the fields: --batch-size -> batch_size), then `overrides`; the rest keep their
        defaults. One place maps flags to fields, so a new field needs only its flag."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: must be one of {STAGES}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("micro_batch_size", "save_every", "warmup", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1] (below 0 the learning rate turns negative)")
        for name in ("lr", "muon_lr", "weight_decay", "mtp_weight", "aux_loss_weight", "bias_update_speed", "max_minutes"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: must be one of {SCHEDULES}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r}: must be one of {PARALLEL_MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: must be one of {DTYPES}")

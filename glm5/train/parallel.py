"""Data parallelism applied from outside the single-device model: DDP or FSDP2, gloo on CPU, nccl on CUDA.

    torchrun --nproc_per_node 2 -m glm5.cli train pretrain --parallel ddp ...
    device = training_device("auto")           # cuda:LOCAL_RANK under torchrun on GPUs, else mps / cpu
    world = init_distributed(device)           # (rank, world_size); (0, 1) when not under torchrun
    model = parallelize(model, "fsdp")         # FSDP2: each decoder layer and MTP layer sharded, then the root
    inner = unwrap(model)                      # the GLM5ForCausalLM inside (for switches and saving)

Each process takes its slice of every global batch (glm5.train.data.Batches); gradients are averaged by DDP
(all-reduce) or FSDP2 (reduce-scatter), so with the loss normalized by the step's global target count a
run on N processes follows the single-process run to rounding.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from glm5.train.config import PARALLEL_MODES


def training_device(name: str | None = None) -> torch.device:
    """The device this process trains on: `name` (cpu / cuda / mps; None or "auto": the best available). Under
    torchrun a CUDA process takes its own GPU, cuda:LOCAL_RANK."""
    from glm5.common import pick_device

    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun set up (env RANK / WORLD_SIZE): nccl when training on CUDA, gloo
    otherwise; (0, 1) without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def parallelize(model: nn.Module, mode: str) -> nn.Module:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel={mode!r}: must be one of {PARALLEL_MODES}")
    if mode == "none" or not is_distributed():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a stage may run modules whose parameters get no gradient (MTP off, say)
        return DistributedDataParallel(model, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for layer in list(model.model.layers) + list(model.mtp):
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "model") else model


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum scalars over processes (a no-op in a single process)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def load_full_state(model: nn.Module, model_state: dict, optimizers, optimizer_state) -> None:
    """Load an unsharded model state and optimizer state (what rank 0 saved) into an FSDP2-wrapped `model` (each
    rank takes its shards through torch.distributed.checkpoint's full-state API) and `optimizers` (one optimizer
    or a list, with the matching state). FSDP2 models only: a plain model takes its state with load_state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)

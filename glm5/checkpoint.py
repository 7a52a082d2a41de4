"""Hugging Face checkpoints: safetensors in transformers' key names, streamed in, written atomically.

    from glm5 import GLM5ForCausalLM
    model = GLM5ForCausalLM.from_pretrained("dir")   # ours, or transformers' GlmMoeDsaForCausalLM.save_pretrained
    model.save_pretrained("out")                      # transformers loads it; MTP written as layer num_hidden_layers

On disk (the hub layout) routed experts are per-expert keys `...mlp.experts.{e}.{gate,up,down}_proj.weight`;
in memory they are fused (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). Both layouts load. The MTP layer
`mtp.{j}.*` is `model.layers.{num_hidden_layers + j}.*` on disk, with `shared_head.head.weight` (a copy of
lm_head, as the official checkpoint stores it); an MTP `embed_tokens` / `shared_head.head` found on load is
skipped, since both are shared with the main model.

Loading builds the model on the meta device, allocates it once, and copies tensors in one at a time from
memory-mapped safetensors files, so the weights never exist twice. Errors name the key and both shapes; a
truncated or corrupt file is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator

import torch

from glm5.config import GLM5Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, mis-shaped or corrupt tensors, broken index."""


# ---------------------------------------------------------------------------------------------- files
def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory, from its index if it has one."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "is a file, not a checkpoint directory" if os.path.isfile(directory) else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {directory} {what}")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(directory, name)):
                raise CheckpointError(f"{index_path} lists {name}, which is missing from {directory}")
        return [os.path.join(directory, name) for name in files]
    if os.path.exists(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory}")
    return [os.path.join(directory, f) for f in files]


def checkpoint_keys(directory: str | os.PathLike) -> list[str]:
    """Every tensor key of a checkpoint, read from the index or the file headers (no tensor is loaded)."""
    from safetensors import safe_open

    keys = []
    for path in checkpoint_files(directory):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys.extend(f.keys())
        except Exception as err:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    return keys


def iter_checkpoint_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for every tensor of a checkpoint, one at a time (safetensors mmap)."""
    from safetensors import safe_open

    for path in checkpoint_files(directory):
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for bad headers / short files
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
        with handle as f:
            for key in f.keys():
                try:
                    tensor = f.get_tensor(key)
                except Exception as err:
                    raise CheckpointError(f"{path}: cannot read tensor {key!r}, file corrupt or truncated ({err})") from err
                yield key, tensor


# ---------------------------------------------------------------------------------------------- key mapping
def route_hub_key(key: str, cfg: GLM5Config) -> tuple[str, tuple | None] | None:
    """Map a hub key to (our parameter name, slice spec) or None for a tensor we deliberately skip.

    slice spec: None (whole tensor) or (expert, part) with part in gate / up / down.
    Raises KeyError for a key the model does not have.
    """
    L = cfg.num_hidden_layers
    m = _EXPERT_KEY.match(key)
    if m:
        layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"model.layers.{layer}" if layer < L else f"mtp.{layer - L}"
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        return f"{prefix}.mlp.experts.{fused}", (expert, proj)
    m = _LAYER_KEY.match(key)
    if m and int(m.group(1)) >= L:
        depth, rest = int(m.group(1)) - L, m.group(2)
        if depth >= cfg.num_nextn_predict_layers:
            raise KeyError(key)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # shared with the main model
        return f"mtp.{depth}.{rest}", None
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    return key, None


def _expert_slice(param: torch.Tensor, spec: tuple, cfg: GLM5Config) -> torch.Tensor:
    expert, proj = spec
    if expert >= param.shape[0]:
        raise KeyError(expert)
    inter = cfg.moe_intermediate_size
    if proj == "gate_proj":
        return param[expert, :inter]
    if proj == "up_proj":
        return param[expert, inter:]
    return param[expert]


def hub_state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) pairs of a model in the layout transformers writes (per-expert keys, MTP as a layer)."""
    cfg: GLM5Config = model.config
    L = cfg.num_hidden_layers
    inter = cfg.moe_intermediate_size
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hub = name
        if name.startswith("mtp."):
            depth, rest = name[4:].split(".", 1)
            hub = f"model.layers.{L + int(depth)}.{rest}"
        if hub.endswith(".mlp.experts.gate_up_proj"):
            base = hub[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                yield f"{base}{e}.gate_proj.weight", tensor[e, :inter]
                yield f"{base}{e}.up_proj.weight", tensor[e, inter:]
        elif hub.endswith(".mlp.experts.down_proj"):
            base = hub[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{base}{e}.down_proj.weight", tensor[e]
        else:
            yield hub, tensor
    for depth in range(len(getattr(model, "mtp", []))):
        yield f"model.layers.{L + depth}.shared_head.head.weight", state["lm_head.weight"]


# ---------------------------------------------------------------------------------------------- load
def load_state_into(model: torch.nn.Module, directory: str | os.PathLike, strict: bool = True) -> list[str]:
    """Copy every tensor of a checkpoint into `model` in place. Returns the keys that were skipped as unexpected
    (only with strict=False). Raises CheckpointError for missing / mis-shaped / unexpected tensors."""
    return load_hub_tensors(model, iter_checkpoint_tensors(directory), directory, strict=strict)


def load_hub_tensors(model: torch.nn.Module, items: Iterable[tuple[str, torch.Tensor]], source: str | os.PathLike,
                     strict: bool = True) -> list[str]:
    """`load_state_into` for (hub key, tensor) pairs from anywhere (`source` names them in errors)."""
    directory = source
    cfg: GLM5Config = model.config
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    filled: dict[str, int] = {}
    unexpected: list[str] = []
    for key, tensor in items:
        if tensor.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) or key.endswith(
            "weight_scale_inv"
        ):
            raise CheckpointError(
                f"{directory}: tensor {key!r} is FP8-quantized; load FP8 checkpoints with glm5.quant (see README)"
            )
        try:
            routed = route_hub_key(key, cfg)
        except KeyError:
            routed = ("<unexpected>", None)
        if routed is None:
            continue
        name, spec = routed
        if name not in targets:
            unexpected.append(key)
            continue
        target = targets[name]
        if spec is not None:
            try:
                target = _expert_slice(target, spec, cfg)
            except KeyError:
                unexpected.append(key)
                continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        filled[name] = filled.get(name, 0) + (target.numel())
    if unexpected and strict:
        shown = ", ".join(unexpected[:8]) + (f" … (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{directory}: {len(unexpected)} tensors the model does not have: {shown}")
    non_persistent = {n for n, _ in model.named_buffers() if n.endswith("inv_freq")}
    missing = [
        f"{n} {tuple(t.shape)}"
        for n, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
        if n not in non_persistent and filled.get(n, 0) != t.numel()
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" … (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{directory}: {len(missing)} tensors missing from the checkpoint: {shown}")
    return unexpected


def empty_model_for(directory, cls=None, *, device="cpu", dtype=None, attn_impl="sparse", prepare=None):
    """The model a checkpoint directory describes, allocated once on `device` with uninitialized weights.

    Built on the meta device from directory/config.json; an MTP layer absent from the checkpoint (transformers
    writes none) is dropped with a warning. `prepare(model, keys)` may swap modules while still on meta (the
    FP8 loader puts its FP8 modules in). Returns (model, keys of the checkpoint).
    """
    from glm5.common import to_dtype
    from glm5.model.layers import RotaryEmbedding

    if cls is None:
        from glm5.model.transformer import GLM5ForCausalLM as cls
    cfg = GLM5Config.from_pretrained(directory)
    dtype = to_dtype(dtype or cfg.torch_dtype)
    keys = checkpoint_keys(directory)  # fails early on an empty directory, a broken index or a bad header
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in keys):
        # transformers does not model MTP and writes no MTP layer: load the main model without one
        warnings.warn(f"{directory}: no MTP layer in the checkpoint; loading without MTP", stacklevel=3)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = cls(cfg, attn_impl=attn_impl).to(dtype)
        if prepare is not None:
            prepare(model, keys)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives every module a tensor of its own: tie the head again
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # non-persistent: recompute what to_empty left uninitialized
            module.reset()
    return model, keys


def load_pretrained(cls, directory, *, device="cpu", dtype=None, attn_impl="sparse", strict=True):
    """Build `cls` from directory/config.json on the meta device, allocate once on `device`, stream weights in."""
    model, _ = empty_model_for(directory, cls, device=device, dtype=dtype, attn_impl=attn_impl)
    load_state_into(model, directory, strict=strict)
    return model.eval()


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, *, max_shard_size: int = 2 << 30,
                    items: Iterable[tuple[str, torch.Tensor]] | None = None) -> str:
    """Write config.json and sharded safetensors (+ index) to `directory`, atomically: everything is written
    to a temporary folder beside it first; files of an earlier save that the new one does not have are removed.
    `items` (hub key, tensor) replaces `hub_state_items(model)` (the low-bit formats name their packed parts)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".glm5-save-", dir=parent)
    try:
        dtype = next(model.parameters()).dtype
        cfg = model.config.replace(torch_dtype=str(dtype).replace("torch.", ""))
        cfg.save_pretrained(tmp)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in (hub_state_items(model) if items is None else items):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        weight_map, total = {}, 0
        n = len(shards)
        for i, shard in enumerate(shards, start=1):
            name = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            # contiguous copies: views of fused experts, and lm_head repeated as the MTP head, can't share storage
            tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in shard.items()}
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
            del tensors
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
        new_files = set(os.listdir(tmp))
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):  # stale shards / index of an earlier save
            if (name.endswith(".safetensors") or name == INDEX_FILE) and name not in new_files:
                os.remove(os.path.join(directory, name))
        for name in new_files:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------- transformers
def to_transformers_config(cfg: GLM5Config, attn_implementation: str = "sdpa"):
    """The equivalent `transformers.GlmMoeDsaConfig` (needs transformers 5.x installed: tests and benchmarks)."""
    from transformers import GlmMoeDsaConfig

    data = cfg.to_dict()
    for key in ("model_type", "architectures", "qk_head_dim", "head_dim", "layer_types", "dtype", "torch_dtype"):
        data.pop(key, None)
    data.pop("rope_scaling", None)
    tcfg = GlmMoeDsaConfig(**data)
    tcfg._attn_implementation = attn_implementation
    return tcfg

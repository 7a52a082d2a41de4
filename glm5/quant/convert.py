"""A Hugging Face checkpoint directory to its block-wise FP8 twin, in the layout of GLM-5-FP8.

    glm5 quantize fp8 IN_DIR OUT_DIR
    from glm5.quant.convert import quantize_checkpoint_fp8; quantize_checkpoint_fp8("in/", "out/")

Streams tensor by tensor (safetensors mmap): at most one input tensor and one output shard are in memory, so a
744B checkpoint converts on a machine with a few GB of RAM. Every 2-D `*.weight` of a module that
`should_quantize` accepts becomes float8_e4m3fn plus an fp32 `*.weight_scale_inv` [⌈out/128⌉, ⌈in/128⌉]; every
other tensor (embeddings, lm_head, norms, router, indexer weights_proj, MTP eh_proj, biases) is copied as it is.
config.json gains `quantization_config`; the other small files (tokenizer, generation config) are copied.
The output is written to a temporary directory beside OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from glm5.quant.fp8 import MODULES_TO_NOT_CONVERT, quantization_config, should_quantize

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def iter_tensors(directory: str) -> Iterator[tuple[str, object]]:
    """(key, tensor) for every tensor of the checkpoint, one at a time, memory-mapped."""
    from glm5.checkpoint import iter_checkpoint_tensors  # CheckpointError naming the file for a bad index / shard

    yield from iter_checkpoint_tensors(directory)


def quantize_tensor_entry(key: str, tensor, modules_to_not_convert: list[str]) -> list[tuple[str, object]]:
    """One checkpoint tensor -> the tensors it becomes in the FP8 checkpoint (itself, or weight + weight_scale_inv)."""
    import torch

    from glm5.quant.fp8 import FP8_DTYPE, quantize_fp8_blockwise

    module_name = key.removesuffix(".weight")
    if (key.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point() and tensor.dtype != FP8_DTYPE
            and should_quantize(module_name, modules_to_not_convert)):
        try:
            weight_fp8, scale_inv = quantize_fp8_blockwise(tensor)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
        return [(key, weight_fp8), (module_name + ".weight_scale_inv", scale_inv.to(torch.float32))]
    return [(key, tensor.contiguous())]


def quantize_checkpoint_fp8(
    in_dir: str,
    out_dir: str,
    modules_to_not_convert: list[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the FP8 twin of `in_dir` to `out_dir`; return a summary (counts and bytes before / after)."""
    from safetensors.torch import save_file

    from glm5.config import GLM5Config

    in_dir, out_dir = os.path.abspath(in_dir), os.path.abspath(out_dir)
    config_path = os.path.join(in_dir, "config.json")
    if not os.path.isdir(in_dir) or not os.path.exists(config_path):
        raise FileNotFoundError(f"{in_dir}: not a checkpoint directory (no config.json)")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except ValueError as err:  # bad JSON or not UTF-8
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: a config.json must hold a JSON object")
    try:  # a config the model cannot be built from is refused before anything is written
        GLM5Config.from_dict(dict(config))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{in_dir}: already quantized (quantization_config.quant_method={method!r})")
    if out_dir == in_dir or os.path.commonpath([in_dir, out_dir]) == out_dir:
        raise ValueError(f"OUT_DIR {out_dir} is IN_DIR or holds it; replacing it would delete the input")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not empty (--overwrite replaces it)")
    skip = list(MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    summary = {"quantized_tensors": 0, "kept_tensors": 0, "bytes_in": 0, "bytes_out": 0, "shards": 0}
    try:
        weight_map: dict[str, str] = {}
        shard: dict[str, object] = {}
        shard_bytes = 0
        shard_names: list[str] = []

        def flush() -> None:
            nonlocal shard, shard_bytes
            if not shard:
                return
            name = f"part-{len(shard_names):05d}.safetensors"
            save_file(shard, os.path.join(tmp_dir, name), metadata={"format": "pt"})
            for key in shard:
                weight_map[key] = name
            shard_names.append(name)
            shard, shard_bytes = {}, 0
            if log:
                log(f"  shard {len(shard_names)} written: {summary['quantized_tensors']} weights to FP8, "
                    f"{summary['kept_tensors']} kept, {summary['bytes_in'] / 1e9:.2f} GB read so far")

        for key, tensor in iter_tensors(in_dir):
            summary["bytes_in"] += tensor.numel() * tensor.element_size()
            entries = quantize_tensor_entry(key, tensor, skip)
            summary["quantized_tensors" if len(entries) == 2 else "kept_tensors"] += 1
            size = sum(t.numel() * t.element_size() for _, t in entries)
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            for out_key, out_tensor in entries:
                shard[out_key] = out_tensor
            shard_bytes += size
            summary["bytes_out"] += size
        flush()

        # rename part-i to the hub's model-0000i-of-0000N names now that N is known
        total = len(shard_names)
        final = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(shard_names)}
        for old, new in final.items():
            os.rename(os.path.join(tmp_dir, old), os.path.join(tmp_dir, new))
        index = {"metadata": {"total_size": summary["bytes_out"]},
                 "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        with open(os.path.join(tmp_dir, INDEX_NAME), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
            fh.write("\n")
        config["quantization_config"] = quantization_config(skip)
        with open(os.path.join(tmp_dir, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
        for name in os.listdir(in_dir):  # tokenizer files, generation_config.json, README ...
            src = os.path.join(in_dir, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (INDEX_NAME, "config.json"):
                shutil.copy2(src, os.path.join(tmp_dir, name))
        summary["shards"] = total
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out_dir, 0o777 & ~umask)  # mkdtemp made it 0700: give it the mode a plain mkdir would
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if log:
        log(f"{in_dir} -> {out_dir}: {summary['quantized_tensors']} weights to FP8, {summary['kept_tensors']} kept, "
            f"{summary['bytes_in'] / 1e9:.3f} GB -> {summary['bytes_out'] / 1e9:.3f} GB in {summary['shards']} shard(s)")
    return summary

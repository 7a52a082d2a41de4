"""A checkpoint directory to its low-bit twin: int4 (RTN or GPTQ), the q2 mix, or ternary.

    glm5 quantize int4 SRC DST --method gptq        # calibration on the demo corpus, then GPTQ
    glm5 quantize q2 SRC DST --avg-bits 2.56
    glm5 quantize ternary SRC DST
    from glm5.quant.lowbit_convert import quantize_checkpoint_lowbit
    quantize_checkpoint_lowbit("runs/demo/model", "out-int4", "int4", method="gptq")

Unquantized tensors are written in bf16. The model is loaded whole (low-bit formats need calibration forwards; the FP8 converter, which needs none,
streams instead), quantized in memory and written with `save_quantized` (a temporary folder, then moved into
place). Tokenizer files beside the weights are copied. `load_quantized_model(DST)` or any loader that goes
through `glm5.quant.load.load_any_checkpoint` (the engine, `glm5 serve --model`) reads it back.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

FORMATS = {"int4": "glm5-int4", "q2": "glm5-q2mix", "ternary": "glm5-ternary"}


def quantize_checkpoint_lowbit(src: str, dst: str, fmt: str, *, method: str = "rtn", avg_bits: float = 2.56,
                               symmetric: bool = False, calib_rows: int = 16, calib_seq_len: int = 256,
                               overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Write the `fmt` ("int4" | "q2" | "ternary") twin of checkpoint `src` to `dst`; return its quantization_config."""
    import torch

    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.quant.calibrate import allocate_bits, calibration_rows, collect_hessians
    from glm5.quant.lowbit_model import quantize_model_lowbit, save_quantized, tensor_units
    from glm5.tokenizer import Tokenizer, default_tokenizer

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"--method {method!r}: expected rtn or gptq")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src}: not a checkpoint directory (no config.json)")
    qcfg = GLM5Config.from_pretrained(src).extra.get("quantization_config")
    if qcfg:
        raise ValueError(f"{src}: already quantized (quantization_config.quant_method={qcfg.get('quant_method')!r})")
    if dst == src or os.path.commonpath([src, dst]) == dst:
        raise ValueError(f"DST {dst} is SRC or holds it; replacing it would delete the input")
    if os.path.exists(dst) and (not os.path.isdir(dst) or (os.listdir(dst) and not overwrite)):
        raise ValueError(f"{dst}: exists and is not an empty directory (--overwrite replaces it)")
    if fmt == "q2":
        from glm5.quant.lowbit import bits_per_weight

        lowest = bits_per_weight(2, symmetric=symmetric)
        if not lowest <= avg_bits:
            raise ValueError(f"--avg-bits {avg_bits}: below the smallest width's {lowest:.4f} stored bits per weight "
                             "(2 bits + scales)")
    if calib_rows < 1 or calib_seq_len < 2:
        raise ValueError(f"calibration needs --calib-rows >= 1 and --calib-seq-len >= 2, got {calib_rows}, {calib_seq_len}")
    start = time.time()
    model = GLM5ForCausalLM.from_pretrained(src, dtype=torch.float32)
    hessians = None
    needs_calibration = fmt == "q2" or method == "gptq"
    if needs_calibration:
        has_tok = os.path.isfile(os.path.join(src, "tokenizer.json"))
        tokenizer = Tokenizer.from_pretrained(src) if has_tok else default_tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{src}: the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
        seq_len = min(calib_seq_len, model.config.max_position_embeddings)
        rows = calibration_rows(tokenizer, calib_rows, seq_len)
        if log:
            log(f"calibration: {rows.shape[0]} x {rows.shape[1]} tokens of the demo corpus")
        hessians = collect_hessians(model, rows)
    tensor_bits = None
    if fmt == "q2":
        tensor_bits = allocate_bits(tensor_units(model), hessians, avg_bits)
    quantize_model_lowbit(model, FORMATS[fmt], method=method if fmt != "ternary" else "rtn", bits=4,
                          tensor_bits=tensor_bits, hessians=hessians if method == "gptq" else None,
                          symmetric=symmetric, log=log)
    # what stays unquantized (embeddings, heads, norms, router) is written in bf16, as every low-bit format
    # and `glm5 plan` assume; packed buffers and scales keep their dtypes (the modules refuse the cast)
    model = model.to(torch.bfloat16)
    tmp = dst + ".tmp-quantize"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_quantized(model, tmp)
        for name in os.listdir(src):  # tokenizer, generation config …
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(".safetensors") and name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(path, os.path.join(tmp, name))
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out_cfg = model.config.extra["quantization_config"]
    if log:
        size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".safetensors"))
        in_size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        log(f"{src} -> {dst}: {out_cfg['quant_method']} ({out_cfg['method']}), {out_cfg['avg_bits']} bits per quantized "
            f"weight, {in_size / 1e6:.2f} MB -> {size / 1e6:.2f} MB in {time.time() - start:.0f} s")
    return out_cfg

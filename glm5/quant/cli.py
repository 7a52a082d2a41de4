"""`glm5 quantize`: write a quantized twin of a checkpoint directory.

    glm5 quantize fp8 IN_DIR OUT_DIR                 # block-wise FP8 (e4m3, 128×128, fp32 weight_scale_inv)
    glm5 quantize fp8 IN_DIR OUT_DIR --keep-bf16 lm_head model.embed_tokens mlp.gate
    glm5 quantize int4 IN_DIR OUT_DIR --method gptq  # 4-bit groups of 128, GPTQ-calibrated on the demo corpus
    glm5 quantize q2 IN_DIR OUT_DIR --avg-bits 2.56  # per-tensor widths from {2, 3, 4, 8} under a bit budget
    glm5 quantize ternary IN_DIR OUT_DIR             # {-1, 0, +1} x absmean scale (BitNet b1.58)

FP8 output loads with `glm5.quant.fp8.load_fp8_model(OUT_DIR)` and with transformers (see README); every
format loads with `glm5.quant.load.load_any_checkpoint(OUT_DIR)`, which the engine and `glm5 serve` use.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="write a quantized copy of a checkpoint directory",
                                   description=__doc__.split("\n\n")[0])
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    fp8 = formats.add_parser("fp8", help="block-wise FP8 in the layout of GLM-5-FP8 / DeepSeek-V3",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fp8.add_argument("in_dir", metavar="IN_DIR", help="a Hugging Face checkpoint directory (config.json + safetensors)")
    fp8.add_argument("out_dir", metavar="OUT_DIR", help="where to write the FP8 checkpoint (must not exist or be empty)")
    fp8.add_argument("--keep-bf16", nargs="+", default=None, metavar="MODULE",
                     help="modules to leave unquantized, matched as name suffixes "
                          "(default: glm5.quant.fp8.MODULES_TO_NOT_CONVERT)")
    fp8.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard in GB (default 5)")
    fp8.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")
    fp8.set_defaults(func=run_fp8)
    helps = {"int4": "4-bit groups of 128 inputs, round-to-nearest or GPTQ (glm5-int4)",
             "q2": "a 2-bit mix: per-tensor widths from {2, 3, 4, 8} chosen on calibration data (glm5-q2mix)",
             "ternary": "{-1, 0, +1} x one absmean scale per matrix, BitNet b1.58 (glm5-ternary)"}
    for name, text in helps.items():
        p = formats.add_parser(name, help=text, description=text)
        p.add_argument("in_dir", metavar="SRC", help="an unquantized checkpoint directory (config.json + safetensors)")
        p.add_argument("out_dir", metavar="DST", help="where to write (must not exist or be empty)")
        if name != "ternary":
            p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                           help="round-to-nearest, or GPTQ with calibration on the demo corpus (default rtn)")
            p.add_argument("--symmetric", action="store_true", help="no zero points (default: asymmetric groups)")
        if name == "q2":
            p.add_argument("--avg-bits", type=float, default=2.56,
                           help="stored bits per quantized weight, scales included (default 2.56, glm5 plan's)")
        p.add_argument("--calib-rows", type=int, default=16, help="calibration rows (default 16)")
        p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration row (default 256)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it holds files")
        p.set_defaults(func=run_lowbit, format=name)
    parser.set_defaults(func=lambda args: missing_format(parser))


def missing_format(parser) -> int:
    """A command group called without its format: its help, exit 2 (argparse's usage code)."""
    parser.print_help()
    return 2


def run_fp8(args) -> int:
    from glm5.quant.convert import quantize_checkpoint_fp8

    if not 0 < args.max_shard_gb < float("inf"):  # also refuses nan
        raise ValueError(f"--max-shard-gb {args.max_shard_gb}: must be a finite number > 0")
    quantize_checkpoint_fp8(args.in_dir, args.out_dir, modules_to_not_convert=args.keep_bf16,
                            max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite, log=print)
    return 0


def run_lowbit(args) -> int:
    import math

    from glm5.quant.lowbit_convert import quantize_checkpoint_lowbit

    avg_bits = getattr(args, "avg_bits", 2.56)
    if not math.isfinite(avg_bits) or avg_bits <= 0:
        raise ValueError(f"--avg-bits {avg_bits}: must be a finite number > 0")
    quantize_checkpoint_lowbit(args.in_dir, args.out_dir, args.format, method=getattr(args, "method", "rtn"),
                               avg_bits=avg_bits, symmetric=getattr(args, "symmetric", False),
                               calib_rows=args.calib_rows, calib_seq_len=args.calib_seq_len,
                               overwrite=args.overwrite, log=print)
    return 0

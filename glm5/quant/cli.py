"""`glm5 quantize`: write a quantized twin of a checkpoint directory.

    glm5 quantize fp8 IN_DIR OUT_DIR                 # block-wise FP8 (e4m3, 128×128, fp32 weight_scale_inv)
    glm5 quantize fp8 IN_DIR OUT_DIR --keep-bf16 lm_head model.embed_tokens mlp.gate

The output loads with `glm5.quant.fp8.load_fp8_model(OUT_DIR)` and with transformers (see README).
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
    parser.set_defaults(func=lambda args: _missing_format(parser))


def _missing_format(parser) -> int:
    parser.print_help()
    return 2


def run_fp8(args) -> int:
    from glm5.quant.convert import quantize_checkpoint_fp8

    if not 0 < args.max_shard_gb < float("inf"):  # also refuses nan
        raise ValueError(f"--max-shard-gb {args.max_shard_gb}: must be a finite number > 0")
    quantize_checkpoint_fp8(args.in_dir, args.out_dir, modules_to_not_convert=args.keep_bf16,
                            max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite, log=print)
    return 0

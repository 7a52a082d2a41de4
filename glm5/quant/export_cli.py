"""`glm5 export`: hand a checkpoint to another runtime's file format.

    glm5 export gguf runs/latest/model model.gguf                 # llama.cpp (glm-dsa), f32
    glm5 export gguf runs/latest/model model-q4.gguf --type q4_k  # f16 | bf16 | q8_0 | q4_k | q2_k

The GGUF file embeds the tokenizer and chat template; llama.cpp (or llama-cpp-python) runs it as is.
"""

from __future__ import annotations

import argparse

from glm5.quant.cli import missing_format


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a checkpoint in another runtime's format (GGUF)",
                                   description=__doc__.split("\n\n")[0])
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    gguf = formats.add_parser("gguf", help="a GGUF file for llama.cpp's glm-dsa architecture",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gguf.add_argument("model_dir", metavar="MODEL_DIR", help="a checkpoint directory (config.json + safetensors "
                                                             "+ tokenizer.json), e.g. runs/latest/model")
    gguf.add_argument("out", metavar="OUT.gguf", help="the file to write (written beside it, then renamed)")
    gguf.add_argument("--type", dest="out_type", default="f32",
                      choices=("f32", "f16", "bf16", "q8_0", "q4_k", "q2_k"),
                      help="tensor type of the matrices (norms, biases and the router stay f32; default f32)")
    gguf.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="folder with the tokenizer.json to embed (default: MODEL_DIR)")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    gguf.set_defaults(func=run_gguf)
    parser.set_defaults(func=lambda args: missing_format(parser))


def run_gguf(args) -> int:
    from glm5.quant.gguf import export_gguf

    export_gguf(args.model_dir, args.out, out_type=args.out_type, tokenizer_dir=args.tokenizer,
                overwrite=args.overwrite, log=print)
    return 0

"""`glm5 serve`: the OpenAI-compatible server on one model.

    glm5 serve --preset nano --port 8000              # random weights + the default tokenizer, nothing else needed
    glm5 serve --model runs/demo/model --port 8000    # config.json + safetensors (+ tokenizer.json if present)

Binds to 127.0.0.1 unless --host says otherwise. Heavy imports happen inside the command, not at import.
"""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from glm5.cli import int_at_least

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (config.json + safetensors, tokenizer.json optional)")
    source.add_argument("--preset", default=None, help="serve random weights of a preset (e.g. nano); default nano")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: preset or dir name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--device", default=None, help="cpu / cuda / mps (default: best available)")
    parser.add_argument("--max-num-seqs", type=int_at_least(1), default=32, help="sequences in the running batch at most")
    parser.add_argument("--max-num-batched-tokens", type=int_at_least(1), default=512, help="tokens per prefill step (chunking)")
    parser.add_argument("--kv-cache-tokens", type=int_at_least(1), default=32768, help="latent KV cache size in tokens")
    parser.add_argument("--block-size", type=int_at_least(1), default=16, help="tokens per KV cache block")
    parser.add_argument("--max-model-len", type=int_at_least(1), default=None, help="context length (default: the model's)")
    parser.add_argument("--speculative-tokens", type=int_at_least(0), default=0, help="MTP draft tokens per step (0: off)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads for the engine")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs (on CUDA, steps of few tokens are replayed from captured graphs by default)")


def register(subparsers) -> None:
    from glm5.cli import int_at_least

    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int_at_least(0, 65535), default=8000, help="port to bind (0-65535)")
    parser.add_argument("--default-max-tokens", type=int_at_least(1), default=256, help="max_tokens when a request gives none")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn log level (default warning)")
    parser.set_defaults(func=_serve)


def build_server(args):
    """(AsyncEngine, tokenizer, ServerConfig) from parsed arguments; the engine thread is started."""
    import os

    import torch

    from glm5.common import pick_device
    from glm5.config import GLM5Config
    from glm5.engine import LLMEngine
    from glm5.model import GLM5ForCausalLM
    from glm5.serve.app import ServerConfig
    from glm5.serve.async_engine import AsyncEngine
    from glm5.tokenizer import Tokenizer, default_tokenizer

    device = str(pick_device(args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model:
        from glm5.quant.load import load_any_checkpoint  # bf16, FP8 or low-bit, by its quantization_config

        model = load_any_checkpoint(args.model, device=device, dtype=dtype)
        has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer.json"))
        tokenizer = Tokenizer.from_pretrained(args.model) if has_tokenizer else default_tokenizer()
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    else:
        preset = args.preset or "nano"
        torch.manual_seed(args.seed)
        model = GLM5ForCausalLM(GLM5Config.from_preset(preset)).to(device)
        if dtype is not None:
            model = model.to(dtype)
        tokenizer = default_tokenizer()
        name = args.served_model_name or preset
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    engine = LLMEngine(
        model, block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_speculative_tokens=args.speculative_tokens, eos_token_ids=tokenizer.eos_token_ids,
        cuda_graphs=False if getattr(args, "enforce_eager", False) else None,
    )
    config = ServerConfig(model_name=name, default_max_tokens=getattr(args, "default_max_tokens", 256))
    return AsyncEngine(engine, num_threads=args.threads).start(), tokenizer, config


def listen(host: str, port: int):
    """The server's listening socket, bound first: a busy port is reported at once, not after loading the model,
    and never announced as served. TCP_NODELAY is set on it: create_server's socket has proto 0, so asyncio never
    sets it on what it accepts (which inherits it here), and a streamed first chunk would wait ~40 ms for a
    delayed ACK (bench/serve.py: TTFT p50 45 -> 10 ms)."""
    import socket

    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _serve(args) -> int:
    import uvicorn

    from glm5.serve.app import create_app

    with listen(args.host, args.port) as sock:
        engine, tokenizer, config = build_server(args)
        app = create_app(engine, tokenizer, config)
        print(f"glm5 serve: model {config.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly (uvicorn.run swallows it the same way)
            pass
        finally:
            engine.shutdown()
    return 0

"""`glm5 serve`: the server on one model: OpenAI chat / completions / Responses, Anthropic Messages, a chat page at /.

    glm5 serve --preset nano --port 8000              # random weights + the default tokenizer, nothing else needed
    glm5 serve --model runs/demo/model --port 8000    # config.json + safetensors (+ tokenizer.json if present)

Binds to 127.0.0.1 unless --host says otherwise. Heavy imports happen inside the command, not at import.
"""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The model source and the engine's flags (EngineConfig.add_arguments: dest = the config's field names)."""
    from glm5.engine.config import EngineConfig

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (config.json + safetensors, tokenizer.json optional)")
    source.add_argument("--preset", default=None, help="serve random weights of a preset (e.g. nano); default nano")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: preset or dir name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset")
    EngineConfig.add_arguments(parser)


def register(subparsers) -> None:
    from glm5.cli import int_at_least

    parser = subparsers.add_parser("serve", help="HTTP server: OpenAI chat/completions/Responses, Anthropic Messages, metrics, a chat page at /")
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int_at_least(0, 65535), default=8000, help="port to bind (0-65535)")
    parser.add_argument("--default-max-tokens", type=int_at_least(1), default=256, help="max_tokens when a request gives none")
    parser.add_argument("--responses-store-items", type=int_at_least(0), default=1024,
                        help="Responses API: stored responses kept for previous_response_id (LRU; default 1024)")
    parser.add_argument("--responses-store-mib", type=int_at_least(1), default=64,
                        help="Responses API: their size at most in MiB (LRU; default 64)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn log level (default warning)")
    parser.set_defaults(func=_serve)


def build_server(args):
    """(AsyncEngine, tokenizer, ServerConfig) from parsed arguments; the engine thread is started."""
    import os

    import torch

    import glm5.engine
    from glm5.common import pick_device
    from glm5.config import GLM5Config
    from glm5.engine.config import EngineConfig
    from glm5.model import GLM5ForCausalLM
    from glm5.serve.async_engine import AsyncEngine
    from glm5.serve.state import ServerConfig
    from glm5.tokenizer import Tokenizer, default_tokenizer

    engine_config = EngineConfig.from_args(args)
    device = str(pick_device(engine_config.device))
    dtype = engine_config.torch_dtype()
    if args.model:
        model = GLM5ForCausalLM.from_pretrained(args.model, device=device, dtype=dtype)
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
    engine = glm5.engine.LLMEngine(model, engine_config.replace(eos_token_ids=tokenizer.eos_token_ids))
    config = ServerConfig(model_name=name, default_max_tokens=getattr(args, "default_max_tokens", 256),
                          responses_store_items=getattr(args, "responses_store_items", 1024),
                          responses_store_bytes=getattr(args, "responses_store_mib", 64) << 20)
    return AsyncEngine(engine, num_threads=engine_config.threads).start(), tokenizer, config


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

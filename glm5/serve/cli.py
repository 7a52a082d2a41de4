"""`glm5 serve`: the server on one model: OpenAI chat / completions / Responses, Anthropic Messages, a chat page at /.

    glm5 serve --preset nano --port 8000              # random weights + the default tokenizer, nothing else needed
    glm5 serve --model runs/demo/model --port 8000    # config.json + safetensors + tokenizer.json (or --tokenizer)
    glm5 serve --model ckpt-fp8/ --chat-template t.jinja   # an FP8 checkpoint (dequantized on load), a template

Binds to 127.0.0.1 unless --host says otherwise. Heavy imports happen inside the command, not at import.
"""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The model source and the engine's flags (EngineConfig.add_arguments: dest = the config's field names)."""
    from glm5.engine.config import EngineConfig

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (config.json + safetensors, bf16/fp32 or FP8; "
                                        "tokenizer.json beside it or --tokenizer)")
    source.add_argument("--preset", default=None, help="serve random weights of a preset (e.g. nano); default nano")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer.json or a folder holding one (default: --model's; with --preset the built-in one)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template to render prompts with (default: the tokenizer's own "
                             "chat_template, else GLM-5's format)")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: preset or dir name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset")
    EngineConfig.add_arguments(parser)


def register(subparsers) -> None:
    from glm5.common import int_at_least

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


def load_tokenizer(args, model_dir: str | None):
    """--tokenizer, else the checkpoint's tokenizer.json, else (random weights only) the built-in tokenizer. A
    checkpoint without one is refused: its ids are its own tokenizer's, and another would feed it other text."""
    import os

    from glm5.tokenizer import Tokenizer, default_tokenizer

    if args.tokenizer:
        return Tokenizer.from_file(args.tokenizer)
    if model_dir is None:
        return default_tokenizer()
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ValueError(f"{model_dir} has no tokenizer.json: pass --tokenizer PATH (the tokenizer.json the model was "
                         f"trained with, or its folder)")
    return Tokenizer.from_file(model_dir)


def chat_template(args, tokenizer) -> tuple[str | None, str]:
    """(the Jinja template to render prompts with, or None for the built-in GLM-5 renderer; where it came from).
    A template is tried on a short conversation first: one that cannot render is refused at start, not per request."""
    from glm5.chat import render_messages
    from glm5.chat.template import GLM5_CHAT_TEMPLATE, TemplateError, detect_chat_format, render_jinja_template

    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as fh:
                template, source = fh.read(), f"--chat-template {args.chat_template}"
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--chat-template {args.chat_template}: cannot read it ({err})") from None
    elif tokenizer.chat_template:
        template, source = tokenizer.chat_template, "the tokenizer's chat_template"
    else:
        return None, "GLM-5's format (the tokenizer has no chat_template)"
    probe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    try:
        rendered = render_jinja_template(template, probe, tools, enable_thinking=True, clear_thinking=True)
    except (TemplateError, ValueError, TypeError) as err:
        raise ValueError(f"{source} cannot render a conversation: {err}") from None
    if template.strip() == GLM5_CHAT_TEMPLATE.strip() or rendered == render_messages(probe, tools):
        return None, f"{source} (GLM-5's format: rendered by glm5.chat)"
    if detect_chat_format(template) != "glm5":
        source += " (GLM-4.5-style; replies are parsed as GLM-5's)"
    return template, source


def build_server(args):
    """(AsyncEngine, tokenizer, ServerConfig) from parsed arguments; the engine thread is started. Every check
    (tokenizer, vocabulary, chat template, memory) runs before a weight is allocated."""
    import os

    import torch

    import glm5.engine
    from glm5.common import pick_device
    from glm5.config import GLM5Config
    from glm5.engine.config import EngineConfig
    from glm5.engine.memory import check_fits_serving
    from glm5.model import GLM5ForCausalLM
    from glm5.quant.load import config_quant_method
    from glm5.serve.async_engine import AsyncEngine
    from glm5.serve.state import ServerConfig

    engine_config = EngineConfig.from_args(args)
    device = str(pick_device(engine_config.device))
    dtype = engine_config.torch_dtype()
    if args.model:
        cfg = GLM5Config.from_pretrained(args.model)
        quant = config_quant_method(cfg)
        weights_dtype = dtype or getattr(torch, cfg.torch_dtype)
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    else:
        preset = args.preset or "nano"
        cfg, quant = GLM5Config.from_preset(preset), None
        weights_dtype = dtype or torch.float32  # built in torch's default dtype
        name = args.served_model_name or preset
    tokenizer = load_tokenizer(args, args.model)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{cfg.vocab_size}: it is not this model's tokenizer")
    template, template_source = chat_template(args, tokenizer)
    check_fits_serving(cfg, engine_config, torch.empty((), dtype=weights_dtype).element_size(), device)
    if args.model and quant == "fp8":
        from glm5.quant.fp8 import load_fp8_model

        # the engine fuses and absorbs the attention weights itself, so FP8 weights are dequantized once on load
        model = load_fp8_model(args.model, device=device, dtype=dtype or torch.bfloat16, dequantize=True)
        print(f"glm5 serve: {args.model} is FP8; weights dequantized to {dtype or torch.bfloat16} on load", flush=True)
    elif args.model and quant:
        from glm5.quant.load import load_any_checkpoint  # low-bit: packed weights, dequantized where they are used

        model = load_any_checkpoint(args.model, device=device, dtype=dtype)
        print(f"glm5 serve: {args.model} is {quant}; weights stay packed", flush=True)
    elif args.model:
        model = GLM5ForCausalLM.from_pretrained(args.model, device=device, dtype=dtype)
    else:
        torch.manual_seed(args.seed)
        model = GLM5ForCausalLM(cfg).to(device)
        if dtype is not None:
            model = model.to(dtype)
    print(f"glm5 serve: chat template: {template_source}", flush=True)
    engine = glm5.engine.LLMEngine(model, engine_config.replace(eos_token_ids=tokenizer.eos_token_ids))
    if engine.compiled is not None:  # --compile: one sequence's decode steps now, larger batches on first use
        import time

        what = "decode steps and speculative cycles" if engine.num_speculative_tokens else "decode steps"
        print(f"glm5 serve: compiling the {what} for one sequence (--compile; a few minutes on 2 cores)",
              flush=True)
        started = time.perf_counter()
        engine.compiled.warm_up([1])
        print(f"glm5 serve: compiled in {time.perf_counter() - started:.0f} s"
              + (f" (failed, steps run eagerly: {engine.compiled.failed})" if engine.compiled.failed else ""),
              flush=True)
    config = ServerConfig(model_name=name, default_max_tokens=getattr(args, "default_max_tokens", 256),
                          chat_template=template, responses_store_items=getattr(args, "responses_store_items", 1024),
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

"""OpenAI-compatible serving on top of glm5.engine (text side here; the engine sees only token ids).

    state.py               ServerConfig, Metrics, ServerState (on app.state: engine, tokenizer, caches)
    errors.py              APIError and each API's error body (OpenAI's {"error": {...}})
    protocol.py            OpenAI request models and validation
    inputs.py              body -> request -> prompt ids (checked, tokenized off the loop) -> SamplingParams
    generation.py          choices on the engine, finish_reason, abort on disconnect
    text.py                incremental detokenization, stop strings, GLM-5 output parsing per choice
    json_mode.py           response_format json_object by constrained decoding
    sse.py                 server-sent event framing
    openai_chat.py         POST /v1/chat/completions
    openai_completions.py  POST /v1/completions
    status.py              GET /health, /v1/models, /metrics
    app.py                 create_app: the routers, error handlers, metrics middleware
    async_engine.py        the engine on a background thread, per-request async token streams
    cli.py                 `glm5 serve`
"""

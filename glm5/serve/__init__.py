"""OpenAI-compatible serving on top of glm5.engine (text side here; the engine sees only token ids).

    protocol.py      request models, validation, OpenAI error bodies
    async_engine.py  the engine on a background thread, per-request async token streams
    text.py          incremental detokenization, stop strings, GLM-5 output parsing per choice
    json_mode.py     response_format json_object by constrained decoding
    app.py           the FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
    cli.py           `glm5 serve`
"""

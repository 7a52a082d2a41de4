"""The HTTP server (FastAPI): one router per API over one engine, with shared state, errors and metrics.

    glm5 serve --preset nano --port 8000          # random weights, default tokenizer
    glm5 serve --model runs/demo/model            # a checkpoint (ours or transformers')
    app = create_app(engine, tokenizer, ServerConfig(model_name="nano"))   # in-process (tests, benchmarks)

Routes, a module each: openai_chat.py (POST /v1/chat/completions), openai_completions.py (POST /v1/completions),
anthropic.py (POST /v1/messages, /v1/messages/count_tokens), responses.py (POST /v1/responses, GET / DELETE
/v1/responses/{id}), status.py (GET /health, /v1/models, /metrics), chat_page.py (the chat page at /). They
share, through `ServerState` on app.state (state.py): the engine on its thread (async_engine.py), the tokenizer,
metrics; and the pieces in inputs.py (body, request, prompt ids, SamplingParams, tool_choice forcing),
generation.py (choices on the engine, finish_reason, abort on disconnect), text.py (detokenization, stop
strings, the chat parser), sse.py (event framing). The Anthropic and Responses routes run one chat generation
through chat_run.py.

A new API is a router module with its request models: `include_api(app, router, paths, error_body)` mounts it
and answers its errors in its own shape. Every error is that shape with its status (400 bad field or too long a
prompt, 404 unknown model or route, 413 too large a body, 422 messages that cannot be rendered, 500 an engine
failure); never a traceback. Every answer, 5xx included, is counted in glm5_requests_total.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm5.serve import anthropic, chat_page, openai_chat, openai_completions, responses, status
from glm5.serve.async_engine import AsyncEngine
from glm5.serve.errors import APIError, ErrorBody, openai_error_body
from glm5.serve.responses_protocol import ResponseStore
from glm5.serve.state import MAX_BODY_BYTES, ServerConfig, ServerState  # noqa: F401  (ServerConfig: public here)

log = logging.getLogger("glm5.serve")


def include_api(app: FastAPI, router: APIRouter, paths, error_body: ErrorBody = openai_error_body) -> None:
    """Mount an API's router; errors on its `paths` are answered with `error_body` (OpenAI's by default)."""
    app.include_router(router)
    for path in paths:
        app.state.error_bodies[path] = error_body
    app.state.known_routes.update(paths)


def error_response(request: Request, err: APIError) -> JSONResponse:
    body = request.app.state.error_bodies.get(request.url.path, openai_error_body)
    return JSONResponse(body(err), status_code=err.status)


def create_app(engine: AsyncEngine, tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) with `tokenizer` for the text side."""
    app = FastAPI(title="glm5", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state.server = ServerState(engine, tokenizer, config)
    app.state.error_bodies, app.state.known_routes = {}, set()
    # (kept for callers that read them off app.state)
    app.state.engine, app.state.tokenizer, app.state.metrics, app.state.config = (
        engine, tokenizer, state.metrics, state.config)
    include_api(app, status.router, status.PATHS)
    include_api(app, openai_chat.router, openai_chat.PATHS)
    include_api(app, openai_completions.router, openai_completions.PATHS)
    include_api(app, anthropic.router, anthropic.PATHS, anthropic.anthropic_error_body)
    app.state.responses_store = ResponseStore(state.config.responses_store_items, state.config.responses_store_bytes)
    include_api(app, responses.router, responses.PATHS)
    include_api(app, chat_page.router, chat_page.PATHS)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error_response(request, APIError(404, f"no route {request.method} {request.url.path}",
                                                    "not_found_error", code="unknown_route"))
        return error_response(request, APIError(err.status_code, str(err.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(request, APIError(422, str(err.errors()[:1]), "invalid_request_error",
                                                code="unprocessable"))

    @app.middleware("http")
    async def _guard_and_count(request: Request, call_next):
        limit = state.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(request, APIError(413, f"request body over {limit} bytes", code="too_large"))
        else:
            try:
                response = await call_next(request)
            except Exception as err:  # a bug: the client gets a 500 in its API's shape, the log one traceback
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = error_response(request, APIError(500, f"internal error: {type(err).__name__}",
                                                            "server_error"))
        route = request.url.path if request.url.path in app.state.known_routes else "other"
        state.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    return app

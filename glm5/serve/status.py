"""GET /health, GET /v1/models, GET /metrics (Prometheus): what a load balancer, a client and a scraper ask."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glm5.serve.errors import APIError
from glm5.serve.protocol import now
from glm5.serve.state import server_state

router = APIRouter()
PATHS = ("/health", "/v1/models", "/metrics")
START_TIME = now()


@router.get("/health")
async def health(request: Request):
    state = server_state(request)
    if not state.engine.alive:
        raise APIError(503, "the engine thread is not running", "server_error")
    return {"status": "ok", "running": state.llm.num_running, "waiting": state.llm.num_waiting}


@router.get("/v1/models")
async def models(request: Request):
    state = server_state(request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": START_TIME,
                                        "owned_by": "glm5", "max_model_len": state.llm.max_model_len}]}


@router.get("/metrics")
async def prometheus(request: Request):
    state = server_state(request)
    state.metrics.update_gauges(state.llm)  # the engine now, not at its last step (an idle engine takes none)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

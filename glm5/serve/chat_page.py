"""The chat page `glm5 serve` shows at `/`: static files in glm5/serve/page/ (no build step, nothing from a CDN).

    glm5 serve --preset nano --port 8000        # then open http://127.0.0.1:8000/

The page talks to /v1/chat/completions (streamed) and /v1/models like any client. Files are read once and
served from memory with their content types; only the names in FILES are served.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from glm5.serve.errors import APIError

router = APIRouter()
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
PATHS = ("/", *(f"/page/{name}" for name in FILES))
_cache: dict[str, bytes] = {}


def _file(name: str) -> Response:
    if name not in FILES:
        raise APIError(404, f"no page file {name!r}", "not_found_error", code="unknown_route")
    if name not in _cache:
        _cache[name] = resources.files("glm5.serve").joinpath("page", name).read_bytes()
    return Response(_cache[name], media_type=FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index():
    return _file("index.html")


@router.get("/page/{name}", include_in_schema=False)
async def static(name: str):
    return _file(name)

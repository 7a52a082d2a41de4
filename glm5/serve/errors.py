"""Errors a client can read: one exception for every API, and each API's own error body.

    raise APIError(400, "temperature: must be <= 2", param="temperature", code="invalid_value")

The routes raise `APIError`; the app's handler (app.py) turns it into the body of the API the route belongs to:
OpenAI's `{"error": {"message", "type", "param", "code"}}` (`openai_error_body`, the default), and whatever a
new API registers with its router (Anthropic's is `{"type": "error", "error": {"type", "message"}}`). A status
is never a traceback: an unexpected exception becomes a 500 in the same shape.
"""

from __future__ import annotations

from collections.abc import Callable


class APIError(Exception):
    """An error answered with an HTTP status and a JSON body (see ErrorBody for the shape per API)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """OpenAI's shape (kept as a method: most routes speak OpenAI)."""
        return openai_error_body(self)


ErrorBody = Callable[[APIError], dict]


def openai_error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def validation_error(err) -> APIError:
    """A pydantic ValidationError -> 400 naming the first bad field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value")

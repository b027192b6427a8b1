"""Errors: `APIError`, raised anywhere in a request, and OpenAI's error body (Anthropic's is
anthropic_protocol's; routes.error_body picks a route's)."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class APIError(Exception):
    """An OpenAI-shaped error: raised anywhere in a request, answered by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # the answer's own headers, past Retry-After


CLIENT_CLOSED = 499  # as nginx logs it: the client went away before the answer (nobody reads this status)
ERROR_TYPES = {429: "rate_limit_exceeded"}  # OpenAI types a 401 as invalid_request_error too


def retry_after(exc: APIError) -> dict[str, str]:
    """A queue that is full or a model still loading clear within about a second."""
    return {"retry-after": "1"} if exc.status in (429, 503) else {}


def error_body(exc: APIError) -> ErrorResponse:
    kind = ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorBody(message=exc.message, type=kind, param=exc.param, code=exc.code))

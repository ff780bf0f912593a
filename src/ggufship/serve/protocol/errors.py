"""The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ggufship.serve.errors import APIError


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    error: ErrorDetail


def error_response(exc: APIError) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorDetail(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
    )


def _printable(text: str | None) -> str | None:
    """Text that encodes as UTF-8 (a lone surrogate echoed from a request becomes ``\\ud800``)."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(exc: APIError) -> dict[str, Any]:
    detail = ErrorDetail(
        message=_printable(exc.message) or "", type=exc.error_type, param=_printable(exc.param), code=exc.code
    )
    return ErrorResponse(error=detail).model_dump()


def error_json(exc: APIError, *, dify: bool = False) -> dict[str, Any]:
    """The error body; on the Dify routes with Dify's top-level ``code``, ``message``, ``status`` too."""
    body = error_body(exc)
    if dify:
        body.update(code=exc.code, message=body["error"]["message"], status=exc.status_code)
    return body


#: OpenAPI ``responses`` entry for routes: every error has this shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "invalid request (the `param` names the parameter)"),
        (401, "missing or wrong API key"),
        (404, "unknown model or conversation"),
        (413, "request body larger than max_request_bytes"),
        (429, "queue full; see Retry-After"),
        (503, "model not loaded yet, or an injected fault"),
    )
}

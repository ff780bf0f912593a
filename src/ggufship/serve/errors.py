"""Exceptions of the API server.

Startup failures (exit codes 50–54, documented in docs/reference/exit-codes.md) and the
request-level :class:`APIError` family, each mapped to an HTTP status and an
OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` by
:mod:`ggufship.serve.protocol.errors`.
"""

from __future__ import annotations

from ggufship.errors import GgufshipError


class ServeError(GgufshipError):
    """The API server failed."""

    exit_code = 50


class ModelSourceError(ServeError):
    """MODEL cannot be found, fetched or understood (path, URI, quantization)."""

    exit_code = 51


class ModelVerificationError(ServeError):
    """The model's digest or signature does not match: the server refuses to start."""

    exit_code = 52


class ModelLoadError(ServeError):
    """llama.cpp could not load the verified model."""

    exit_code = 53


class ServeConfigError(ServeError):
    """A setting is invalid (API key file, option combination)."""

    exit_code = 54


class APIError(ServeError):
    """An error answered to one request; never ends the process."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """The request body exceeds ``max_request_bytes``."""

    status_code = 413
    code = "request_too_large"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class QueueFullError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(APIError):
    status_code = 503
    error_type = "server_error"
    code = "model_not_ready"


class InjectedFaultError(APIError):
    """Fault injection (``fault_abort_*``, ``fault_stream_error_*`` settings) failed this request
    on purpose."""

    error_type = "server_error"
    code = "fault_injected"

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or f"fault injected: aborted with HTTP {status}")
        self.status_code = status


class ClientGoneError(APIError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class GenerationError(APIError):
    """llama.cpp failed while generating."""

    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


class InternalError(APIError):
    """A bug or fault of the server (never the request's doing): 500."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

"""What one running server holds, reachable from every request as ``app.state.ggufship``."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ggufship.serve.errors import APIError, NotReadyError

if TYPE_CHECKING:
    from ggufship.serve._auth import KeyRing
    from ggufship.serve._conversations import ConversationStore
    from ggufship.serve._engine import Engine, TokenFault
    from ggufship.serve._inference import Inference
    from ggufship.serve._metrics import ServeMetrics
    from ggufship.serve._model_source import ModelSource
    from ggufship.serve.settings import ServeSettings


@dataclass
class ServerState:
    settings: ServeSettings
    source: ModelSource
    model_id: str
    version: str
    metrics: ServeMetrics
    engine: Engine
    keys: KeyRing
    conversations: ConversationStore
    audit: Any = None  # ggufship.audit.AuditLog when configured
    inference: Inference | None = None
    load_error: BaseException | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    #: The one random source of fault injection (which requests are delayed, aborted, slowed,
    #: failed); replace it with a seeded ``random.Random`` for a reproducible sequence.
    fault_random: random.Random = field(default_factory=random.Random)

    @property
    def ready(self) -> bool:
        return self.inference is not None

    def require_inference(self) -> Inference:
        if self.inference is None:
            raise NotReadyError(
                "the model is still loading"
                if self.load_error is None
                else f"model failed: {self.load_error}"
            )
        return self.inference

    def model_aliases(self) -> set[str]:
        names = {self.model_id, f"{self.model_id}:{self.version}", f"{self.model_id}-{self.version}"}
        names.add(self.source.path.name)
        names.add(self.source.path.stem)
        return names


def server_state(request: Request) -> ServerState:
    return request.app.state.ggufship  # type: ignore[no-any-return]


def request_started(request: Request) -> float:
    return float(request.scope.get("state", {}).get("ggufship_started", time.perf_counter()))


def token_fault(request: Request) -> TokenFault | None:
    """The token-level fault the middleware chose for this request, if any."""
    return request.scope.get("state", {}).get("ggufship_token_fault")  # type: ignore[no-any-return]


def audit_info(request: Request) -> dict[str, Any]:
    """The dict the middleware writes to the audit log for this request; routes add to it."""
    return request.scope.setdefault("state", {}).setdefault("ggufship_audit", {})  # type: ignore[no-any-return]


def stream_failed(request: Request, exc: APIError) -> APIError:
    """Record that a stream ended in ``exc`` after its 200 status line went out: the middleware counts
    the request with ``exc``'s status (so the gate's 5xx ratio sees failed streams) and the audit
    event carries it. Returns ``exc`` for sending inside the stream."""
    req_state = request.scope.setdefault("state", {})
    req_state["ggufship_stream_error_status"] = exc.status_code
    audit_info(request)["stream_error"] = {"status": exc.status_code, "code": exc.code}
    return exc

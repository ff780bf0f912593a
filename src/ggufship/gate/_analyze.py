"""One analysis end to end (:func:`analyze`: measure, then the pure core) and the request
builder every front end shares (:func:`make_request`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from ggufship.gate._errors import GateConfigError
from ggufship.gate._model import GatePolicy, GateRequest, Verdict
from ggufship.gate._prometheus import measure
from ggufship.gate._stats import Measurement, evaluate
from ggufship.options import Option, deep_merge, options_of, validated

logger = logging.getLogger(__name__)


def analyze(request: GateRequest) -> Verdict:
    """Measure from Prometheus and evaluate. Never raises for an unreachable Prometheus,
    missing data or an unusable answer (NaN, ±Inf, garbage): those are inconclusive verdicts,
    and so is any unexpected error of the analysis itself (logged with its traceback)."""
    evaluated_at = request.at or datetime.now(UTC)
    if request.at is None:
        request = request.model_copy(update={"at": evaluated_at})
    try:
        measurement = measure(request)
        verdict = evaluate(request, measurement, evaluated_at)
    except Exception as exc:  # the gate's own bug must never read as "fail" (exit 1)
        logger.exception("gate: analysis failed unexpectedly; the verdict is inconclusive")
        detail = f"analysis failed unexpectedly: {type(exc).__name__}: {exc}"
        verdict = evaluate(request, Measurement(errors=(detail,)), evaluated_at)
    logger.info("gate: %s — %s", verdict.outcome, verdict.reason)
    return verdict


def request_options() -> tuple[Option, ...]:
    """The options of a :class:`GateRequest` (its fields and its policy's, flattened)."""
    return options_of(GateRequest)


def build_request(base: GateRequest | None, data: dict[str, Any], *, spell: Any = None) -> GateRequest:
    """``data`` (nested: policy fields under ``policy``) over ``base``; without a base the
    environment (``GGUFSHIP_GATE_*``) and the defaults fill the rest. Raises
    :class:`GateConfigError` naming each bad option as ``spell`` writes it (default: the field)."""
    merged = deep_merge(base.model_dump(), data) if base is not None else data
    return validated(
        GateRequest,
        merged,
        request_options(),
        spell=spell or (lambda o: o.path[-1]),
        error=lambda message: GateConfigError(f"invalid gate option: {message}"),
    )


def make_request(base: GateRequest | None = None, **overrides: Any) -> GateRequest:
    """A :class:`GateRequest` from ``base`` with fields (and ``policy`` fields) replaced and
    validated; ``None`` values are ignored. Raises :class:`GateConfigError` naming the field."""
    policy_fields = set(GatePolicy.model_fields)
    top = {k: v for k, v in overrides.items() if k not in policy_fields and v is not None}
    pol = {k: v for k, v in overrides.items() if k in policy_fields and v is not None}
    return build_request(base, {**top, "policy": pol} if pol else top)

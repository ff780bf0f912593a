"""Where a deployed release stands, read from the Argo Rollout object alone (a pure function).

:func:`assess` takes the Rollout as the Kubernetes API returns it (a mapping), the
digest the release deploys, and the time left, and answers one of:

* ``waiting`` — the cluster has not caught up with the release yet, or the canary is
  progressing: the pod template does not carry the expected digest (Argo CD has not
  synced the GitOps commit), the controller has not observed the current
  ``metadata.generation``, an unpause is in flight, or the canary steps are running.
* ``paused`` — waiting for promotion: a ``pause: {}`` step, an inconclusive analysis,
  or a manual pause (``status.pauseConditions`` / ``spec.paused``).
* ``promoted`` — the expected revision is the stable one and the Rollout is Healthy.
* ``aborted`` — Degraded or aborted *on the expected revision* (a Degraded status left
  over from an older revision is stale, not this release's verdict).
* ``timed-out`` — none of the final states within the deadline.

The fields are those of ``RolloutStatus`` in argo-rollouts
``pkg/apis/rollouts/v1alpha1/types.go`` (``observedGeneration`` is a string there,
``stableRS``/``currentPodHash`` are pod-template hashes). The order of the checks follows
``GetRolloutPhase`` / ``CalculateRolloutPhase`` / ``IsFullyPromoted`` in
argo-rollouts ``utils/rollout/rolloututil.go``, which ``kubectl argo rollouts status``
(``pkg/kubectl-argo-rollouts/cmd/status/status.go``) uses: it stops on ``Healthy`` or
``Degraded``. Unlike that command, a release also needs its own digest in the template
and ``stableRS == currentPodHash`` (Healthy alone is also what the *old* revision
reports right after the GitOps commit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: The pod-template annotation the chart writes from ``model.sha256`` (templates/rollout.yaml);
#: ``deploy_mode=patch`` sets the same annotation.
SHA256_ANNOTATION = "ggufship.io/model-sha256"

State = Literal["waiting", "paused", "promoted", "aborted", "timed-out"]
FINAL_STATES: frozenset[str] = frozenset({"promoted", "aborted", "timed-out"})

# Condition reasons that make a Rollout Degraded (utils/conditions/conditions.go:
# RolloutAbortedReason, TimedOutReason; InvalidSpec is a condition type).
_DEGRADED_REASONS = frozenset({"RolloutAborted", "ProgressDeadlineExceeded"})


@dataclass(frozen=True)
class RolloutAssessment:
    """One reading of the Rollout: the state, why, and the fields it was decided on."""

    state: State
    reason: str
    phase: str = ""
    message: str = ""
    template_sha256: str = ""
    generation: int | None = None
    observed_generation: str = ""
    stable_rs: str = ""
    current_pod_hash: str = ""
    step_index: int | None = None
    pause_reasons: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def summary(self) -> str:
        """One log line: state, phase and the reason."""
        phase = f" ({self.phase})" if self.phase else ""
        return f"{self.state}{phase}: {self.reason}"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _generation_observed(generation: int | None, observed: str) -> bool:
    """``isGenerationObserved`` (utils/rollout/rolloututil.go): a numeric observedGeneration must
    equal ``metadata.generation`` (or exceed it: the v0.9 all-digit hash corner case); a
    non-numeric one (a v0.9 hash) counts as observed. Stricter than upstream: an unset
    observedGeneration or generation is *not* observed (the controller never reconciled it)."""
    if not observed or generation is None:
        return False
    observed_n = _int(observed)
    return observed_n is None or observed_n >= generation


def assess(
    rollout: Mapping[str, Any] | Any,
    expected_sha256: str,
    *,
    time_left_s: float | None = None,
) -> RolloutAssessment:
    """Decide where the release of ``expected_sha256`` stands on this Rollout object.

    ``time_left_s``: seconds until the caller's deadline (``None``: no deadline); at or
    below zero, anything not final is ``timed-out``. Garbage (not a mapping, no status)
    is ``waiting`` — never ``promoted``.
    """
    obj = _mapping(rollout)
    meta = _mapping(obj.get("metadata"))
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    template_meta = _mapping(_mapping(spec.get("template")).get("metadata"))
    template_sha = str(_mapping(template_meta.get("annotations")).get(SHA256_ANNOTATION) or "")
    generation = _int(meta.get("generation"))
    observed = str(status.get("observedGeneration") or "")
    phase = str(status.get("phase") or "")
    message = str(status.get("message") or "")
    stable_rs = str(status.get("stableRS") or "")
    current = str(status.get("currentPodHash") or "")
    pause_conditions = [_mapping(p) for p in status.get("pauseConditions") or [] if isinstance(p, Mapping)]
    pause_reasons = tuple(str(p.get("reason") or "") for p in pause_conditions)
    fields = {
        "phase": phase,
        "message": message,
        "template_sha256": template_sha,
        "generation": generation,
        "observed_generation": observed,
        "stable_rs": stable_rs,
        "current_pod_hash": current,
        "step_index": _int(status.get("currentStepIndex")),
        "pause_reasons": pause_reasons,
    }

    def result(state: State, reason: str) -> RolloutAssessment:
        if state not in FINAL_STATES and time_left_s is not None and time_left_s <= 0:
            return RolloutAssessment("timed-out", f"deadline reached while {state}: {reason}", **fields)
        return RolloutAssessment(state, reason, **fields)

    expected = expected_sha256.strip().lower()
    if not obj or not status:
        return result("waiting", "the Rollout has no status yet")
    if template_sha.lower() != expected:
        shown = template_sha[:12] or "none"
        return result(
            "waiting",
            f"pod template carries digest {shown}, not {expected[:12]} (GitOps commit not synced yet)",
        )
    if not _generation_observed(generation, observed):
        return result(
            "waiting",
            f"generation {generation} not observed yet (status.observedGeneration={observed or 'unset'})",
        )
    # Degraded on this revision: aborted by an analysis or a person, progress deadline, bad spec.
    conditions = [_mapping(c) for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    degraded_by = next(
        (c for c in conditions if c.get("type") == "InvalidSpec" or c.get("reason") in _DEGRADED_REASONS),
        None,
    )
    if status.get("abort") is True or phase == "Degraded" or degraded_by is not None:
        why = message or (f"{degraded_by.get('reason')}: {degraded_by.get('message')}" if degraded_by else "")
        return result("aborted", why or "status.abort is set")
    # IsUnpausing: a promotion cleared the pause conditions; the controller has not reacted yet.
    if status.get("controllerPause") is True and not pause_conditions:
        return result("waiting", "unpausing (promotion not yet observed by the controller)")
    if spec.get("paused") is True or pause_reasons or phase == "Paused":
        manual = "manually paused" if spec.get("paused") else message
        why = ", ".join(r for r in pause_reasons if r) or manual
        return result("paused", f"waiting for promotion ({why or 'paused'})")
    # IsFullyPromoted: stable hash == desired hash; then Healthy means all replicas are updated
    # and available (CalculateRolloutPhase).
    if not current or stable_rs != current:
        return result(
            "waiting",
            f"canary {current or '?'} not yet stable (stableRS {stable_rs or 'unset'}); {phase or 'no phase'}"
            + (f": {message}" if message else ""),
        )
    if phase != "Healthy":
        return result("waiting", f"promoted revision {current} is {phase or 'without a phase'}: {message}")
    return result("promoted", f"revision {current} carries {expected[:12]} and is stable and Healthy")

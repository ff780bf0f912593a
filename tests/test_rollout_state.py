"""Where a release stands on an Argo Rollout: a table of realistic status snapshots.

The snapshots use the fields of ``RolloutStatus`` in argo-rollouts
``pkg/apis/rollouts/v1alpha1/types.go`` (``observedGeneration`` is a string; ``stableRS`` and
``currentPodHash`` are pod-template hashes; ``pauseConditions[].reason`` is a ``PauseReason``)
and the phases/messages the controller writes (``utils/rollout/rolloututil.go``
``CalculateRolloutPhase``; condition reasons from ``utils/conditions/conditions.go``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ggufship.errors import UsageError
from ggufship.pipeline.rollout_state import SHA256_ANNOTATION, assess
from ggufship.pipeline.steps import _await_rollout, deploy_and_await

OLD = "a" * 64
NEW = "b" * 64
OLD_HASH, NEW_HASH = "6c9d8f7b5", "7f4b9c6d8"


def rollout(
    *,
    digest: str = NEW,
    generation: int = 8,
    observed: str | None = "8",
    phase: str = "Progressing",
    message: str = "more replicas need to be updated",
    stable: str = OLD_HASH,
    current: str = NEW_HASH,
    step: int | None = 1,
    **status: Any,
) -> dict[str, Any]:
    """A Rollout as ``kubectl get rollout -o json`` shows it (the chart's shape)."""
    obj: dict[str, Any] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "tiny-ggufship-api", "namespace": "ml", "generation": generation},
        "spec": {
            "replicas": 4,
            "template": {
                "metadata": {
                    "labels": {"app.kubernetes.io/name": "ggufship-api"},
                    "annotations": {SHA256_ANNOTATION: digest, "ggufship.io/model-uri": "s3://models/tiny"},
                },
                "spec": {"containers": [{"name": "api", "image": "ghcr.io/ggufship/ggufship:0.1.0"}]},
            },
            "strategy": {"canary": {"steps": [{"setWeight": 5}, {"pause": {}}, {"setWeight": 50}]}},
        },
        "status": {
            "phase": phase,
            "message": message,
            "stableRS": stable,
            "currentPodHash": current,
            "replicas": 5,
            "updatedReplicas": 1,
            "readyReplicas": 5,
            "availableReplicas": 5,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "AvailableReason", "message": "ok"},
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "ReplicaSetUpdated",
                    "message": f'ReplicaSet "tiny-ggufship-api-{current}" is progressing.',
                },
            ],
            **status,
        },
    }
    if observed is not None:
        obj["status"]["observedGeneration"] = observed
    if step is not None:
        obj["status"]["currentStepIndex"] = step
    return obj


HEALTHY_OLD = rollout(
    digest=OLD, generation=7, observed="7", phase="Healthy", message="", stable=OLD_HASH, current=OLD_HASH
)
PROMOTED = rollout(phase="Healthy", message="", stable=NEW_HASH, current=NEW_HASH, step=3, updatedReplicas=4)
ABORTED = rollout(
    phase="Degraded",
    message='RolloutAborted: Rollout aborted update to revision 3: Metric "ks-gate" assessed Failed due '
    "to failed (2) > failureLimit (1)",
    abort=True,
    abortedAt="2026-12-06T03:10:00Z",
    step=0,
    conditions=[
        {
            "type": "Progressing",
            "status": "False",
            "reason": "RolloutAborted",
            "message": "Rollout aborted update to revision 3",
        }
    ],
)
DEADLINE = rollout(
    phase="Degraded",
    message="ProgressDeadlineExceeded: ReplicaSet has timed out progressing.",
    conditions=[
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "tiny-ggufship-api-7f4b9c6d8" has timed out progressing.',
        }
    ],
)
STEP_PAUSE = rollout(
    phase="Paused",
    message="CanaryPauseStep",
    controllerPause=True,
    pauseConditions=[{"reason": "CanaryPauseStep", "startTime": "2026-12-06T03:00:00Z"}],
)
MANUAL = rollout(phase="Paused", message="manually paused")
MANUAL["spec"]["paused"] = True

# Each row: id, Rollout object, expected state, a word the reason must contain.
TABLE: list[tuple[str, Any, str, str]] = [
    # Right after the GitOps commit, before Argo CD syncs: the old revision is Healthy and fully
    # promoted. The step used to report "promoted" here.
    ("before-sync: old revision Healthy", HEALTHY_OLD, "waiting", "not synced"),
    (
        "synced, generation not observed yet",
        rollout(generation=9, observed="8", phase="Healthy", message="", stable=OLD_HASH, current=OLD_HASH),
        "waiting",
        "not observed",
    ),
    ("observedGeneration unset", rollout(observed=None), "waiting", "not observed"),
    (
        "canary progressing, step analysis running",
        rollout(canary={"currentStepAnalysisRunStatus": {"name": "run-1", "status": "Running"}}),
        "waiting",
        "not yet stable",
    ),
    ("paused at pause: {}", STEP_PAUSE, "paused", "CanaryPauseStep"),
    (
        "paused on an inconclusive analysis",
        rollout(
            phase="Paused",
            message="InconclusiveAnalysisRun",
            controllerPause=True,
            pauseConditions=[{"reason": "InconclusiveAnalysisRun", "startTime": "2026-12-06T03:05:00Z"}],
        ),
        "paused",
        "InconclusiveAnalysisRun",
    ),
    (
        # IsUnpausing: promote cleared pauseConditions, the controller has not reacted yet.
        "unpausing after promote",
        rollout(phase="Paused", message="CanaryPauseStep", controllerPause=True),
        "waiting",
        "unpausing",
    ),
    ("manually paused (spec.paused)", MANUAL, "paused", "manually paused"),
    ("aborted by the analysis", ABORTED, "aborted", "failureLimit"),
    ("progress deadline exceeded", DEADLINE, "aborted", "ProgressDeadlineExceeded"),
    (
        "InvalidSpec",
        rollout(
            phase="Degraded",
            message="InvalidSpec: The Rollout is invalid",
            conditions=[{"type": "InvalidSpec", "status": "True", "reason": "InvalidSpec", "message": "x"}],
        ),
        "aborted",
        "InvalidSpec",
    ),
    (
        # An abort of the *previous* release, still shown until Argo CD syncs this one: stale.
        "Degraded left over from an older revision",
        rollout(digest=OLD, generation=7, observed="7", phase="Degraded", abort=True, message="aborted"),
        "waiting",
        "not synced",
    ),
    (
        "fully promoted, replicas still becoming available",
        rollout(
            phase="Progressing",
            message="updated replicas are still becoming available",
            stable=NEW_HASH,
            current=NEW_HASH,
        ),
        "waiting",
        "becoming available",
    ),
    ("promoted", PROMOTED, "promoted", "stable and Healthy"),
    (
        "Healthy but stableRS is not the current hash",
        rollout(phase="Healthy", message="", stable=OLD_HASH, current=NEW_HASH),
        "waiting",
        "not yet stable",
    ),
    ("no status yet", {**rollout(), "status": {}}, "waiting", "no status"),
    ("not a Rollout object", "garbage", "waiting", "no status"),
    ("nothing read", None, "waiting", "no status"),
]


@pytest.mark.parametrize(("rid", "obj", "state", "word"), TABLE, ids=[row[0] for row in TABLE])
def test_assess_table(rid: str, obj: Any, state: str, word: str) -> None:
    reading = assess(copy.deepcopy(obj), NEW)
    assert reading.state == state, reading
    assert word in reading.reason or word in reading.message, reading
    assert reading.final == (state in ("promoted", "aborted", "timed-out"))


def test_expected_digest_is_compared_case_insensitively() -> None:
    assert assess(PROMOTED, NEW.upper()).state == "promoted"
    assert assess(PROMOTED, OLD).state == "waiting"


@pytest.mark.parametrize(
    ("obj", "state"),
    [(STEP_PAUSE, "timed-out"), (HEALTHY_OLD, "timed-out"), (PROMOTED, "promoted"), (ABORTED, "aborted")],
)
def test_deadline_turns_only_non_final_states_into_timed_out(obj: dict[str, Any], state: str) -> None:
    reading = assess(obj, NEW, time_left_s=0.0)
    assert reading.state == state
    assert assess(obj, NEW, time_left_s=5.0).state != "timed-out"
    if state == "timed-out":
        assert "deadline reached while" in reading.reason


class FakeClock:
    """A manual clock for the poll loop: sleeping advances it (no real waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


def _sequence(*objs: Any) -> Any:
    it = iter(objs)
    last: list[Any] = [None]

    def get() -> Any:
        try:
            item = next(it)
        except StopIteration:
            item = last[0]
        if isinstance(item, Exception):
            raise item
        last[0] = item
        return copy.deepcopy(item)

    return get


def test_await_waits_through_sync_pause_and_api_errors_until_promoted() -> None:
    clock = FakeClock()
    get = _sequence(
        HEALTHY_OLD,  # right after the commit
        ConnectionError("apiserver unreachable"),
        rollout(generation=9, observed="8"),
        rollout(generation=9, observed="9"),
        STEP_PAUSE,
        STEP_PAUSE,
        {**PROMOTED, "metadata": {**PROMOTED["metadata"], "generation": 8}},
    )
    verdict = _await_rollout("r", "ml", NEW, 600.0, 10.0, get_rollout=get, clock=clock, sleep=clock.sleep)
    assert verdict["outcome"] == "promoted" and verdict["revision"] == NEW_HASH
    assert verdict["paused_for_promotion"] is True
    assert clock.now == pytest.approx(1060.0)  # six polls of 10 s before the seventh saw it


def test_await_reports_an_abort_at_once_and_times_out_on_a_stuck_pause() -> None:
    clock = FakeClock()
    verdict = _await_rollout(
        "r", "ml", NEW, 600.0, 10.0, get_rollout=_sequence(ABORTED), clock=clock, sleep=clock.sleep
    )
    assert verdict["outcome"] == "aborted" and "failureLimit" in verdict["message"]
    assert clock.now == 1000.0  # no waiting
    clock = FakeClock()
    verdict = _await_rollout(
        "r", "ml", NEW, 60.0, 10.0, get_rollout=_sequence(STEP_PAUSE), clock=clock, sleep=clock.sleep
    )
    assert verdict["outcome"] == "timed-out" and "paused" in verdict["message"]
    assert clock.now == pytest.approx(1060.0)


@pytest.mark.parametrize("digest", ["", "abc", "G" * 64, NEW.upper()])
def test_cluster_deploy_needs_a_real_digest(digest: str) -> None:
    with pytest.raises(UsageError, match="model_sha256"):
        deploy_and_await(mode="gitops", model_uri="s3://m/x", model_sha256=digest, rollout_name="r")


def test_await_canary_cli_needs_a_digest(capsys: pytest.CaptureFixture[str]) -> None:
    from ggufship.cli.main import main

    assert main(["await-canary", "--rollout", "r"]) == 2
    assert "--sha256 or --export" in capsys.readouterr().err
    assert main(["await-canary", "--rollout", "r", "--sha256", "abc"]) == 2
    assert "model_sha256" in capsys.readouterr().err
    assert main(["await-canary", "--rollout", "r", "--sha256", NEW, "--timeout", "0"]) == 2

"""The pipeline's publish step fails at once on a conflict and retries only what may pass.

The KFP task used to carry ``set_retry(3, 30s, ×2)``: a conflict (this version already
published with other content) was retried for ~3.5 minutes before failing (``ggufship
demo`` run twice). Now the task has no KFP retry (``tests/test_pipeline.py`` checks the
compiled spec) and ``steps.publish_outputs`` retries an unreachable registry or S3
endpoint itself, bounded. Real GitOps repository (``ggufship up --service git``), real
connection refusals on a free loopback port.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ggufship.pipeline import steps
from ggufship.publish import PublishConflictError
from ggufship.publish._oci import OciUnavailableError
from ggufship.services import load_state
from ggufship.services._process import free_port
from tests.publish_fixtures import make_export

pytest_plugins = ["tests.services_fixtures"]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the attempts: the real ``steps.publish`` behind a counter."""
    calls: list[int] = []
    real: Callable[..., Any] = steps.publish

    def counted(**kwargs: Any) -> Any:
        calls.append(1)
        return real(**kwargs)

    monkeypatch.setattr(steps, "publish", counted)
    return calls


def test_conflict_fails_at_once(
    services_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir, _ = services_factory(services=("git",))
    remote = load_state(state_dir).services["git"].endpoint
    first = make_export(tmp_path / "a", version="1.0.0", big=4096)
    other = make_export(tmp_path / "b", version="1.0.0", big=4096, seed=9)
    common = {"s3": "", "oci": "", "gitops": remote, "environment": "dev", "force": False}
    assert steps.publish_outputs(export_dir=str(first), **common)[2]  # a commit
    calls = _counting(monkeypatch)
    with pytest.raises(PublishConflictError):
        steps.publish_outputs(export_dir=str(other), **common)
    assert len(calls) == 1  # no retry of a conflict
    assert steps.publish_outputs(export_dir=str(first), **common)[2]  # the same content: idempotent


def test_unreachable_registry_is_retried_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = make_export(tmp_path / "a", version="1.0.0", big=4096)
    monkeypatch.setattr(steps, "PUBLISH_BACKOFF_S", (0.0, 0.0))
    calls = _counting(monkeypatch)
    with pytest.raises(OciUnavailableError):
        steps.publish_outputs(
            export_dir=str(export),
            s3="",
            oci=f"127.0.0.1:{free_port()}/models/syn",
            gitops="",
            environment="dev",
            force=False,
        )
    assert len(calls) == steps.PUBLISH_ATTEMPTS == 3

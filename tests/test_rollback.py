"""Rollback written back to Git, on a real bare repository (``ggufship up --service git``) and real git."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from ggufship.cli.main import main
from ggufship.errors import UsageError
from ggufship.publish import GitOpsTarget, PublishRequest, publish
from ggufship.rollback import NoStableModelError, RollbackRequest, rollback
from ggufship.services import load_state
from tests.publish_fixtures import git_bare, git_log, git_show, make_export

pytest_plugins = ["tests.services_fixtures"]


@pytest.fixture
def remote(services_factory) -> str:
    state_dir, _ = services_factory(services=("git",))
    return load_state(state_dir).services["git"].endpoint


VALUES = "deploy/staging/syn.values.yaml"


def _ship(remote: str, tmp_path: Path, version: str, seed: int) -> str:
    """Publish ``syn`` ``version`` to staging; the digest its values name."""
    export = make_export(tmp_path / f"e-{version}", version=version, big=4096, seed=seed)
    publish(export, PublishRequest(gitops=GitOpsTarget(url=remote, environment="staging")))
    return yaml.safe_load(git_show(remote, VALUES))["model"]["sha256"]


def _hand_edit(remote: str, tmp_path: Path, key: str, value: object) -> None:
    """Someone changes another key of the values file (e.g. replicas) and pushes."""
    work = tmp_path / f"hand-{key}"
    subprocess.run(["git", "clone", "-q", remote, str(work)], check=True)
    path = work / VALUES
    data = yaml.safe_load(path.read_text())
    data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = ["git", "-C", str(work), "-c", "user.name=h", "-c", "user.email=h@x"]
    subprocess.run([*cmd, "commit", "-qam", f"set {key}"], check=True)
    subprocess.run([*cmd, "push", "-q", "origin", "HEAD:main"], check=True)


def test_rollback_restores_the_stable_digest_keeps_other_keys_and_is_idempotent(remote, tmp_path):
    stable = _ship(remote, tmp_path, "1.0.0", seed=1)
    rejected = _ship(remote, tmp_path, "1.1.0", seed=2)
    _hand_edit(remote, tmp_path, "replicas", 6)  # after the rejected release: must survive
    before = git_log(remote)

    request = RollbackRequest(
        url=remote,
        name="syn",
        environment="staging",
        rejected_sha256=rejected,
        verdict="canary aborted: KS gate failed (ttft D=0.41, p=0.001)",
    )
    result = rollback(request)
    assert result.rolled_back and result.stable_sha256 == stable and result.stable_version == "1.0.0"
    assert result.rejected_version == "1.1.0" and result.attempts == 1
    log = git_log(remote)
    assert len(log) == len(before) + 1 and log[0].startswith(result.commit)
    subject = git_bare(remote, "log", "-1", "--format=%s", "main")
    assert rejected in subject and "KS gate failed" in subject and "1.1.0" in subject
    assert git_bare(remote, "show", "--name-only", "--format=", "main").splitlines() == [VALUES]
    values = yaml.safe_load(git_show(remote, VALUES))
    assert values["model"]["sha256"] == stable and values["model"]["version"] == "1.0.0"
    assert values["model"]["record"] == "models/syn/1.0.0.yaml"
    assert values["replicas"] == 6
    assert git_show(remote, "models/syn/1.1.0.yaml")  # the release record stays: it was published

    again = rollback(request)
    assert not again.rolled_back and again.commit == result.commit and "nothing to roll back" in again.reason
    assert git_log(remote) == log
    # By version, too: the head names 1.0.0 now, so rejecting 1.1.0 again changes nothing.
    assert not rollback(RollbackRequest(remote, "syn", "staging", rejected_version="1.1.0")).rolled_back


def test_rollback_of_a_release_that_is_not_deployed_changes_nothing(remote, tmp_path):
    _ship(remote, tmp_path, "1.0.0", seed=1)
    first = _ship(remote, tmp_path, "1.1.0", seed=2)
    newest = _ship(remote, tmp_path, "1.2.0", seed=3)  # superseded 1.1.0 already
    head = git_log(remote)
    result = rollback(RollbackRequest(remote, "syn", "staging", rejected_sha256=first))
    assert not result.rolled_back and git_log(remote) == head
    assert yaml.safe_load(git_show(remote, VALUES))["model"]["sha256"] == newest


def test_rollback_skips_older_rejected_commits_and_goes_to_the_last_other_model(remote, tmp_path):
    stable = _ship(remote, tmp_path, "1.0.0", seed=1)
    rejected = _ship(remote, tmp_path, "1.1.0", seed=2)
    _hand_edit(remote, tmp_path, "replicas", 2)  # a second commit that still names the rejected model
    result = rollback(RollbackRequest(remote, "syn", "staging", rejected_version="1.1.0"))
    assert result.rolled_back and result.rejected_sha256 == rejected and result.stable_sha256 == stable


def test_no_stable_to_go_back_to(remote, tmp_path):
    only = _ship(remote, tmp_path, "1.0.0", seed=1)
    head = git_log(remote)
    with pytest.raises(NoStableModelError, match="no stable to go back to") as err:
        rollback(RollbackRequest(remote, "syn", "staging", rejected_sha256=only))
    assert VALUES in str(err.value) and only in str(err.value)
    assert git_log(remote) == head
    with pytest.raises(NoStableModelError, match="nothing is deployed"):
        rollback(RollbackRequest(remote, "other", "staging", rejected_version="1.0.0"))


def test_concurrent_writer_rebases_and_never_forces(remote, tmp_path):
    """Another writer lands between our commit and our push: fetch, decide again, push on top."""
    stable = _ship(remote, tmp_path, "1.0.0", seed=1)
    rejected = _ship(remote, tmp_path, "1.1.0", seed=2)
    landed: list[str] = []

    def competitor(attempt: int) -> None:
        if attempt == 1:
            _hand_edit(remote, tmp_path, "replicas", 9)
            landed.append(git_log(remote)[0].split()[0])

    result = rollback(
        RollbackRequest(remote, "syn", "staging", rejected_sha256=rejected, backoff_s=0.01),
        before_push=competitor,
    )
    assert result.rolled_back and result.attempts == 2
    log = git_log(remote)
    assert log[0].startswith(result.commit) and log[1].startswith(landed[0])  # linear: nothing lost
    values = yaml.safe_load(git_show(remote, VALUES))
    assert values["replicas"] == 9 and values["model"]["sha256"] == stable


def test_concurrent_rollbacks_land_once(remote, tmp_path):
    """Two rollbacks of the same rejection race: the second sees the first on its retry, no-op."""
    _ship(remote, tmp_path, "1.0.0", seed=1)
    rejected = _ship(remote, tmp_path, "1.1.0", seed=2)
    request = RollbackRequest(remote, "syn", "staging", rejected_sha256=rejected, backoff_s=0.01)
    other: list = []

    def race(attempt: int) -> None:
        if attempt == 1:  # another watcher of the same abort (its own verdict: a different commit)
            other.append(rollback(dataclasses.replace(request, verdict="aborted (seen by watcher 2)")))

    result = rollback(request, before_push=race)
    assert other[0].rolled_back and not result.rolled_back and result.attempts == 2
    subjects = git_bare(remote, "log", "--format=%s", "main").splitlines()
    assert sum(s.startswith("rollback syn") for s in subjects) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rejected_sha256": None, "rejected_version": None}, "sha256 and/or version"),
        ({"rejected_sha256": "abc"}, "not a 64-digit"),
        ({"name": "../x", "rejected_version": "1"}, "invalid name"),
        ({"environment": "", "rejected_version": "1"}, "invalid environment"),
        ({"verdict": "two\nlines", "rejected_version": "1"}, "one non-empty line"),
    ],
)
def test_bad_requests_name_the_parameter(kwargs, message):
    fields = {"url": "file:///nowhere.git", "name": "syn", **kwargs}
    with pytest.raises(UsageError, match=message):
        rollback(RollbackRequest(**fields))


def test_cli_rollback(remote, tmp_path, capsys):
    stable = _ship(remote, tmp_path, "1.0.0", seed=1)
    rejected = _ship(remote, tmp_path, "1.1.0", seed=2)
    args = ["rollback", "--gitops", remote, "--gitops-env", "staging", "--name", "syn"]
    assert main([*args, "--sha256", rejected, "--verdict", "aborted by the gate", "--json"]) == 0
    out = capsys.readouterr().out
    import json

    data = json.loads(out)
    assert data["rolled_back"] is True and data["stable_sha256"] == stable
    assert main([*args, "--version", "1.1.0"]) == 0  # idempotent: nothing to do, success
    assert "nothing to roll back" in capsys.readouterr().out
    assert main([*args, "--version", "1.0.0"]) == NoStableModelError.exit_code
    assert "no stable to go back to" in capsys.readouterr().err
    assert main(["rollback", "--gitops", remote, "--name", "syn"]) == 2


def test_pipeline_exit_handler_rolls_back_only_failed_runs(remote, tmp_path):
    """The KFP exit handler's library call (components/kfp_components.py rollback_release)."""
    from ggufship.pipeline.steps import rollback_on_failure

    stable = _ship(remote, tmp_path, "1.0.0", seed=1)
    _ship(remote, tmp_path, "1.1.0", seed=2)
    common = {"name": "syn", "version": "1.1.0", "environment": "staging", "error_message": ""}
    assert rollback_on_failure(state="SUCCEEDED", gitops=remote, **common) == "skipped"
    assert rollback_on_failure(state="FAILED", gitops="", **common) == "skipped"
    head = git_log(remote)
    failed = {**common, "error_message": "RolloutAbortedError: canary aborted (Degraded): KS failed\n..."}
    assert rollback_on_failure(state="FAILED", gitops=remote, **failed) == "rolled-back"
    assert len(git_log(remote)) == len(head) + 1
    assert "pipeline FAILED: RolloutAbortedError" in git_bare(remote, "log", "-1", "--format=%s", "main")
    assert yaml.safe_load(git_show(remote, VALUES))["model"]["sha256"] == stable
    assert rollback_on_failure(state="FAILED", gitops=remote, **failed) == "nothing-to-roll-back"

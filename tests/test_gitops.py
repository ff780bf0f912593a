"""GitOps publishing against a real bare repository (``ggufship up --service git``), real ``git``."""

from __future__ import annotations

import hashlib
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from ggufship.manifest import MANIFEST_NAME
from ggufship.publish import (
    GitOpsError,
    GitOpsTarget,
    PublishConflictError,
    PublishRequest,
    PublishSettingsError,
    publish,
)
from ggufship.services import load_state
from tests.publish_fixtures import git_bare, git_log, git_show, make_export

pytest_plugins = ["tests.services_fixtures"]


@pytest.fixture
def remote(services_factory) -> str:
    state_dir, _ = services_factory(services=("git",))
    return load_state(state_dir).services["git"].endpoint


def test_one_commit_with_record_and_values_idempotent(remote, tmp_path):
    export = make_export(tmp_path / "exp", big=4096)
    before = git_log(remote)
    target = GitOpsTarget(
        url=remote,
        environment="staging",
        author_name="Release Bot",
        author_email="bot@example.test",
        message="ship {name}@{version} to {environment} ({sha256})",
    )
    result = publish(export, PublishRequest(gitops=target)).gitops
    assert result is not None and not result.skipped and result.attempts == 1
    log = git_log(remote)
    assert len(log) == len(before) + 1
    sha = hashlib.sha256((export / "syn-1.0.0-Q4_K_M.gguf").read_bytes()).hexdigest()
    assert log[0] == f"{result.commit} Release Bot <bot@example.test> ship syn@1.0.0 to staging ({sha})"
    changed = git_bare(remote, "show", "--name-only", "--format=", "main").splitlines()
    assert sorted(changed) == ["deploy/staging/syn.values.yaml", "models/syn/1.0.0.yaml"]

    record = yaml.safe_load(git_show(remote, "models/syn/1.0.0.yaml"))
    assert record["name"] == "syn" and record["version"] == "1.0.0"
    manifest_sha = hashlib.sha256((export / MANIFEST_NAME).read_bytes()).hexdigest()
    assert record["manifest_sha256"] == manifest_sha
    assert {f["path"]: f["sha256"] for f in record["files"]}["syn-1.0.0-Q4_K_M.gguf"] == sha
    assert record["signature"]["file"] == "model.sig"
    assert record["signature"]["sha256"] == hashlib.sha256((export / "model.sig").read_bytes()).hexdigest()
    assert record["metrics"] == {"accuracy": 0.8}
    values = yaml.safe_load(git_show(remote, "deploy/staging/syn.values.yaml"))
    assert values["model"]["file"] == "syn-1.0.0-Q4_K_M.gguf" and values["model"]["sha256"] == sha
    assert values["model"]["record"] == "models/syn/1.0.0.yaml"

    again = publish(export, PublishRequest(gitops=target)).gitops
    assert again is not None and again.skipped and again.commit == result.commit
    assert git_log(remote) == log


def test_values_keep_other_keys_and_conflict_needs_force(remote, tmp_path):
    # someone hand-edited the values file: the release only replaces its `model` block
    first = make_export(tmp_path / "a", version="1.0.0", big=4096)
    publish(first, PublishRequest(gitops=GitOpsTarget(url=remote)))
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", remote, str(work)], check=True)
    values_file = work / "deploy/dev/syn.values.yaml"
    data = yaml.safe_load(values_file.read_text())
    data["replicas"] = 3
    values_file.write_text(yaml.safe_dump(data))
    env_cmd = ["git", "-C", str(work), "-c", "user.name=h", "-c", "user.email=h@x"]
    subprocess.run([*env_cmd, "commit", "-qam", "scale"], check=True)
    subprocess.run([*env_cmd, "push", "-q", "origin", "HEAD:main"], check=True)

    second = make_export(tmp_path / "b", version="1.1.0", big=4096, seed=5)
    publish(second, PublishRequest(gitops=GitOpsTarget(url=remote)))
    values = yaml.safe_load(git_show(remote, "deploy/dev/syn.values.yaml"))
    assert values["replicas"] == 3 and values["model"]["version"] == "1.1.0"

    other = make_export(tmp_path / "c", version="1.1.0", big=4096, seed=9)
    head = git_log(remote)
    with pytest.raises(PublishConflictError) as err:
        publish(other, PublishRequest(gitops=GitOpsTarget(url=remote)))
    assert "models/syn/1.1.0.yaml" in str(err.value) and "--force" in str(err.value)
    assert git_log(remote) == head
    forced = publish(other, PublishRequest(gitops=GitOpsTarget(url=remote), force=True)).gitops
    assert forced is not None and not forced.skipped and git_log(remote)[0].startswith(forced.commit)


def test_rejected_push_rebase_conflict_regenerates_from_new_head(remote, tmp_path):
    """A competing release lands between our commit and our push; both touch the same values file."""
    ours = make_export(tmp_path / "ours", version="2.0.0", big=4096, seed=2)
    theirs = make_export(tmp_path / "theirs", version="2.1.0", big=4096, seed=3)
    landed: list[str] = []

    def competitor(attempt: int) -> None:
        if attempt == 1:
            result = publish(theirs, PublishRequest(gitops=GitOpsTarget(url=remote, author_name="other")))
            landed.append(result.gitops.commit)

    from ggufship.manifest import Manifest
    from ggufship.publish._gitops import ReleaseLocations, publish_gitops

    manifest = Manifest.load(ours / MANIFEST_NAME)
    result = publish_gitops(
        manifest,
        "0" * 64,
        GitOpsTarget(url=remote, backoff_s=0.01),
        ReleaseLocations(),
        None,
        _before_push=competitor,
    )
    assert result.attempts == 2 and result.rebase_conflicts == 1 and not result.skipped
    log = git_log(remote)
    assert log[0].startswith(result.commit) and log[1].startswith(landed[0])  # nothing lost, linear
    assert git_show(remote, "models/syn/2.1.0.yaml") and git_show(remote, "models/syn/2.0.0.yaml")
    assert yaml.safe_load(git_show(remote, "deploy/dev/syn.values.yaml"))["model"]["version"] == "2.0.0"


def test_rejected_push_clean_rebase(remote, tmp_path):
    ours = make_export(tmp_path / "ours", name="alpha", big=4096)
    theirs = make_export(tmp_path / "theirs", name="beta", big=4096)

    def competitor(attempt: int) -> None:
        if attempt == 1:
            publish(theirs, PublishRequest(gitops=GitOpsTarget(url=remote)))

    from ggufship.manifest import Manifest
    from ggufship.publish._gitops import ReleaseLocations, publish_gitops

    result = publish_gitops(
        Manifest.load(ours / MANIFEST_NAME),
        "0" * 64,
        GitOpsTarget(url=remote, backoff_s=0.01),
        ReleaseLocations(),
        None,
        _before_push=competitor,
    )
    assert result.attempts == 2 and result.rebase_conflicts == 0
    assert git_show(remote, "models/alpha/1.0.0.yaml") and git_show(remote, "models/beta/1.0.0.yaml")


def test_concurrent_publishers_all_land(remote, tmp_path):
    exports = [make_export(tmp_path / f"e{i}", version=f"3.{i}.0", big=4096, seed=10 + i) for i in range(4)]
    before = len(git_log(remote))
    barrier = threading.Barrier(len(exports), timeout=60)
    results: list = [None] * len(exports)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            target = GitOpsTarget(url=remote, author_name=f"pub{i}", max_attempts=10, backoff_s=0.05)
            results[i] = publish(exports[i], PublishRequest(gitops=target)).gitops
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(exports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    log = git_log(remote)
    assert len(log) == before + len(exports)
    for i, result in enumerate(results):
        assert result is not None and not result.skipped
        # every commit is on main (nothing lost to a force push)
        subprocess.run(
            [
                "git",
                f"--git-dir={remote.removeprefix('file://')}",
                "merge-base",
                "--is-ancestor",
                result.commit,
                "main",
            ],
            check=True,
        )
        assert git_show(remote, f"models/syn/3.{i}.0.yaml")


def test_push_rejected_by_remote_is_reported(remote, tmp_path):
    hook = Path(remote.removeprefix("file://")) / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'releases are frozen' >&2\nexit 1\n")
    hook.chmod(0o755)
    export = make_export(tmp_path / "exp", big=4096)
    before = git_log(remote)
    with pytest.raises(GitOpsError) as err:
        publish(export, PublishRequest(gitops=GitOpsTarget(url=remote, max_attempts=2, backoff_s=0.01)))
    assert remote in str(err.value) and "2 attempts" in str(err.value) and err.value.exit_code == 43
    assert git_log(remote) == before


def test_bad_repository_and_settings(tmp_path):
    export = make_export(tmp_path / "exp", big=4096)
    missing = (tmp_path / "nope.git").as_uri()
    with pytest.raises(GitOpsError, match="cannot clone") as err:
        publish(export, PublishRequest(gitops=GitOpsTarget(url=missing)))
    assert missing in str(err.value)
    for bad, field in (
        (GitOpsTarget(url=missing, environment="../prod"), "environment"),
        (GitOpsTarget(url=missing, branch="a..b"), "branch"),
        (GitOpsTarget(url=missing, message="{nope}"), "message"),
        (GitOpsTarget(url=missing, author_email="nobody"), "author"),
        (GitOpsTarget(url=missing, max_attempts=0), "max_attempts"),
    ):
        with pytest.raises(PublishSettingsError, match=field):
            publish(export, PublishRequest(gitops=bad))
    with pytest.raises(GitOpsError, match="no Q8_0 GGUF"):
        publish(export, PublishRequest(gitops=GitOpsTarget(url=missing, quantization="Q8_0")))
    workdir = tmp_path / "clone-here"
    with pytest.raises(GitOpsError, match="cannot clone"):
        publish(export, PublishRequest(gitops=GitOpsTarget(url=missing, workdir=workdir)))
    assert not workdir.exists()

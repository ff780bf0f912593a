"""Concurrent publishes of one name/version (issue 13 item 6) on real servers: SeaweedFS, registry, bare git.

Two publishers of the same version, started together on a barrier, race through
S3 → OCI → GitOps. Exactly one may win, every time; the other gets
:class:`PublishConflictError` (exit 41); the three stores name the winner's
digests; nobody's upload is aborted by the other. The lease that decides it is
``ggufship.publish._s3_write.PublishLease``; its take-over and loss are tested
at the end with planted lease objects, and a holder stalled mid-upload in another
process keeps its upload while others try. (The code before the lease failed the
first test's checks in 5 of 8 trials: GitOps recorded one manifest, S3 held the other.)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.publish import (
    GitOpsTarget,
    LeasePolicy,
    PublishConflictError,
    PublishRequest,
    _s3,
    _s3_write,
    publish,
    pull,
)
from ggufship.services import load_state
from tests.publish_fixtures import embedded_s3, make_export

pytest_plugins = ["tests.services_fixtures"]

MIB = 1024 * 1024
RACE_TRIALS = 20
SAME_CONTENT_TRIALS = 4


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _race(*jobs: Any) -> list[Any]:
    """Run each job in its own thread, released together; each outcome is a result or the exception."""
    barrier = threading.Barrier(len(jobs))
    outcomes: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            outcomes[i] = jobs[i]()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a publisher did not finish within 300 s"
    return outcomes


@pytest.fixture
def stack(services_factory):
    from ggufship.publish._oci import OciTarget

    state_dir, _ = services_factory(services=("s3", "registry", "git"))
    state = load_state(state_dir)
    registry = state.services["registry"].endpoint.removeprefix("http://")
    git_dir = state.services["git"].endpoint.removeprefix("file://")

    def request(**options: Any) -> PublishRequest:
        return PublishRequest(
            s3=embedded_s3(state_dir, bucket="models", create_bucket=True, part_size=5 * MIB),
            oci=OciTarget(registry=registry, repository="models/syn"),
            gitops=GitOpsTarget(url=f"file://{git_dir}", backoff_s=0.05, max_attempts=10),
            **options,
        )

    writer = _s3_write.write_client(_s3.resolve_connection(embedded_s3(state_dir, bucket="models")))
    writer.create_bucket(Bucket="models")
    return state_dir, registry, git_dir, request, writer


def _record(git_dir: str, version: str) -> dict[str, Any]:
    shown = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"main:models/syn/{version}.yaml"],
        capture_output=True,
        text=True,
        check=True,
    )
    return yaml.safe_load(shown.stdout)


def _bucket_keys(writer: Any, prefix: str) -> list[str]:
    pages = writer.get_paginator("list_objects_v2").paginate(Bucket="models", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.mark.slow
def test_two_publishers_of_one_version_one_winner_every_time(stack, tmp_path):
    state_dir, registry, git_dir, request, writer = stack
    decided_by_lease = 0
    for trial in range(RACE_TRIALS):
        version = f"1.0.{trial}"
        exports = [
            make_export(tmp_path / f"t{trial}-{who}", version=version, big=8192, seed=2 * trial + n)
            for n, who in enumerate(("a", "b"))
        ]
        assert _files(exports[0]) != _files(exports[1])
        outcomes = _race(*(lambda e=e: publish(e, request()) for e in exports))

        winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert len(winners) == 1, f"trial {trial}: outcomes {outcomes!r}"
        win = winners[0]
        loser = outcomes[1 - win]
        assert isinstance(loser, PublishConflictError), f"trial {trial}: loser got {loser!r}"
        assert loser.exit_code == 41 and f"syn {version}" in str(loser)
        if "being published right now" in str(loser):
            decided_by_lease += 1
        else:  # the winner had finished before the loser looked: refused by the published manifest
            assert "already published with other content" in str(loser)
        winner, export = outcomes[win], exports[win]
        manifest_sha = hashlib.sha256((export / MANIFEST_NAME).read_bytes()).hexdigest()
        assert winner.manifest_sha256 == manifest_sha

        # GitOps records the winner; S3 and OCI hold the winner's bytes under that record
        record = _record(git_dir, version)
        assert record["manifest_sha256"] == manifest_sha
        listed = Manifest.load(export / MANIFEST_NAME)
        assert {f["path"]: f["sha256"] for f in record["files"]} == {f.path: f.sha256 for f in listed.files}
        assert record["sources"]["oci"] == winner.oci.reference
        from_s3 = pull(
            record["sources"]["s3"], tmp_path / f"s3-{trial}", s3=embedded_s3(state_dir, bucket="x")
        )
        assert hashlib.sha256((from_s3 / MANIFEST_NAME).read_bytes()).hexdigest() == manifest_sha
        for entry in listed.files:
            assert hashlib.sha256((from_s3 / entry.path).read_bytes()).hexdigest() == entry.sha256
        from_oci = pull(f"oci://{registry}/models/syn:{version}", tmp_path / f"oci-{trial}")
        assert _files(from_oci) == _files(from_s3)
        # the lease is released; no upload is left behind
        base = f"models/syn/{version}/"
        assert _s3_write.incomplete_uploads(writer, "models", base) == []
        assert base + _s3_write.LEASE_NAME not in _bucket_keys(writer, base)
    print(f"{RACE_TRIALS} trials, {decided_by_lease} decided at the lease while both were running")
    assert decided_by_lease >= RACE_TRIALS // 2, "the publishers rarely overlapped: not a race test"


@pytest.mark.slow
def test_two_publishers_of_the_same_content_both_succeed(stack, tmp_path):
    """Same bytes: one uploads (multipart), the other waits for it and finds everything there.

    Neither aborts the other's upload (either would then fail with NoSuchUpload).
    """
    _state_dir, _registry, git_dir, request, writer = stack
    for trial in range(SAME_CONTENT_TRIALS):
        version = f"2.0.{trial}"
        one = make_export(tmp_path / f"t{trial}-a", version=version, big=11 * MIB, seed=trial)
        two = make_export(tmp_path / f"t{trial}-b", version=version, big=11 * MIB, seed=trial)
        outcomes = _race(lambda e=one: publish(e, request()), lambda e=two: publish(e, request()))
        assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        assert sorted(o.s3.skipped for o in outcomes) == [False, True]
        assert len({o.oci.digest for o in outcomes}) == 1
        assert _record(git_dir, version)["manifest_sha256"] == outcomes[0].manifest_sha256
        base = f"models/syn/{version}/"
        assert _s3_write.incomplete_uploads(writer, "models", base) == []
        assert _bucket_keys(writer, base) == sorted(base + name for name in _files(one))


# ---------------------------------------------------------------- the lease itself


def _plant(writer: Any, key: str, **record: Any) -> None:
    writer.put_object(Bucket="models", Key=key, Body=json.dumps(record).encode())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def test_lease_of_a_dead_or_expired_holder_is_taken_over_a_live_one_is_not(stack, tmp_path):
    _state_dir, _registry, _git_dir, request, writer = stack
    s3_only = PublishRequest(s3=request().s3)
    export = make_export(tmp_path / "exp", version="3.0.0", big=4096, seed=7)
    lease_key = "models/syn/3.0.0/" + _s3_write.LEASE_NAME
    host_id = _s3_write._host_id()

    # live, on another host, other content: refused at once, nothing written
    _plant(
        writer, lease_key, owner="x", host="elsewhere", host_id="elsewhere", pid=1, manifest_sha256="f" * 64
    )
    with pytest.raises(PublishConflictError, match="being published right now with other content") as err:
        publish(export, s3_only)
    assert err.value.exit_code == 41
    assert _bucket_keys(writer, "models/syn/3.0.0/") == [lease_key]

    # live, same content: waited for (bounded), then refused as still in progress
    same = hashlib.sha256((export / MANIFEST_NAME).read_bytes()).hexdigest()
    _plant(writer, lease_key, owner="x", host="elsewhere", host_id="elsewhere", pid=1, manifest_sha256=same)
    with pytest.raises(PublishConflictError, match="still being published"):
        publish(export, PublishRequest(s3=request().s3, lease=LeasePolicy(wait_s=0.5)))

    # held by a process of this host that is gone: taken over, published, released
    _plant(
        writer, lease_key, owner="x", host="here", host_id=host_id, pid=_dead_pid(), manifest_sha256="f" * 64
    )
    result = publish(export, s3_only)
    assert not result.s3.skipped
    assert lease_key not in _bucket_keys(writer, "models/syn/3.0.0/")

    # held elsewhere but not renewed within its TTL (by the server's clock): taken over
    other = make_export(tmp_path / "exp4", version="4.0.0", big=4096, seed=8)
    key4 = "models/syn/4.0.0/" + _s3_write.LEASE_NAME
    _plant(
        writer,
        key4,
        owner="x",
        host="elsewhere",
        host_id="elsewhere",
        pid=1,
        manifest_sha256="f" * 64,
        ttl_s=1,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server's clock has 1 s resolution: wait until it is 2 s old
        head = writer.head_object(Bucket="models", Key=key4)
        server_now = head["ResponseMetadata"]["HTTPHeaders"]["date"]
        if (parsedate_to_datetime(server_now) - head["LastModified"]).total_seconds() >= 2:
            break
        time.sleep(0.2)
    assert not publish(other, s3_only).s3.skipped


def test_a_holder_that_loses_its_lease_stops_writing(stack, tmp_path):
    _state_dir, _registry, _git_dir, request, writer = stack
    export = make_export(tmp_path / "exp", version="5.0.0", big=4096, seed=9)
    manifest = Manifest.load(export / MANIFEST_NAME)
    sha = hashlib.sha256((export / MANIFEST_NAME).read_bytes()).hexdigest()
    lease = _s3_write.s3_lease(request().s3, manifest, sha, LeasePolicy(ttl_s=2.0))
    with lease:
        lease.check()
        # another publisher takes it over (it took this one for gone)
        _plant(
            writer,
            lease.key,
            owner="thief",
            host="elsewhere",
            host_id="elsewhere",
            pid=1,
            manifest_sha256=sha,
        )
        deadline = time.monotonic() + 30
        with pytest.raises(PublishConflictError, match="lease lost"):
            while time.monotonic() < deadline:
                lease.check()
                time.sleep(0.1)
    # the thief's lease is left alone, and nothing of the version was written
    assert _bucket_keys(writer, "models/syn/5.0.0/") == [lease.key]
    assert json.loads(writer.get_object(Bucket="models", Key=lease.key)["Body"].read())["owner"] == "thief"


def test_a_live_holder_stalled_mid_upload_is_never_aborted(stack, tmp_path):
    """A publisher stalled mid-multipart (another process) keeps its upload while two others try."""
    import os
    import select

    from tests.publish_fixtures import REPO, STALLING_PUBLISHER

    state_dir, _registry, _git_dir, request, writer = stack
    export = make_export(tmp_path / "exp", big=23 * MIB)  # 5 parts of 5 MiB; version 1.0.0
    base = "models/syn/1.0.0/"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", STALLING_PUBLISHER, str(export), str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        line = child.stdout.readline().strip() if ready else ""
        assert line == "STALLED", f"child did not stall mid-upload: {line!r}"
        uploads = _s3_write.incomplete_uploads(writer, "models", base)
        assert [k for k, _ in uploads] == [base + "syn-1.0.0-F16.gguf"]

        s3_only = PublishRequest(s3=request().s3, lease=LeasePolicy(wait_s=1.0))
        with pytest.raises(
            PublishConflictError, match="still being published"
        ):  # same content: waits, bounded
            publish(export, s3_only)
        other = make_export(tmp_path / "other", big=4096, seed=99)
        with pytest.raises(PublishConflictError, match="being published right now with other content"):
            publish(other, s3_only)
        assert _s3_write.incomplete_uploads(writer, "models", base) == uploads  # untouched

        out, err = child.communicate(input="", timeout=120)  # stdin closed: the holder goes on
        assert child.returncode == 0 and out.strip() == "FINISHED", err[-2000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert _s3_write.incomplete_uploads(writer, "models", base) == []
    dest = pull("s3://models/" + base, tmp_path / "pulled", s3=embedded_s3(state_dir, bucket="x"))
    assert _files(dest) == _files(export)


def test_gitops_alone_also_has_one_winner(services_factory, tmp_path):
    """Without S3 there is no lease; the non-force push decides (rebase conflict → record check)."""
    state_dir, _ = services_factory(services=("git",))
    git_dir = load_state(state_dir).services["git"].endpoint.removeprefix("file://")
    target = GitOpsTarget(url=f"file://{git_dir}", backoff_s=0.05, max_attempts=10)
    for trial in range(10):
        version = f"6.0.{trial}"
        exports = [
            make_export(tmp_path / f"t{trial}-{who}", version=version, big=4096, seed=3 * trial + n)
            for n, who in enumerate(("a", "b"))
        ]
        outcomes = _race(*(lambda e=e: publish(e, PublishRequest(gitops=target)) for e in exports))
        winners = [o for o in outcomes if not isinstance(o, Exception)]
        losers = [o for o in outcomes if isinstance(o, Exception)]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert isinstance(losers[0], PublishConflictError) and losers[0].exit_code == 41, losers
        assert _record(git_dir, version)["manifest_sha256"] == winners[0].manifest_sha256


def test_without_s3_the_gitops_winner_alone_moves_the_oci_tags(services_factory, tmp_path):
    """OCI + GitOps, no S3 lease: the artifact goes up by digest, GitOps picks the winner, it tags."""
    from ggufship.publish._oci import OciTarget

    state_dir, _ = services_factory(services=("registry", "git"))
    state = load_state(state_dir)
    registry = state.services["registry"].endpoint.removeprefix("http://")
    git_dir = state.services["git"].endpoint.removeprefix("file://")
    request = PublishRequest(
        oci=OciTarget(registry=registry, repository="models/syn"),
        gitops=GitOpsTarget(url=f"file://{git_dir}", backoff_s=0.05, max_attempts=10),
    )
    for trial in range(10):
        version = f"7.0.{trial}"
        exports = [
            make_export(tmp_path / f"t{trial}-{who}", version=version, big=4096, seed=5 * trial + n)
            for n, who in enumerate(("a", "b"))
        ]
        outcomes = _race(*(lambda e=e: publish(e, request) for e in exports))
        winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert len(winners) == 1, outcomes
        loser = outcomes[1 - winners[0]]
        assert isinstance(loser, PublishConflictError) and loser.exit_code == 41, loser
        winner = outcomes[winners[0]]
        assert _record(git_dir, version)["sources"]["oci"] == winner.oci.reference
        pulled = pull(f"oci://{registry}/models/syn:{version}", tmp_path / f"oci-{trial}")
        assert _files(pulled) == _files(exports[winners[0]])

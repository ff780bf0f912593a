"""Publish to / pull from a real SeaweedFS S3 on loopback, through the minio SDK.

Exports here are synthetic (random bytes listed in a real ``manifest.json``), so
these tests do not need llama.cpp; the round trip with a real GGUF export is in
``test_publish_roundtrip.py``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from pydantic import SecretStr

from ggufship.errors import IntegrityError, ManifestError
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.publish import (
    PublishConflictError,
    PublishRequest,
    PublishSettingsError,
    PullError,
    S3AccessError,
    S3Target,
    _s3,
    _s3_write,
    publish,
    pull,
)
from tests.publish_fixtures import MIB, REPO, STALLING_PUBLISHER, embedded_s3, make_export

pytest_plugins = ["tests.services_fixtures"]


@pytest.fixture
def s3(services_factory):
    """(state_dir, target factory, raw minio client) for one fresh SeaweedFS."""
    state_dir, _ = services_factory(services=("s3",))

    def target(bucket: str = "models", **options) -> S3Target:
        options.setdefault("create_bucket", True)
        options.setdefault("part_size", 5 * MIB)
        return embedded_s3(state_dir, bucket=bucket, **options)

    conn = _s3.resolve_connection(target())
    return state_dir, target, _s3.client_for(conn)


def _writer(target: S3Target):
    """A boto3 client (the write side's) for the same endpoint."""
    return _s3_write.write_client(_s3.resolve_connection(target))


def _keys(client, bucket: str) -> list[str]:
    return sorted(o.object_name for o in client.list_objects(bucket, recursive=True))


def test_publish_layout_metadata_idempotent_and_pull(s3, tmp_path, caplog):
    _state_dir, target, client = s3
    export = make_export(tmp_path / "exp")
    caplog.set_level(logging.INFO)
    result = publish(export, PublishRequest(s3=target(prefix="team")))
    base = "team/models/syn/1.0.0/"
    assert result.s3 is not None and result.s3.uri == f"s3://models/{base}"
    expected = sorted(base + p.name for p in export.iterdir())
    assert _keys(client, "models") == expected
    manifest = Manifest.load(export / MANIFEST_NAME)
    for path in export.iterdir():
        stat = client.stat_object("models", base + path.name)
        meta = _s3.object_metadata(stat.metadata)
        assert meta == {
            "name": "syn",
            "version": "1.0.0",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        assert stat.size == path.stat().st_size
    # the big file went up as a multipart upload (its ETag says how many parts)
    big = client.stat_object("models", base + manifest.files[0].path)
    assert big.etag.endswith("-3")
    # manifest last
    uploads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upload s3://")]
    assert uploads[-1] == f"upload s3://models/{base}{MANIFEST_NAME} ..."
    assert len(uploads) == len(expected)
    assert not _s3_write.incomplete_uploads(_writer(target()), "models", base)

    caplog.clear()
    again = publish(export, PublishRequest(s3=target(prefix="team")))
    assert again.s3 is not None and again.s3.skipped
    assert not [r for r in caplog.records if r.getMessage().startswith("upload s3://")]
    assert any("already published with the same digests" in r.getMessage() for r in caplog.records)

    dest = tmp_path / "pulled"
    assert pull(result.s3.uri, dest, s3=target()) == dest
    for path in export.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes()
    # same export already there: returned as is; a different non-empty dest is refused
    assert pull(result.s3.uri, dest, s3=target()) == dest
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(PullError, match="other: not empty"):
        pull(result.s3.uri, other, s3=target())
    assert sorted(p.name for p in other.iterdir()) == ["x"]


def test_same_version_other_digest_refused_unless_force(s3, tmp_path):
    _, target, client = s3
    first = make_export(tmp_path / "a", seed=1)
    second = make_export(tmp_path / "b", seed=2)
    publish(first, PublishRequest(s3=target()))
    before = {k: client.stat_object("models", k).etag for k in _keys(client, "models")}
    with pytest.raises(PublishConflictError) as err:
        publish(second, PublishRequest(s3=target()))
    assert "s3://models/models/syn/1.0.0/manifest.json" in str(err.value)
    assert "--force" in str(err.value) and err.value.exit_code == 41
    assert {k: client.stat_object("models", k).etag for k in _keys(client, "models")} == before

    replaced = publish(second, PublishRequest(s3=target(), force=True))
    assert replaced.s3 is not None and not replaced.s3.skipped
    dest = pull(replaced.s3.uri, tmp_path / "pulled", s3=target())
    assert (dest / MANIFEST_NAME).read_bytes() == (second / MANIFEST_NAME).read_bytes()


def test_server_refuses_a_wrong_sha256_checksum(s3):
    """What the upload relies on: the server recomputes x-amz-checksum-sha256 (PUT and each part)."""
    _, target, client = s3
    from botocore.exceptions import ClientError

    writer = _writer(target())
    client.make_bucket("raw")
    bad_codes = ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest")
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    with pytest.raises(ClientError) as err:
        writer.put_object(Bucket="raw", Key="single", Body=b"payload", ChecksumSHA256=wrong)
    assert err.value.response["Error"]["Code"] in bad_codes
    upload_id = writer.create_multipart_upload(Bucket="raw", Key="multi", ChecksumAlgorithm="SHA256")[
        "UploadId"
    ]
    with pytest.raises(ClientError) as err:
        writer.upload_part(
            Bucket="raw",
            Key="multi",
            UploadId=upload_id,
            PartNumber=1,
            Body=os.urandom(5 * MIB),
            ChecksumSHA256=wrong,
        )
    assert err.value.response["Error"]["Code"] in bad_codes
    writer.abort_multipart_upload(Bucket="raw", Key="multi", UploadId=upload_id)
    assert _keys(client, "raw") == []
    # and the right one is accepted
    right = base64.b64encode(hashlib.sha256(b"payload").digest()).decode()
    writer.put_object(Bucket="raw", Key="single", Body=b"payload", ChecksumSHA256=right)
    assert client.get_object("raw", "single").read() == b"payload"


def test_wrong_credentials_missing_bucket_and_dead_endpoint(s3, tmp_path):
    _, target, client = s3
    export = make_export(tmp_path / "exp", big=4096)
    bad = target(access_key="WRONGKEY", secret_key=SecretStr("wrong-secret"))
    with pytest.raises(S3AccessError) as err:
        publish(export, PublishRequest(s3=bad))
    assert "access denied" in str(err.value) and "s3://models" in str(err.value) and err.value.exit_code == 42

    with pytest.raises(S3AccessError) as err:
        publish(export, PublishRequest(s3=target("absent-bucket", create_bucket=False)))
    assert "'absent-bucket' does not exist" in str(err.value) and "--create-bucket" in str(err.value)
    assert not client.bucket_exists("absent-bucket")
    publish(export, PublishRequest(s3=target("created-bucket", create_bucket=True)))
    assert client.bucket_exists("created-bucket")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    dead = target(endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(S3AccessError) as err:
        publish(export, PublishRequest(s3=dead))
    assert f"http://127.0.0.1:{port}" in str(err.value)


def test_bad_local_inputs_upload_nothing(s3, tmp_path):
    _, target, client = s3
    with pytest.raises(ManifestError, match="no manifest"):
        publish(tmp_path, PublishRequest(s3=target()))
    export = make_export(tmp_path / "exp", big=4096)
    gguf = next(export.glob("*-F16.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"X")
    with pytest.raises(IntegrityError, match=r"F16\.gguf"):
        publish(export, PublishRequest(s3=target()))
    assert not client.bucket_exists("models") or _keys(client, "models") == []
    with pytest.raises(PublishSettingsError, match="nothing to publish"):
        publish(export, PublishRequest())
    for uri in ("http://bucket/x", "s3://Bad_Bucket/x", "s3://ab"):
        with pytest.raises(PublishSettingsError, match=r"s3://|not an s3"):
            S3Target.from_uri(uri)
    with pytest.raises(PublishSettingsError, match="pull takes"):
        pull("ftp://x/y", tmp_path / "d")
    with pytest.raises(PullError, match="no manifest there"):
        client.make_bucket("empty")
        pull("s3://empty/models/syn/1.0.0/", tmp_path / "d", s3=target())
    assert not (tmp_path / "d").exists()
    assert not list(tmp_path.glob(".d.pull-*"))


def test_tampered_object_in_bucket_caught_by_pull(s3, tmp_path):
    _, target, client = s3
    export = make_export(tmp_path / "exp", big=4096)
    result = publish(export, PublishRequest(s3=target()))
    key = result.s3.base_key + "syn-1.0.0-Q4_K_M.gguf"
    meta = client.stat_object("models", key)
    tampered = b"GGUF" + b"\0" * 4092  # same size, other bytes, same metadata
    client.put_object(
        "models", key, io.BytesIO(tampered), len(tampered), metadata=_s3.object_metadata(meta.metadata)
    )
    dest = tmp_path / "pulled"
    with pytest.raises(PullError) as err:
        pull(result.s3.uri, dest, s3=target())
    assert f"s3://models/{key}" in str(err.value) and "does not match" in str(err.value)
    assert err.value.exit_code == 44
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GGUFSHIP_S3_ENDPOINT", "https://s3.example.test:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-aws-var")
    conn = _s3.resolve_connection(S3Target(bucket="models"))
    assert (conn.endpoint, conn.secure, conn.access_key) == ("s3.example.test:9000", True, "AKIAEXAMPLE")
    assert conn.secret_key.get_secret_value() == "secret-from-aws-var"
    assert "secret-from-aws-var" not in repr(conn)
    monkeypatch.setenv("GGUFSHIP_S3_ACCESS_KEY", "OURS")
    flagged = _s3.resolve_connection(S3Target(bucket="models", endpoint="http://10.0.0.1:9000"))
    assert (flagged.endpoint, flagged.secure, flagged.access_key) == ("10.0.0.1:9000", False, "OURS")
    for var in (
        "GGUFSHIP_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "GGUFSHIP_S3_ACCESS_KEY",
    ):
        monkeypatch.delenv(var)
    with pytest.raises(PublishSettingsError, match="no S3 endpoint: set --s3-endpoint or GGUFSHIP_S3_"):
        _s3.resolve_connection(S3Target(bucket="models"))
    with pytest.raises(PublishSettingsError, match="part size"):
        _s3.resolve_connection(
            S3Target(
                bucket="models",
                endpoint="http://h:1",
                access_key="a",
                secret_key=SecretStr("b"),
                part_size=1024,
            )
        )


def test_interrupted_upload_leaves_no_object_and_rerun_succeeds(s3, tmp_path):
    state_dir, target, client = s3
    export = make_export(tmp_path / "exp", big=23 * MIB)  # 5 parts of 5 MiB
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
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and child.poll() is None:
            ready, _, _ = select.select([child.stdout], [], [], 1.0)
            if ready:
                line = child.stdout.readline().strip()
                break
        assert line == "STALLED", (
            f"child did not stall mid-upload: {line!r} "
            f"{child.stderr.read() if child.poll() is not None else ''}"
        )
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    base = "models/syn/1.0.0/"
    big_key = base + "syn-1.0.0-F16.gguf"
    visible = _keys(client, "models")
    assert big_key not in visible and base + MANIFEST_NAME not in visible
    assert [k for k, _ in _s3_write.incomplete_uploads(_writer(target()), "models", base)] == [big_key]
    with pytest.raises(PullError, match="no manifest"):
        pull("s3://models/" + base, tmp_path / "pulled", s3=target())

    result = publish(export, PublishRequest(s3=target()))
    assert result.s3 is not None and not result.s3.skipped
    assert _s3_write.incomplete_uploads(_writer(target()), "models", base) == []
    dest = pull(result.s3.uri, tmp_path / "pulled", s3=target())
    assert (dest / "syn-1.0.0-F16.gguf").read_bytes() == (export / "syn-1.0.0-F16.gguf").read_bytes()


def test_cli_publish_and_pull(s3, tmp_path, capsys):
    from ggufship.cli.main import main

    state_dir, _, _client = s3
    export = make_export(tmp_path / "exp", big=4096)
    code = main(
        ["publish", str(export), "--s3", "s3://cli-bucket/p", "--state-dir", str(state_dir), "--json"]
    )
    assert code == 42  # bucket missing, no --create-bucket
    assert "'cli-bucket' does not exist" in capsys.readouterr().err
    code = main(
        [
            "publish",
            str(export),
            "--s3",
            "s3://cli-bucket/p",
            "--state-dir",
            str(state_dir),
            "--create-bucket",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["s3"]["uri"] == "s3://cli-bucket/p/models/syn/1.0.0/" and out["s3"]["skipped"] is False
    dest = tmp_path / "pulled"
    assert main(["pull", out["s3"]["uri"], "-o", str(dest), "--state-dir", str(state_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert (dest / MANIFEST_NAME).read_bytes() == (export / MANIFEST_NAME).read_bytes()
    shutil.rmtree(dest)

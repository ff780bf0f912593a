"""Round trip on real servers: export → sign → publish (SeaweedFS S3, docker-registry, bare git)
→ pull from S3 and from OCI → verify (digests and signature) → bytes identical."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from ggufship.manifest import MANIFEST_NAME
from ggufship.publish import GitOpsTarget, PublishRequest, PullError, publish, pull
from ggufship.services import load_state
from tests.publish_fixtures import embedded_s3, make_export

pytest_plugins = ["tests.services_fixtures"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _git_log(url: str) -> list[str]:
    out = subprocess.run(
        ["git", f"--git-dir={url.removeprefix('file://')}", "log", "--format=%H", "main"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _other_export(tmp_path: Path) -> Path:
    return make_export(tmp_path / "other", name="tiny", version="1.0.0", big=4096)


def test_export_sign_publish_pull_roundtrip(services_factory, tiny_export, tmp_path):
    from ggufship.publish._oci import OciTarget
    from ggufship.sign import SigningRequest, VerificationPolicy, generate_keypair, sign_export

    state_dir, _ = services_factory(services=("s3", "registry", "git"))
    state = load_state(state_dir)
    registry = state.services["registry"].endpoint.removeprefix("http://")
    git_url = state.services["git"].endpoint

    export = tmp_path / "tiny-1.0.0"
    shutil.copytree(tiny_export, export)
    private, public = generate_keypair(tmp_path / "keys")
    sign_export(export, SigningRequest(private_key=private))
    assert (export / "model.sig").is_file()

    s3 = embedded_s3(state_dir, bucket="models", create_bucket=True)
    request = PublishRequest(
        s3=s3,
        oci=OciTarget(registry=registry, repository="models/tiny"),
        gitops=GitOpsTarget(url=git_url, environment="prod"),
    )
    result = publish(export, request)
    assert result.s3 is not None and result.oci is not None and result.gitops is not None
    assert result.s3.uri == "s3://models/models/tiny/1.0.0/"
    assert not result.s3.skipped and not result.oci.skipped and not result.gitops.skipped

    policy = VerificationPolicy(public_key=public)
    from_s3 = pull(result.s3.uri, tmp_path / "from-s3", policy=policy, s3=embedded_s3(state_dir, bucket="x"))
    from_oci = pull(f"oci://{registry}/models/tiny:1.0.0", tmp_path / "from-oci", policy=policy)
    original = _files(export)
    assert _files(from_s3) == original
    assert _files(from_oci) == original
    # pulling again into the same place (a server restart): S3 reuses it, OCI refreshes it
    assert pull(result.s3.uri, from_s3, policy=policy, s3=embedded_s3(state_dir, bucket="x")) == from_s3
    assert pull(f"oci://{registry}/models/tiny:1.0.0", from_oci, policy=policy) == from_oci
    assert _files(from_oci) == original
    other = _other_export(tmp_path)
    other_files = _files(other)
    with pytest.raises(PullError, match="another export"):
        pull(f"oci://{registry}/models/tiny:1.0.0", other)
    assert _files(other) == other_files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".other.")]

    record = yaml.safe_load(
        subprocess.run(
            ["git", f"--git-dir={git_url.removeprefix('file://')}", "show", "main:models/tiny/1.0.0.yaml"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert record["sources"] == {"s3": result.s3.uri, "oci": result.oci.reference}
    assert record["signature"]["uri"] == result.s3.uri_of("model.sig")
    assert record["signature"]["oci_referrer"] == result.oci.signature_digest
    assert {f["path"] for f in record["files"]} == {f for f in original if f.endswith((".gguf", ".md"))}
    assert record["metrics"] == {"accuracy": 0.81, "perplexity": 7.25}

    # publishing the same release again: every target says "already there"
    head = _git_log(git_url)
    again = publish(export, request)
    assert again.s3.skipped and again.oci.skipped and again.gitops.skipped
    assert _git_log(git_url) == head

    # a signature by another key is refused at pull, and nothing is left behind
    from ggufship.errors import GgufshipError

    _, other_public = generate_keypair(tmp_path / "other-keys")
    with pytest.raises(GgufshipError):
        pull(
            result.s3.uri,
            tmp_path / "wrong-key",
            policy=VerificationPolicy(public_key=other_public),
            s3=embedded_s3(state_dir, bucket="x"),
        )
    assert not (tmp_path / "wrong-key").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".wrong-key")]


def test_registry_down_stops_before_gitops(services_factory, tmp_path):
    """S3 → OCI → GitOps: when the registry is down, no release is committed to GitOps."""
    from ggufship.errors import GgufshipError
    from ggufship.publish._oci import OciTarget

    state_dir, _ = services_factory(services=("s3", "git"))
    git_url = load_state(state_dir).services["git"].endpoint
    export = make_export(tmp_path / "exp", big=4096)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = _git_log(git_url)
    request = PublishRequest(
        s3=embedded_s3(state_dir, bucket="models", create_bucket=True),
        oci=OciTarget(registry=f"127.0.0.1:{port}", repository="models/syn", timeout_s=5.0),
        gitops=GitOpsTarget(url=git_url),
    )
    with pytest.raises(GgufshipError) as err:
        publish(export, request)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert _git_log(git_url) == head
    # the S3 copy is complete and verifiable; a later run with the registry up would skip it
    dest = pull("s3://models/models/syn/1.0.0/", tmp_path / "pulled", s3=embedded_s3(state_dir, bucket="x"))
    assert (dest / MANIFEST_NAME).read_bytes() == (export / MANIFEST_NAME).read_bytes()
    with pytest.raises(PullError):
        pull("s3://models/models/syn/9.9.9/", tmp_path / "absent", s3=embedded_s3(state_dir, bucket="x"))

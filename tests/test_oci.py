"""OCI engine: push an export as a ModelPack artifact to a real ``docker-registry`` (2.8) and pull it back."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from ggufship.errors import IntegrityError, OutputError
from ggufship.integrity import sha256_file, sidecar_text, verify_export
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.publish import _modelpack as mp
from ggufship.publish import _oci as oci
from ggufship.publish._oci import (
    OciAuthError,
    OciConflictError,
    OciError,
    OciSettings,
    OciTarget,
    OciUnavailableError,
    parse_oci_uri,
    pull_export,
    push_export,
    release_tags,
)
from ggufship.services import down, load_credentials, load_state

pytest_plugins = ["tests.services_fixtures"]  # the services_factory fixture

pytestmark = [pytest.mark.timeout(300)]

ACCEPT = f"{mp.MANIFEST_MEDIA_TYPE}, {mp.INDEX_MEDIA_TYPE}"
SIGNATURE = (
    b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "note": "opaque to the OCI engine"}\n'
)


# ---------------------------------------------------------------- helpers


class Registry:
    """One running registry (htpasswd auth) from ``services_factory``, with a raw HTTP client."""

    def __init__(self, state_dir: Path) -> None:
        info = load_state(state_dir).services["registry"]
        creds = load_credentials(state_dir).registry
        self.state_dir = state_dir
        self.data_dir = info.data_dir
        self.host = f"127.0.0.1:{info.port}"
        self.auth = info.options.get("auth") == "htpasswd"
        self.username = creds.username
        self.password = creds.password
        self.http = httpx.Client(
            base_url=f"http://{self.host}",
            auth=(creds.username, creds.password.get_secret_value()) if self.auth else None,
            timeout=30,
            trust_env=False,
        )

    def target(self, repository: str = "models/tiny") -> OciTarget:
        if not self.auth:
            return OciTarget(self.host, repository)
        return OciTarget(self.host, repository, username=self.username, password=self.password)

    def manifest(self, repository: str, reference: str) -> tuple[dict[str, Any], httpx.Response]:
        response = self.http.get(f"/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT})
        assert response.status_code == 200, response.text
        return json.loads(response.content), response

    def blob(self, repository: str, digest: str) -> bytes:
        response = self.http.get(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 200, response.text
        return response.content

    def tags(self, repository: str) -> list[str]:
        response = self.http.get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []
        assert response.status_code == 200, response.text
        return list(response.json().get("tags") or [])

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.data_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


@pytest.fixture
def auth_registry(services_factory: Any) -> Any:
    """A registry behind htpasswd basic auth (each request costs a bcrypt check: slower)."""
    state_dir, _ = services_factory(name="auth", services=("registry",), registry_auth=True)
    reg = Registry(state_dir)
    yield reg
    reg.http.close()


@pytest.fixture
def registry(services_factory: Any) -> Any:
    """A registry without auth, for the tests that are not about credentials."""
    state_dir, _ = services_factory(services=("registry",))
    reg = Registry(state_dir)
    yield reg
    reg.http.close()


@pytest.fixture
def signed_export(tiny_export: Path, tmp_path: Path) -> Path:
    """A copy of the shared export with a ``model.sig`` (opaque bytes to this engine)."""
    out = tmp_path / "export" / "tiny-1.0.0"
    shutil.copytree(tiny_export, out)
    (out / mp.SIGNATURE_FILE).write_bytes(SIGNATURE)
    return out


def _altered(export_dir: Path, dest: Path, description: str) -> Path:
    """Same files, another manifest.json (description changed): a different artifact, still consistent."""
    shutil.copytree(export_dir, dest)
    data = json.loads((dest / MANIFEST_NAME).read_text())
    data["metadata"]["description"] = description
    (dest / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    verify_export(dest)
    return dest


def _leftovers(parent: Path) -> list[str]:
    """What is in ``parent`` besides the services' state dir (services_factory shares tmp_path)."""
    return (
        sorted(p.name for p in parent.iterdir() if p.name not in ("state", "auth")) if parent.exists() else []
    )


# ---------------------------------------------------------------- round trip and layout


def test_round_trip_bytes_identical(
    auth_registry: Registry, signed_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = auth_registry
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ORAS_USER", "someone-else")  # ignored: credentials are explicit only
    monkeypatch.setenv("ORAS_PASS", "not-this")

    result = push_export(signed_export, registry.target())

    manifest = Manifest.load(signed_export / MANIFEST_NAME)
    assert result.tags == ("1.0.0", "1.0.0-F16", "1.0.0-Q4_K_M") == release_tags(manifest)
    assert result.reference == f"{registry.host}/models/tiny@{result.digest}"
    assert result.signature_digest is not None
    assert not result.skipped

    pulled = tmp_path / "pulled"
    assert pull_export(f"oci://{registry.host}/models/tiny:1.0.0", pulled, registry.target()) == pulled
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in signed_export.iterdir())
    for src in signed_export.iterdir():
        assert (pulled / src.name).read_bytes() == src.read_bytes(), src.name
    verify_export(pulled)
    assert _leftovers(tmp_path) == sorted(["export", "home", "pulled"])
    assert not (home / ".docker").exists(), "oras must not write ~/.docker/config.json"
    assert list(home.iterdir()) == []


def test_artifact_layout_read_back_over_http(registry: Registry, signed_export: Path) -> None:
    result = push_export(signed_export, registry.target())
    manifest = Manifest.load(signed_export / MANIFEST_NAME)
    meta = manifest.metadata

    assert set(registry.tags("models/tiny")) == {
        "1.0.0",
        "1.0.0-F16",
        "1.0.0-Q4_K_M",
        "sha256-" + result.digest.split(":", 1)[1],
    }
    body, response = registry.manifest("models/tiny", "1.0.0")
    assert response.headers["Docker-Content-Digest"] == result.digest
    for tag in result.tags:
        assert registry.manifest("models/tiny", tag)[1].headers["Docker-Content-Digest"] == result.digest
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert body["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert body["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"

    config = json.loads(registry.blob("models/tiny", body["config"]["digest"]))
    assert config["config"]["format"] == "gguf"
    assert config["config"]["quantization"] == "F16,Q4_K_M"
    assert config["descriptor"] == {
        "name": "tiny",
        "version": "1.0.0",
        "family": manifest.source.architecture,
        "licenses": ["apache-2.0"],
        "description": "Tiny test fine-tune.",
    }
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in body["layers"]]}

    layers = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in body["layers"]}
    assert set(layers) == {p.name for p in signed_export.iterdir()} - {"model.sig"}
    for name, layer in layers.items():
        assert layer["annotations"]["org.opencontainers.image.title"] == name
        assert layer["size"] == (signed_export / name).stat().st_size
    for entry in manifest.gguf_files():
        layer = layers[entry.path]
        assert layer["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
        assert layer["digest"] == f"sha256:{entry.sha256}"
        assert layer["annotations"]["io.ggufship.quantization"] == entry.quantization
    assert layers["README.md"]["mediaType"] == "application/vnd.cncf.model.doc.v1.raw"
    assert layers["tiny-1.0.0-F16.gguf.sha256"]["mediaType"] == "application/vnd.cncf.model.doc.v1.raw"
    assert layers[MANIFEST_NAME]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"

    ann = body["annotations"]
    assert ann["org.opencontainers.image.title"] == "tiny"
    assert ann["org.opencontainers.image.version"] == "1.0.0"
    assert ann["org.opencontainers.image.licenses"] == "apache-2.0"
    assert "org.opencontainers.image.created" not in ann  # no timestamps: same export, same digest
    assert json.loads(ann["io.ggufship.hyperparameters"]) == meta["hyperparameters"]
    assert ann["io.ggufship.hyperparameter.learning_rate"] == "0.0002"
    assert ann["io.ggufship.hyperparameter.lora_r"] == "4"
    assert json.loads(ann["io.ggufship.evaluations"]) == meta["evaluations"]
    assert json.loads(ann["io.ggufship.datasets"]) == meta["datasets"]
    fingerprint = meta["datasets"][0]["fingerprint"]
    assert fingerprint.startswith("blake3:")
    assert ann["io.ggufship.dataset.fingerprints"] == f"acme/support-tickets={fingerprint}"
    assert ann["io.ggufship.base_model"] == "acme/tiny-base"
    assert ann["io.ggufship.source.checkpoint_sha256"] == manifest.source.checkpoint_sha256
    assert ann["io.ggufship.manifest.digest"] == layers[MANIFEST_NAME]["digest"]


def test_signature_referrer_found_through_the_tag_fallback(
    registry: Registry, signed_export: Path, tmp_path: Path
) -> None:
    result = push_export(signed_export, registry.target())
    assert result.signature_digest is not None

    # distribution 2.8 has no referrers API ...
    api = registry.http.get(f"/v2/models/tiny/referrers/{result.digest}", headers={"Accept": ACCEPT})
    assert api.status_code == 404
    # ... but keeps `subject` in the stored manifest, byte for byte
    sig, response = registry.manifest("models/tiny", result.signature_digest)
    assert response.headers["Docker-Content-Digest"] == result.signature_digest
    assert sig["artifactType"] == mp.ARTIFACT_TYPE_SIGNATURE
    assert sig["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    model_size = len(
        registry.http.get(f"/v2/models/tiny/manifests/{result.digest}", headers={"Accept": ACCEPT}).content
    )
    assert sig["subject"] == {
        "mediaType": mp.MANIFEST_MEDIA_TYPE,
        "digest": result.digest,
        "size": model_size,
    }
    [layer] = sig["layers"]
    assert registry.blob("models/tiny", layer["digest"]) == SIGNATURE
    # and a PUT with `subject` is accepted without the OCI 1.1 `OCI-Subject` answer header
    again = registry.http.put(
        f"/v2/models/tiny/manifests/{result.signature_digest}",
        content=response.content,
        headers={"Content-Type": mp.MANIFEST_MEDIA_TYPE},
    )
    assert again.status_code == 201
    assert again.headers["Docker-Content-Digest"] == result.signature_digest
    assert "OCI-Subject" not in again.headers

    # the referrers tag schema: an index tagged sha256-<hex of the subject>
    index, response = registry.manifest("models/tiny", "sha256-" + result.digest.split(":", 1)[1])
    assert response.headers["Content-Type"] == mp.INDEX_MEDIA_TYPE
    assert [(d["digest"], d["artifactType"]) for d in index["manifests"]] == [
        (result.signature_digest, mp.ARTIFACT_TYPE_SIGNATURE)
    ]

    out = pull_export(f"{registry.host}/models/tiny:1.0.0-Q4_K_M", tmp_path / "pulled", registry.target())
    assert (out / "model.sig").read_bytes() == SIGNATURE
    by_digest = pull_export(result.reference, tmp_path / "by-digest", registry.target())
    for src in signed_export.iterdir():
        assert (by_digest / src.name).read_bytes() == src.read_bytes(), src.name

    # unsigned export: pushed without a referrer, pulled without model.sig
    unsigned = _altered(signed_export, tmp_path / "unsigned", "unsigned variant")
    (unsigned / "model.sig").unlink()
    plain = push_export(unsigned, registry.target("models/unsigned"))
    assert plain.signature_digest is None
    out = pull_export(f"{registry.host}/models/unsigned:1.0.0", tmp_path / "plain", registry.target())
    assert not (out / "model.sig").exists()


def test_idempotent_repush_and_conflict(registry: Registry, signed_export: Path, tmp_path: Path) -> None:
    first = push_export(signed_export, registry.target())
    again = push_export(signed_export, registry.target())
    assert again.skipped and not first.skipped
    assert (again.digest, again.signature_digest, again.tags) == (
        first.digest,
        first.signature_digest,
        first.tags,
    )

    other = _altered(signed_export, tmp_path / "other", "a different build, same version")
    with pytest.raises(OciConflictError) as info:
        push_export(other, registry.target())
    message = str(info.value)
    assert f"{registry.host}/models/tiny:1.0.0 is {first.digest}" in message
    assert "force" in message
    assert info.value.exit_code == 48
    for tag in first.tags:  # nothing moved
        assert registry.manifest("models/tiny", tag)[1].headers["Docker-Content-Digest"] == first.digest

    forced = push_export(other, registry.target(), force=True)
    assert forced.digest != first.digest and not forced.skipped
    for tag in first.tags:
        assert registry.manifest("models/tiny", tag)[1].headers["Docker-Content-Digest"] == forced.digest
    out = pull_export(f"{registry.host}/models/tiny:1.0.0", tmp_path / "pulled", registry.target())
    assert json.loads((out / MANIFEST_NAME).read_text())["metadata"]["description"].startswith("a different")


def test_large_gguf_goes_up_in_chunks_with_bounded_memory(
    registry: Registry, tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF bigger than the chunk size: chunked upload, streamed download, memory ~ one chunk."""
    monkeypatch.setattr(oci, "UPLOAD_CHUNK", 1024 * 1024)
    export = tmp_path / "big" / "tiny-1.0.0"
    shutil.copytree(tiny_export, export)
    manifest = Manifest.load(export / MANIFEST_NAME)
    big = next(f for f in manifest.gguf_files() if f.quantization == "F16")
    size = 12 * 1024 * 1024 + 7
    with (export / big.path).open("wb") as fh:  # deterministic filler, written in pieces
        for i in range(size // 65536 + 1):
            fh.write(hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048)
        fh.truncate(size)
    digest, _ = sha256_file(export / big.path)
    (export / (big.path + ".sha256")).write_text(sidecar_text(digest, big.path))
    files = tuple(
        f.model_copy(update={"sha256": digest, "size": size}) if f.path == big.path else f
        for f in manifest.files
    )
    (export / MANIFEST_NAME).write_text(manifest.model_copy(update={"files": files}).to_json())
    verify_export(export)

    tracemalloc.start()
    try:
        result = push_export(export, registry.target("models/big"))
        _, push_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = pull_export(f"{registry.host}/models/big:1.0.0", tmp_path / "pulled", registry.target())
        _, pull_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert push_peak < 6 * 1024 * 1024, f"push held {push_peak} bytes for a {size}-byte file"
    assert pull_peak < 6 * 1024 * 1024, f"pull held {pull_peak} bytes for a {size}-byte file"
    assert sha256_file(out / big.path) == (digest, size)
    assert result.tags[0] == "1.0.0"


# ---------------------------------------------------------------- faults


def test_wrong_or_missing_credentials(auth_registry: Registry, signed_export: Path, tmp_path: Path) -> None:
    registry = auth_registry
    bad = OciTarget(registry.host, "models/tiny", username=registry.username, password=SecretStr("wrong"))
    started = time.monotonic()
    with pytest.raises(OciAuthError) as info:
        push_export(signed_export, bad)
    assert time.monotonic() - started < 30  # not oras-py's token-backend retries (~2 minutes)
    assert registry.host in str(info.value) and "rejected" in str(info.value)
    assert "wrong" not in str(info.value)
    assert info.value.exit_code == 46

    with pytest.raises(OciAuthError, match="requires credentials"):
        push_export(signed_export, OciTarget(registry.host, "models/tiny"))
    assert registry.tags("models/tiny") == []  # nothing was pushed

    dest = tmp_path / "pulled"
    with pytest.raises(OciAuthError, match="rejected"):
        pull_export(f"{registry.host}/models/tiny:1.0.0", dest, bad)
    assert not dest.exists()
    assert _leftovers(tmp_path) == ["export"]


def test_registry_down(services_factory: Any, signed_export: Path, tmp_path: Path) -> None:
    state_dir, _ = services_factory(services=("registry",))
    host = f"127.0.0.1:{load_state(state_dir).services['registry'].port}"
    down(state_dir)
    target = OciTarget(host, "models/tiny")
    started = time.monotonic()
    with pytest.raises(OciUnavailableError) as info:
        push_export(signed_export, target)
    assert time.monotonic() - started < 30
    assert host in str(info.value) and "unreachable" in str(info.value)
    assert info.value.exit_code == 47
    dest = tmp_path / "pulled"
    with pytest.raises(OciUnavailableError):
        pull_export(f"oci://{host}/models/tiny:1.0.0", dest, target)
    assert not dest.exists()


def test_tampered_blob_caught_on_pull(registry: Registry, signed_export: Path, tmp_path: Path) -> None:
    result = push_export(signed_export, registry.target())
    entry = next(
        f for f in Manifest.load(signed_export / MANIFEST_NAME).gguf_files() if f.quantization == "Q4_K_M"
    )
    blob = registry.blob_file(f"sha256:{entry.sha256}")
    assert blob.stat().st_size == entry.size
    junk = bytearray(blob.read_bytes())
    junk[len(junk) // 2] ^= 0xFF  # one flipped byte, same size
    blob.write_bytes(bytes(junk))

    dest = tmp_path / "pulled"
    with pytest.raises(IntegrityError) as info:
        pull_export(f"{registry.host}/models/tiny:{result.tags[0]}", dest, registry.target())
    assert entry.path in str(info.value) and entry.sha256 in str(info.value)
    assert not dest.exists()
    assert _leftovers(tmp_path) == ["export"]  # no staging directory left behind


def test_pull_refuses_a_non_empty_destination(
    registry: Registry, signed_export: Path, tmp_path: Path
) -> None:
    push_export(signed_export, registry.target())
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="busy"):
        pull_export(f"{registry.host}/models/tiny:1.0.0", dest, registry.target())
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pull_export(f"{registry.host}/models/tiny:1.0.0", empty, registry.target()) == empty
    with pytest.raises(OciError, match="not found"):
        pull_export(f"{registry.host}/models/tiny:9.9.9", tmp_path / "missing", registry.target())
    with pytest.raises(OciError, match="name a tag"):
        pull_export(f"{registry.host}/models/tiny", tmp_path / "untagged", registry.target())
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- names (no registry needed)


def test_uppercase_repository_is_refused_with_the_lowercase_form() -> None:
    with pytest.raises(OciError, match=r"'Models/Tiny'.*must be lowercase; use 'models/tiny'"):
        OciTarget("127.0.0.1:5000", "Models/Tiny")
    with pytest.raises(OciError, match="lowercase; use 'models/tiny'"):
        parse_oci_uri("oci://127.0.0.1:5000/Models/Tiny:1.0.0")
    with pytest.raises(OciError, match="not a valid OCI repository"):
        OciTarget("127.0.0.1:5000", "models//tiny")


def test_parse_oci_uri() -> None:
    digest = "sha256:" + "ab" * 32
    assert parse_oci_uri("oci://127.0.0.1:5000/models/tiny:1.0.0") == (
        "127.0.0.1:5000",
        "models/tiny",
        "1.0.0",
    )
    assert parse_oci_uri("127.0.0.1:5000/models/tiny") == ("127.0.0.1:5000", "models/tiny", "")
    assert parse_oci_uri(f"reg.example.com/a/b@{digest}") == ("reg.example.com", "a/b", digest)
    assert parse_oci_uri("localhost:5000/tiny:1.0.0-Q4_K_M") == ("localhost:5000", "tiny", "1.0.0-Q4_K_M")
    for bad, needle in (
        ("s3://bucket/x", "not an oci:// URI"),
        ("127.0.0.1:5000", "expected"),
        ("127.0.0.1:5000/tiny@sha256:zz", "digest"),
        ("127.0.0.1:5000/tiny:bad tag", "not a valid OCI tag"),
        ("bad host!/tiny:1", "registry"),
    ):
        with pytest.raises(OciError, match=needle):
            parse_oci_uri(bad)


def test_version_that_is_no_valid_tag_is_refused(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export / MANIFEST_NAME)
    with pytest.raises(OciError, match=r"version '1\.0\.0\+build\.1'"):
        release_tags(manifest.model_copy(update={"version": "1.0.0+build.1"}))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFSHIP_OCI_USERNAME", "alice")
    monkeypatch.setenv("GGUFSHIP_OCI_PASSWORD", "s3cret")
    settings = OciSettings()
    loopback = settings.target("127.0.0.1:5000", "models/tiny")
    assert loopback.plain_http and loopback.username == "alice"
    assert loopback.password is not None and loopback.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(loopback)
    assert not settings.target("registry.example.com", "models/tiny").plain_http
    with pytest.raises(OciError, match="both a username and a password"):
        OciTarget("127.0.0.1:5000", "models/tiny", username="alice")

"""Serving s3:// and oci:// models: pulled with ggufship.publish.pull, signature verified
before anything loads (real SeaweedFS S3 and docker-registry on loopback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.publish_fixtures import embedded_s3, embedded_s3_env
from tests.serve_fixtures import running_server

pytest_plugins = ["tests.services_fixtures"]


def test_serve_from_s3_and_oci_with_signature(services_factory, tiny_export, tmp_path, monkeypatch) -> None:
    publish = pytest.importorskip("ggufship.publish", reason="the publish stage is not there yet")
    oci = pytest.importorskip("ggufship.publish._oci", reason="the OCI engine is not there yet")
    from ggufship.serve import ModelVerificationError, ServeSettings, resolve_model
    from ggufship.services import load_state
    from ggufship.sign import SigningRequest, generate_keypair, sign_export

    state_dir, _ = services_factory(services=("s3", "registry"))
    for var, value in embedded_s3_env(state_dir).items():  # the CLI passes these on
        monkeypatch.setenv(var, value)
    registry = load_state(state_dir).services["registry"].endpoint.removeprefix("http://")
    export = tmp_path / "tiny-1.0.0"
    shutil.copytree(tiny_export, export)
    private, public = generate_keypair(tmp_path / "keys")
    _, wrong = generate_keypair(tmp_path / "wrong")
    sign_export(export, SigningRequest(private_key=private))
    result = publish.publish(
        export,
        publish.PublishRequest(
            s3=embedded_s3(state_dir, bucket="models", create_bucket=True),
            oci=oci.OciTarget(registry=registry, repository="models/tiny"),
        ),
    )
    s3_uri = result.s3.uri
    oci_uri = f"oci://{registry}/models/tiny:1.0.0"

    def settings(uri: str, key: Path, cache: str) -> ServeSettings:
        return ServeSettings(model=uri, public_key=key, cache_dir=tmp_path / cache, n_threads=1)

    for uri in (s3_uri, oci_uri):
        src = resolve_model(settings(uri, public, "cache"))
        assert src.quantization == "Q4_K_M" and "signature (at pull)" in src.checks
        assert src.path.read_bytes() == (export / src.path.name).read_bytes()
        with pytest.raises(ModelVerificationError, match="verification failed at pull"):
            resolve_model(settings(uri, wrong, "cache-wrong"))
        assert not any(p.suffix == ".gguf" for p in (tmp_path / "cache-wrong").rglob("*"))

    with running_server(settings(oci_uri, public, "cache-serve")) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

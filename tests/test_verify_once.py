"""Verify once, stage once (issue 12 part 1) and pulling one quantization (``pull --quant``).

Real SeaweedFS S3 and docker-registry on loopback. "Once" is pinned by counting the
bytes that go through ``hashlib.sha256`` (every hash in ggufship, and model_signing's own
file hashing, goes through it): a pull with a signature policy, and serve resolving
the pulled model, hash each file's bytes once — not once per check as before
(download, verify_export, the signature's own pass, verify_signed_export, serve).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ggufship.errors import IntegrityError
from ggufship.manifest import MANIFEST_NAME, Manifest
from tests.publish_fixtures import embedded_s3, embedded_s3_env

pytest_plugins = ["tests.services_fixtures"]

SERVED = "Q4_K_M"


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0


@contextmanager
def counting_sha256(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Counter]:
    """Count every byte hashed through ``hashlib.sha256`` while the block runs."""
    counter = _Counter()
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"", **kwargs: Any) -> None:
            self._h = real(data, **kwargs)
            counter.bytes += len(data)

        def update(self, data: Any) -> None:
            counter.bytes += memoryview(data).nbytes
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

        def digest(self) -> bytes:
            return self._h.digest()

        def copy(self) -> Any:
            return self._h.copy()

        @property
        def name(self) -> str:
            return self._h.name

        @property
        def digest_size(self) -> int:
            return self._h.digest_size

        @property
        def block_size(self) -> int:
            return self._h.block_size

    with monkeypatch.context() as m:
        m.setattr(hashlib, "sha256", Counting)
        yield counter


def _export_bytes(export: Path) -> int:
    return sum(p.stat().st_size for p in export.rglob("*") if p.is_file() and p.name != "model.sig")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_export: Path) -> Iterator[dict[str, Any]]:
    """The tiny export, signed, published to a real S3 and a real registry (one set per module)."""
    from ggufship.publish import PublishRequest, publish
    from ggufship.publish._oci import OciTarget
    from ggufship.services import ServicesSettings, down, load_state, up
    from ggufship.sign import SigningRequest, generate_keypair, sign_export
    from tests.services_fixtures import tools_missing

    missing = tools_missing(("s3", "registry"))
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    root = tmp_path_factory.mktemp("verify-once")
    state_dir = root / "state"
    up(
        ServicesSettings(
            state_dir=state_dir, services=("s3", "registry"), start_timeout_s=60.0, stop_timeout_s=10.0
        )
    )
    try:
        export = root / "tiny-1.0.0"
        shutil.copytree(tiny_export, export)
        private, public = generate_keypair(root / "keys")
        sign_export(export, SigningRequest(private_key=private))
        registry = load_state(state_dir).services["registry"].endpoint.removeprefix("http://")
        result = publish(
            export,
            PublishRequest(
                s3=embedded_s3(state_dir, bucket="models", create_bucket=True),
                oci=OciTarget(registry=registry, repository="models/tiny"),
            ),
        )
        yield {
            "state_dir": state_dir,
            "export": export,
            "public": public,
            "s3_uri": result.s3.uri,
            "oci_uri": f"oci://{registry}/models/tiny:1.0.0",
            "s3": embedded_s3(state_dir, bucket="models"),
        }
    finally:
        down(state_dir, stop_timeout_s=10.0)


@pytest.mark.parametrize("kind", ["s3", "oci"])
def test_signed_pull_and_serve_hash_every_byte_once(
    published: dict[str, Any], kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ggufship.publish import pull_verified
    from ggufship.serve import ServeSettings, resolve_model
    from ggufship.sign import VerificationPolicy

    export: Path = published["export"]
    total = _export_bytes(export)
    smallest_gguf = min(p.stat().st_size for p in export.glob("*.gguf"))
    policy = VerificationPolicy(public_key=published["public"])
    uri = published[f"{kind}_uri"]
    with counting_sha256(monkeypatch) as counter:
        verified = pull_verified(uri, tmp_path / "pulled", policy=policy, s3=published["s3"])
    assert verified.signature is not None and verified.export_dir == tmp_path / "pulled"
    assert dict(verified.digests) == {
        p.relative_to(export).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in export.rglob("*")
        if p.is_file() and p.name != "model.sig"
    }
    # every byte once: the download's streaming hash is the only pass (a second pass over
    # any GGUF, e.g. model_signing re-reading the files, would add at least its size)
    assert total <= counter.bytes < total + smallest_gguf, (counter.bytes, total)

    for var, value in embedded_s3_env(published["state_dir"]).items():  # what `ggufship serve` passes on
        monkeypatch.setenv(var, value)
    settings = ServeSettings(
        model=uri, public_key=published["public"], cache_dir=tmp_path / "cache", n_threads=1
    )
    with counting_sha256(monkeypatch) as counter:
        source = resolve_model(settings)
    assert "signature (at pull)" in source.checks and source.quantization == SERVED
    assert total <= counter.bytes < total + smallest_gguf, (counter.bytes, total)


def test_local_signed_verify_is_one_pass(
    published: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``verify_signed_export`` (the signature and every digest) reads each file once."""
    from ggufship.sign import VerificationPolicy, verify_signed_export

    export: Path = published["export"]
    total = _export_bytes(export)
    with counting_sha256(monkeypatch) as counter:
        report = verify_signed_export(export, VerificationPolicy(public_key=published["public"]))
    assert report.signature_checked and report.ok
    smallest_gguf = min(p.stat().st_size for p in export.glob("*.gguf"))
    # the files once, plus the signature's small in-toto payload (a few hundred bytes)
    assert total <= counter.bytes < total + smallest_gguf, (counter.bytes, total)


@pytest.mark.parametrize("kind", ["s3", "oci"])
def test_pull_one_quantization(published: dict[str, Any], kind: str, tmp_path: Path) -> None:
    """--quant: only that GGUF (+ manifest, signature, non-GGUF files); signature still verified;
    serve takes the partial export for that quantization only."""
    from ggufship.publish import PullError, pull_verified
    from ggufship.serve import ModelSourceError, ModelVerificationError, ServeSettings, resolve_model
    from ggufship.sign import TamperedError, VerificationPolicy, verify_export_once

    export: Path = published["export"]
    manifest = Manifest.load(export / MANIFEST_NAME)
    served = next(f for f in manifest.gguf_files() if f.quantization == SERVED)
    others = [f.path for f in manifest.gguf_files() if f.quantization != SERVED]
    assert others, "the fixture export needs more than one quantization"
    policy = VerificationPolicy(public_key=published["public"])
    dest = tmp_path / "one"
    verified = pull_verified(published[f"{kind}_uri"], dest, policy=policy, s3=published["s3"], quant=SERVED)
    assert verified.signature is not None and verified.partial
    assert sorted(verified.absent) == sorted(others)
    assert (dest / served.path).is_file() and not any((dest / p).exists() for p in others)
    expected = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()} - set(others)
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == expected
    assert (dest / "README.md").is_file() and (dest / "model.sig").is_file()

    # serve: this quantization from the partial export, signature checked; another one refused
    source = resolve_model(ServeSettings(model=str(dest), public_key=published["public"], quant=SERVED))
    assert source.path == dest / served.path and "signature" in source.checks
    other_quant = next(f.quantization for f in manifest.gguf_files() if f.quantization != SERVED)
    with pytest.raises((ModelVerificationError, ModelSourceError), match="missing"):
        resolve_model(ServeSettings(model=str(dest), public_key=published["public"], quant=other_quant))

    # exact: a changed byte in the served GGUF, or a manifest edited to match it, fails the signature
    tampered = tmp_path / "tampered"
    shutil.copytree(dest, tampered)
    data = bytearray((tampered / served.path).read_bytes())
    data[-1] ^= 0xFF
    (tampered / served.path).write_bytes(bytes(data))
    with pytest.raises(TamperedError, match=served.path):
        verify_export_once(tampered, policy, quant=SERVED)
    body = json.loads((tampered / MANIFEST_NAME).read_text())
    for entry in body["files"]:
        if entry["path"] == served.path:
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (tampered / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(TamperedError):
        verify_export_once(tampered, policy, quant=SERVED)
    # without a policy the partial export is still checked against its manifest
    with pytest.raises(IntegrityError, match="missing"):
        verify_export_once(dest, None)  # no quant: every GGUF is required

    with pytest.raises(PullError, match="available"):
        pull_verified(published[f"{kind}_uri"], tmp_path / "nope", s3=published["s3"], quant="Q2_K")
    assert not (tmp_path / "nope").exists()


def test_cli_pull_quant_as_the_chart_runs_it(
    published: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The chart's init container (templates/rollout.yaml): pull URI -o DIR --quant Q --public-key K."""
    from ggufship.cli.main import main

    monkeypatch.setenv("GGUFSHIP_STATE_DIR", str(published["state_dir"]))
    dest = tmp_path / "models" / "export"
    args = ["pull", published["oci_uri"], "-o", str(dest), "--quant", SERVED]
    assert main([*args, "--public-key", str(published["public"])]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    ggufs = sorted(p.name for p in dest.glob("*.gguf"))
    assert ggufs == [f"tiny-1.0.0-{SERVED}.gguf"]
    assert main(["pull", published["s3_uri"], "-o", str(tmp_path / "bad"), "--quant", "Q2_K"]) == 44
    assert not (tmp_path / "bad").exists()

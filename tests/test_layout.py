"""Untrusted file names (issue 13, item 1): the manifest model refuses unconfined paths, and every
join checks again. Local only (no servers); the S3/OCI pulls are in ``test_untrusted_remote.py``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggufship.errors import IntegrityError, ManifestError, UnsafePathError
from ggufship.integrity import verify_export
from ggufship.layout import (
    MANIFEST_NAME,
    check_relpath,
    confined_join,
    file_set_problems,
    path_problem,
)
from ggufship.manifest import Manifest

HOSTILE = [
    ("/etc/hostname", "absolute path"),
    ("/tmp/x/pwned", "absolute path"),
    ("../escape.gguf", "'..' segment"),
    ("sub/../../escape.gguf", "'..' segment"),
    (".", "'.' segment"),
    ("./a.gguf", "'.' segment"),
    ("", "empty path"),
    ("a//b.gguf", "empty segment"),
    ("sub/", "empty segment"),
    ("..\\escape.gguf", "backslash"),
    ("C:\\Windows\\evil.gguf", "backslash"),
    ("a\x00b.gguf", "U+0000"),
    ("a\nb.gguf", "U+000A"),
    ("evil\u202egguf.sh", "U+202E"),  # right-to-left override: a name that reads as something else
    ("\ud800.gguf", "U+D800"),  # a lone surrogate no file system can encode
    ("x" * 256, "segment longer than 255 bytes"),
    ("/".join(["d" * 200] * 6), "longer than 1024 bytes"),
]
FINE = ["a.gguf", "tiny-1.0.0-Q4_K_M.gguf", "README.md", "sub/dir/x.gguf", "modèle.gguf", "~x", "a b.gguf"]


@pytest.mark.parametrize(("value", "problem"), HOSTILE)
def test_hostile_paths_are_refused_with_the_problem_named(value: str, problem: str, tmp_path: Path) -> None:
    found = path_problem(value)
    assert found is not None and problem in found
    with pytest.raises(UnsafePathError, match="files\\[3\\]\\.path") as err:
        confined_join(tmp_path, value, what="manifest.json: files[3].path")
    assert problem in str(err.value) and err.value.exit_code == 9
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", FINE)
def test_relative_normalised_paths_are_accepted(value: str, tmp_path: Path) -> None:
    assert path_problem(value) is None
    assert confined_join(tmp_path, value, what="x") == tmp_path / value


def test_non_strings_are_refused() -> None:
    for value in (None, 3, b"a.gguf", ["a"]):
        with pytest.raises(UnsafePathError, match="not a string"):
            check_relpath(value, "layer title")


def test_a_symlink_out_of_the_root_is_refused_at_the_join(tmp_path: Path) -> None:
    root = tmp_path / "export"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "link.gguf").symlink_to(outside / "secret")
    (root / "dir").symlink_to(outside)
    (root / "inner.gguf").symlink_to(root / "sub")
    with pytest.raises(UnsafePathError, match="outside"):
        confined_join(root, "link.gguf", what="entry")
    with pytest.raises(UnsafePathError, match="outside"):
        confined_join(root, "dir/new.gguf", what="entry")  # a write through it would land outside
    assert confined_join(root, "inner.gguf", what="entry") == root / "inner.gguf"  # inside: fine


def test_file_set_problems() -> None:
    assert file_set_problems(["a.gguf", "b.gguf", "sub/c.gguf"]) == []
    problems = file_set_problems(
        ["a.gguf", "a.gguf", "A.GGUF", "manifest.json", "model.sig", "x.gguf.sha256", "b", "b/c"]
    )
    text = "\n".join(problems)
    assert "'a.gguf': listed twice" in text and "'A.GGUF': listed twice" in text
    assert "'manifest.json': reserved" in text and "'model.sig': reserved" in text
    assert "'x.gguf.sha256': names ending in .sha256 are reserved" in text
    assert "'b/c': its directory 'b' is also a file" in text
    assert "its directory 'a.gguf.sha256'" in "\n".join(file_set_problems(["a.gguf", "a.gguf.sha256/x"]))


# ---------------------------------------------------------------- the manifest model


def _manifest_data(*paths: str, name: str = "tiny", version: str = "1.0.0") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "files": [
            {
                "path": p,
                "sha256": hashlib.sha256(p.encode("utf-8", "replace")).hexdigest(),
                "size": 1,
                "kind": "gguf",
            }
            for p in paths
        ],
        "source": {"checkpoint_sha256": "0" * 64, "architecture": "a", "weights_format": "safetensors"},
    }


def _write_manifest(export: Path, data: dict[str, Any]) -> Path:
    export.mkdir(parents=True, exist_ok=True)
    path = export / MANIFEST_NAME
    path.write_text(json.dumps(data), encoding="utf-8")  # ensure_ascii: any string survives
    return path


@pytest.mark.parametrize(("value", "problem"), HOSTILE)
def test_the_manifest_model_refuses_hostile_entries(value: str, problem: str, tmp_path: Path) -> None:
    path = _write_manifest(tmp_path / "e", _manifest_data("ok.gguf", value))
    with pytest.raises(ManifestError) as err:
        Manifest.load(path)
    assert str(path) in str(err.value)
    if "\ud800" in value:  # pydantic's JSON parser already refuses a lone surrogate escape
        assert "Invalid JSON" in str(err.value)
    else:
        assert "files.1.path" in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize(
    ("paths", "problem"),
    [
        (("a.gguf", "a.gguf"), "listed twice"),
        (("a.gguf", "A.gguf"), "listed twice"),
        (("manifest.json",), "reserved"),
        (("model.sig",), "reserved"),
        (("a.gguf.sha256",), "reserved for checksum sidecars"),
        (("sub", "sub/x.gguf"), "also a file"),
    ],
)
def test_the_manifest_model_refuses_colliding_entries(paths: tuple[str, ...], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Manifest.model_validate(_manifest_data(*paths))


@pytest.mark.parametrize("bad", ["../up", "a/b", "", ".", "..", "x\x00"])
def test_name_and_version_are_one_safe_segment(bad: str) -> None:
    # they become S3 key segments (models/<name>/<version>/) and GitOps file names
    with pytest.raises(ValueError, match="name"):
        Manifest.model_validate(_manifest_data("a.gguf", name=bad))
    with pytest.raises(ValueError, match="version"):
        Manifest.model_validate(_manifest_data("a.gguf", version=bad))


# ---------------------------------------------------------------- verify and serve


def test_verify_of_a_manifest_listing_etc_hostname_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ggufship.cli.main import main

    export = tmp_path / "export"
    target = Path("/etc/hostname")
    data = _manifest_data("x.gguf")
    if target.is_file():  # the real digest and size: the old code said "ok"
        blob = target.read_bytes()
        data["files"][0].update(path=str(target), sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    else:
        data["files"][0]["path"] = str(target)
    _write_manifest(export, data)
    with pytest.raises(ManifestError, match=r"files.0.path\n.*absolute path"):
        verify_export(export)
    assert main(["verify", str(export)]) == 9
    err = capsys.readouterr().err
    assert "absolute path" in err and "Traceback" not in err


def test_verify_refuses_a_listed_file_that_is_a_symlink_out_of_the_export(tmp_path: Path) -> None:
    export = tmp_path / "export"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"GGUF secret")
    data = _manifest_data("x.gguf")
    data["files"][0].update(sha256=hashlib.sha256(b"GGUF secret").hexdigest(), size=11)
    _write_manifest(export, data)
    (export / "x.gguf").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"x\.gguf.*outside") as err:
        verify_export(export)
    assert isinstance(err.value, IntegrityError)


def _serve_settings(model: Path, tmp_path: Path) -> Any:
    from ggufship.serve import ServeSettings

    return ServeSettings(model=str(model), n_threads=1, cache_dir=tmp_path / "cache")


def test_serve_model_resolution_cannot_escape_the_export(tmp_path: Path) -> None:
    from ggufship.serve import ModelSourceError, ModelVerificationError, resolve_model

    outside = tmp_path / "elsewhere" / "model.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"GGUF not this one")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()

    listed = tmp_path / "listed"  # a manifest naming the outside file by path
    data = _manifest_data("x.gguf")
    data["files"][0].update(path="../elsewhere/model.gguf", sha256=digest, size=17, quantization="Q4_K_M")
    _write_manifest(listed, data)
    with pytest.raises(ModelSourceError, match=r"'\.\.' segment"):
        resolve_model(_serve_settings(listed, tmp_path))

    linked = tmp_path / "linked"  # a listed name that is a symlink leading outside
    data["files"][0]["path"] = "tiny-1.0.0-Q4_K_M.gguf"
    _write_manifest(linked, data)
    (linked / "tiny-1.0.0-Q4_K_M.gguf").symlink_to(outside)
    # verify-once refuses any symlink in an export; the confined join refuses one leading outside
    refused = r"symlink in an export directory|outside .*refusing to serve it"
    with pytest.raises(ModelVerificationError, match=refused):
        resolve_model(_serve_settings(linked, tmp_path))


# ---------------------------------------------------------------- property-based

_SEGMENTS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "...",
        "a",
        "b.gguf",
        "model.sig",
        "manifest.json",
        "x.sha256",
        "~",
        "C:",
        " ",
        "é",
        "x" * 255,
    ]
)
_CHARS = st.characters(exclude_categories=())  # every code point, surrogates and controls included
_HOSTILE_PATH = st.one_of(
    st.lists(_SEGMENTS, min_size=1, max_size=6).map("/".join),
    st.tuples(st.sampled_from(["", "/", "../", "./", "//", "\\", "/tmp/"]), st.text(_CHARS, max_size=40)).map(
        "".join
    ),
    st.text(_CHARS, max_size=60),
    st.text(st.sampled_from("./\\a\x00\n"), max_size=12),
)


def _inside(root: Path, path: Path) -> bool:
    # lexically, before any symlink could play a part
    return os.path.commonpath([os.path.normpath(root), os.path.normpath(path)]) == os.path.normpath(root)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_HOSTILE_PATH)
def test_any_path_is_confined_or_refused_and_writes_stay_inside(value: str, tmp_path_factory: Any) -> None:
    base = tmp_path_factory.mktemp("p")
    root = base / "root"
    root.mkdir()
    try:
        out = confined_join(root, value, what="generated")
    except UnsafePathError as exc:
        assert path_problem(value) is not None and repr(value) in str(exc)
        return
    assert path_problem(value) is None
    assert _inside(root, out) and out != root
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"x")  # an accepted name can be written, and lands inside the root
    assert sorted(p.name for p in base.iterdir()) == ["root"]
    assert out.resolve().is_relative_to(root.resolve())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(_HOSTILE_PATH, min_size=1, max_size=5))
def test_any_manifest_is_parsed_confined_or_refused_with_manifest_error(
    paths: list[str], tmp_path_factory: Any
) -> None:
    path = _write_manifest(tmp_path_factory.mktemp("m"), _manifest_data(*paths))
    try:
        manifest = Manifest.load(path)
    except ManifestError as exc:
        assert any(path_problem(p) for p in paths) or file_set_problems(paths)
        assert "\nfiles" in str(exc) or "Invalid JSON" in str(exc)
        return
    assert all(path_problem(f.path) is None for f in manifest.files)
    assert file_set_problems([f.path for f in manifest.files]) == []

"""Every path argument of every command means a path relative to the caller's working directory.

``ggufship export ck/base …`` used to fail ("ck/base is not a directory"): llama.cpp's
converter runs in a scratch directory. The CLI now makes path arguments absolute right
after parsing (``ggufship.cli.paths``), and the places that hand paths to subprocesses
(the converter, the rollout's ``serve`` processes, ``pipeline run --local``) make them
absolute themselves. One export, sign and verify run end to end from another cwd with
relative paths only; a sweep parses each command's path arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ggufship.cli.main import build_parser, main
from ggufship.cli.paths import absolute_paths, local_or_uri, pipeline_params
from ggufship.cli.settings_flags import resolve


def test_export_sign_verify_audit_with_relative_paths(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_ckpt: Path,
    release_yaml: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    (work / "ck").mkdir(parents=True)
    (work / "ck" / "base").symlink_to(llama_ckpt)
    (work / "release.yaml").write_text(release_yaml.read_text())
    (work / "data").symlink_to(release_yaml.parent / "data")
    monkeypatch.chdir(work)
    # Without an adapter the converter reads the checkpoint itself (a merge would hand it an absolute
    # scratch directory): this is the path that failed.
    args = ["export", "ck/base", "--release", "release.yaml", "-o", "out/tiny", "--name", "tiny"]
    args += ["--version", "1.0.0", "--quant", "F16", "--no-tokenizer-check", "--json"]
    (work / "out").mkdir()
    assert main(args) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["name"] == "tiny" and (work / "out" / "tiny" / "tiny-1.0.0-F16.gguf").is_file()
    assert manifest["metadata"]["license"] == "apache-2.0"  # the relative --release was read

    assert main(["keygen", "-o", "keys"]) == 0
    assert main(["sign", "out/tiny", "--private-key", "keys/ggufship.key"]) == 0
    assert (work / "out" / "tiny" / "model.sig").is_file()
    assert main(["verify", "out/tiny", "--public-key", "keys/ggufship.pub"]) == 0

    from ggufship.audit import AuditLog

    with AuditLog(work / "audit.log", key=None) as log:
        log.append({"action": "test"})
    assert main(["audit", "verify", "audit.log"]) == 0


# ---------------------------------------------------------------- the sweep over commands

SWEEP: list[list[str]] = [
    [
        "export",
        "ck",
        "-o",
        "out",
        "--name",
        "n",
        "--version",
        "1",
        "--adapter",
        "lora",
        "--release",
        "r.yaml",
    ],
    ["keygen", "-o", "keys"],
    ["sign", "out", "--private-key", "k.pem", "--certificate", "c.pem"],
    ["verify", "out", "--public-key", "k.pub"],
    ["publish", "out", "--state-dir", "state"],
    ["pull", "s3://b/models/n/1/", "-o", "dest", "--public-key", "k.pub", "--certificate-chain", "ca.pem"],
    ["serve", "model.gguf", "--cache-dir", "cache", "--api-keys-file", "keys.txt", "--audit-log", "a.log"],
    ["gate", "--state-dir", "state", "--out", "report"],
    ["gate", "report", "v/verdict.json", "--out", "again"],
    ["gate", "serve", "--state-dir", "state"],
    ["rollout", "stable-export", "canary.gguf", "--state-dir", "state", "--prompts", "p.txt"],
    ["audit", "verify", "a.log", "--head", "a.head", "--key-file", "k"],
    ["demo", "--workdir", "wd", "--checkpoint", "ck", "--adapter", "lora"],
    ["pipeline", "run", "--local", "-p", "checkpoint=ck", "--pipeline-root", "kfp", "--state-dir", "st"],
    ["up", "--state-dir", "state"],
]


def _parse(argv: list[str]) -> argparse.Namespace:
    """What ``ggufship.cli.main`` does: parse, build the command's settings model, absolute paths."""
    return absolute_paths(resolve(build_parser().parse_args(argv)))


def _paths(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in vars(args).items():
        if isinstance(value, Path) or (
            isinstance(value, list | tuple) and value and isinstance(value[0], Path)
        ):
            out[name] = value
    return out


@pytest.mark.parametrize("argv", SWEEP, ids=[" ".join(a[:2]) for a in SWEEP])
def test_every_path_argument_is_made_absolute(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = _parse(argv)
    assert _paths(args), f"{argv[0]}: no path argument parsed"  # the sweep tests something
    for name, value in _paths(args).items():
        for v in value if isinstance(value, list | tuple) else [value]:
            assert isinstance(v, Path) and v.is_absolute(), (name, v)
            assert v.parent == tmp_path or tmp_path in v.parents, (name, v)
    if argv[0] == "serve":
        assert args.model == str(tmp_path / "model.gguf")
    if argv[0] == "rollout":
        assert (args.stable, args.canary) == (str(tmp_path / "stable-export"), str(tmp_path / "canary.gguf"))


def test_uris_and_control_words_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://bucket/models/n/1/", "oci://127.0.0.1:5000/m:1", "git@host:org/repo.git", ""):
        assert local_or_uri(uri) == uri
    assert local_or_uri("repo.git") == str(tmp_path / "repo.git")
    args = _parse(["serve", "oci://127.0.0.1:5000/m:1"])
    assert args.model == "oci://127.0.0.1:5000/m:1"
    args = _parse(["rollout", "status"])
    assert args.stable == "status" and args.canary is None
    args = _parse(["publish", "out", "--gitops", "deploy.git"])
    assert args.gitops == str(tmp_path / "deploy.git")
    args = _parse(["publish", "out", "--gitops", "http://h/r.git"])
    assert args.gitops == "http://h/r.git"
    params = pipeline_params({"checkpoint": "ck", "name": "tiny", "stable_model": "s3://b/m/", "adapter": ""})
    assert params == {
        "checkpoint": str(tmp_path / "ck"),
        "name": "tiny",
        "stable_model": "s3://b/m/",
        "adapter": "",
    }


def test_rollout_serve_processes_get_absolute_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollout starts each ``ggufship serve`` with cwd=its log directory: the model path is absolute."""
    from ggufship.rollout._tracks import TrackServer

    monkeypatch.chdir(tmp_path)
    server = TrackServer(track="canary", model=Path("exports/canary"), log=tmp_path / "logs" / "canary.log")
    command = server.command(8080)
    assert command[command.index("serve") + 1] == str(tmp_path / "exports" / "canary")

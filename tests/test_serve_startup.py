"""Startup: the model is fetched and verified before anything loads; mismatches refuse to start."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggufship.integrity import sha256_file


def _settings(model: Path | str, **kw: object):
    from ggufship.serve import ServeSettings

    return ServeSettings(model=str(model), n_threads=1, **kw)


def _gguf(export: Path, quant: str = "Q4_K_M") -> Path:
    return export / f"tiny-1.0.0-{quant}.gguf"


def test_resolve_export_dir_picks_q4_k_m_and_checks_digests(tiny_export: Path) -> None:
    from ggufship.serve import resolve_model

    src = resolve_model(_settings(tiny_export))
    assert src.path == _gguf(tiny_export) and src.quantization == "Q4_K_M"
    assert (src.name, src.version) == ("tiny", "1.0.0")
    assert src.sha256 == sha256_file(src.path)[0]
    assert any("manifest" in c for c in src.checks) and any(".sha256" in c for c in src.checks)
    f16 = resolve_model(_settings(tiny_export, quant="f16"))
    assert f16.path == _gguf(tiny_export, "F16")


def test_resolve_bare_gguf_with_expected_digest(tiny_export: Path) -> None:
    from ggufship.serve import resolve_model

    digest = sha256_file(_gguf(tiny_export))[0]
    src = resolve_model(_settings(_gguf(tiny_export), expect_sha256=digest.upper()))
    assert src.sha256 == digest and any("--expect-sha256" in c for c in src.checks)


def test_wrong_expected_digest_refuses(tiny_export: Path) -> None:
    from ggufship.serve import ModelVerificationError, create_app

    with pytest.raises(ModelVerificationError, match=r"tiny-1\.0\.0-Q4_K_M\.gguf.*--expect-sha256"):
        create_app(_settings(tiny_export, expect_sha256="0" * 64))


def test_tampered_export_refuses(tiny_export: Path, tmp_path: Path) -> None:
    from ggufship.serve import ModelVerificationError, resolve_model

    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    gguf = _gguf(copy)
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    with pytest.raises(ModelVerificationError, match=r"manifest\.json") as err:
        resolve_model(_settings(copy))
    assert str(gguf) in str(err.value)
    # a bare file with only its .sha256 sidecar beside it: the sidecar catches it
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(gguf, alone / gguf.name)
    shutil.copy(copy / f"{gguf.name}.sha256", alone / f"{gguf.name}.sha256")
    with pytest.raises(ModelVerificationError, match=r"Q4_K_M\.gguf\.sha256"):
        resolve_model(_settings(alone / gguf.name))


@pytest.mark.parametrize(
    ("model", "kw", "needle"),
    [
        ("/nonexistent/model.gguf", {}, "no such file"),
        ("EXPORT", {"quant": "Q8_0"}, "no quantization 'Q8_0'"),
        ("MANIFEST", {}, "not a .gguf"),
    ],
)
def test_bad_model_source(tiny_export: Path, model: str, kw: dict, needle: str) -> None:
    from ggufship.serve import ModelSourceError, resolve_model

    path = {"EXPORT": str(tiny_export), "MANIFEST": str(tiny_export / "manifest.json")}.get(model, model)
    with pytest.raises(ModelSourceError, match=needle):
        resolve_model(_settings(path, **kw))


def test_signature_policy(tiny_export: Path, tmp_path: Path) -> None:
    sign = pytest.importorskip("ggufship.sign", reason="the sign stage is not there yet")
    from ggufship.serve import ModelVerificationError, resolve_model

    private, public = sign.generate_keypair(tmp_path / "keys")
    _, other_public = sign.generate_keypair(tmp_path / "other")
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    # unsigned export + a policy: refused
    with pytest.raises(ModelVerificationError, match="signature"):
        resolve_model(_settings(copy, public_key=public))
    sign.sign_export(copy, sign.SigningRequest(private_key=private))
    src = resolve_model(_settings(copy, public_key=public))
    assert "signature" in src.checks
    with pytest.raises(ModelVerificationError, match="signature"):
        resolve_model(_settings(copy, public_key=other_public))
    # the bare .gguf of a signed export is verified through its export
    assert "signature" in resolve_model(_settings(_gguf(copy), public_key=public)).checks


def test_cli_refuses_to_start_with_exit_code_52(tiny_export: Path) -> None:
    env = {**os.environ, "GGUFSHIP_SERVE_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "serve", str(tiny_export), "--expect-sha256", "ab" * 32],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 52, proc.stderr
    assert "does not match --expect-sha256" in proc.stderr and "refusing" in proc.stderr


def test_cli_bad_option_is_usage_error(tiny_export: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "serve", str(tiny_export), "--parallel", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "parallel" in proc.stderr


def test_settings_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from ggufship.cli import serve as cli
    from ggufship.cli.settings_flags import resolve

    monkeypatch.setenv("GGUFSHIP_SERVE_TRACK", "canary")
    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_ABORT_FRACTION", "0.25")
    monkeypatch.setenv("GGUFSHIP_SERVE_API_KEYS", '["k1"]')
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "m.gguf", "--port", "9", "--context-policy", "truncate"])
    s = resolve(args).settings  # what ggufship.cli.main does right after parsing
    assert (s.port, s.track, s.context_policy) == (9, "canary", "truncate")
    assert s.model == str(Path("m.gguf").absolute())
    assert s.fault_abort_fraction == 0.25 and s.api_keys[0].get_secret_value() == "k1"
    assert "k1" not in repr(s)


def test_api_keys_file(tmp_path: Path) -> None:
    from ggufship.serve import ServeConfigError

    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nkey-a\nkey-b\n")
    assert [k.get_secret_value() for k in _settings("m", api_keys_file=keys).accepted_keys()] == [
        "key-a",
        "key-b",
    ]
    with pytest.raises(ServeConfigError, match=re.escape(str(tmp_path / "missing"))):
        _settings("m", api_keys_file=tmp_path / "missing").accepted_keys()


def test_stop_cut() -> None:
    from ggufship.serve._engine import stop_cut

    assert stop_cut("hello wor", 0, ("world",)) == ("hello ", False)  # "wor" held back
    assert stop_cut("hello world!", 6, ("world",)) == ("", True)
    assert stop_cut("ab", 0, ()) == ("ab", False)
    assert stop_cut("xENDy", 0, ("END", "y")) == ("x", True)


def test_cli_load_failure_exits_53(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)  # verifies (no expectation: a warning), cannot load
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "serve", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 53, proc.stderr
    assert "no expected digest" in proc.stderr and "llama.cpp cannot load it" in proc.stderr

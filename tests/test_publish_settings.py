"""The publish library takes explicit settings and the environment only; the embedded default's
state dir (``ggufship up``) is read by the CLI (``ggufship.cli.embedded``), never by the library."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ggufship.cli.embedded import embedded_s3_environment, with_embedded_s3
from ggufship.cli.main import main
from ggufship.publish import PublishSettingsError, S3Target, _s3
from ggufship.services import CREDENTIALS_FILE, STATE_FILE, Credentials, ServiceInfo, ServicesState

PUBLISH_PKG = Path(__file__).resolve().parents[1] / "src" / "ggufship" / "publish"
STATE_READERS = {"load_state", "load_credentials", "resolve_state_dir", "StateDirSettings", "prometheus_url"}
S3_VARS = (
    "GGUFSHIP_S3_ENDPOINT",
    "GGUFSHIP_S3_ACCESS_KEY",
    "GGUFSHIP_S3_SECRET_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "GGUFSHIP_S3_SECURE",
)


@pytest.fixture(autouse=True)
def _no_s3_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*S3_VARS, "GGUFSHIP_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)


def fake_state(state_dir: Path, endpoint: str = "http://127.0.0.1:18333") -> Credentials:
    """A state dir as `ggufship up` writes it, with an s3 record (no process: only the files)."""
    state_dir.mkdir(parents=True)
    info = ServiceInfo(
        name="s3",
        engine="seaweedfs",
        endpoint=endpoint,
        data_dir=state_dir / "s3",
        started_at=datetime.now(UTC),
    )
    (state_dir / STATE_FILE).write_text(ServicesState().with_service(info).to_json())
    creds = Credentials.generate()
    (state_dir / CREDENTIALS_FILE).write_text(creds.to_json())
    return creds


def test_publish_package_reads_no_state_files() -> None:
    """No module of ggufship.publish imports a state-dir reader or names GGUFSHIP_STATE_DIR."""
    offenders = []
    sources = sorted(PUBLISH_PKG.rglob("*.py"))
    assert sources, f"no sources under {PUBLISH_PKG}"
    for path in sources:
        text = path.read_text()
        if "GGUFSHIP_STATE_DIR" in text or "state_dir" in text:
            offenders.append(f"{path.name}: mentions the state dir")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "ggufship.services":
                bad = {a.name for a in node.names} & STATE_READERS
                if bad:
                    offenders.append(f"{path.name}:{node.lineno}: imports {sorted(bad)}")
            if isinstance(node, ast.Attribute) and node.attr in STATE_READERS:
                offenders.append(f"{path.name}:{node.lineno}: uses {node.attr}")
    assert offenders == []


def test_library_ignores_a_state_dir_the_cli_fills_from_it(tmp_path: Path, monkeypatch) -> None:
    state = tmp_path / "state"
    creds = fake_state(state)
    monkeypatch.setenv("GGUFSHIP_STATE_DIR", str(state))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PublishSettingsError, match="set --s3-endpoint or GGUFSHIP_S3_ENDPOINT"):
        _s3.resolve_connection(S3Target(bucket="models"))

    conn = _s3.resolve_connection(with_embedded_s3(S3Target(bucket="models")))
    assert (conn.endpoint, conn.secure, conn.access_key) == ("127.0.0.1:18333", False, creds.s3.access_key)
    assert conn.secret_key == creds.s3.secret_key
    # An explicit --state-dir beats the environment's.
    other = tmp_path / "other"
    fake_state(other, endpoint="http://127.0.0.1:18444")
    assert with_embedded_s3(S3Target(bucket="b"), other).endpoint == "http://127.0.0.1:18444"


def test_flags_and_environment_beat_the_state_dir(tmp_path: Path, monkeypatch) -> None:
    state = tmp_path / "state"
    creds = fake_state(state)
    monkeypatch.setenv("GGUFSHIP_S3_ACCESS_KEY", "FROMENV")
    filled = with_embedded_s3(S3Target(bucket="b"), state)
    # The endpoint is the embedded one, so the missing secret comes from its credentials file.
    assert filled.endpoint == "http://127.0.0.1:18333" and filled.access_key == "FROMENV"
    assert filled.secret_key == creds.s3.secret_key
    # The embedded default's generated keys are never sent to an endpoint named elsewhere.
    foreign = with_embedded_s3(S3Target(bucket="b", endpoint="https://s3.example.test"), state)
    assert foreign.endpoint == "https://s3.example.test" and foreign.secret_key is None
    with pytest.raises(PublishSettingsError, match=r"no S3 credentials for https://s3\.example\.test"):
        _s3.resolve_connection(foreign)
    # Complete settings: the state dir is not even looked at (here it is not a valid one).
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / STATE_FILE).write_text("{not json")
    full = S3Target(bucket="b", endpoint="http://h:1", access_key="a", secret_key=creds.s3.secret_key)
    assert with_embedded_s3(full, tmp_path / "broken") is full
    with pytest.raises(PublishSettingsError, match="invalid state file"):
        with_embedded_s3(S3Target(bucket="b"), tmp_path / "broken")


def test_serve_gets_the_fallback_as_environment(tmp_path: Path, monkeypatch) -> None:
    state = tmp_path / "state"
    creds = fake_state(state)
    monkeypatch.setenv("GGUFSHIP_STATE_DIR", str(state))
    assert embedded_s3_environment() == {
        "GGUFSHIP_S3_ENDPOINT": "http://127.0.0.1:18333",
        "GGUFSHIP_S3_ACCESS_KEY": creds.s3.access_key,
        "GGUFSHIP_S3_SECRET_KEY": creds.s3.secret_key.get_secret_value(),
    }
    monkeypatch.setenv("GGUFSHIP_S3_ENDPOINT", "http://127.0.0.1:18333")
    monkeypatch.setenv("GGUFSHIP_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("GGUFSHIP_S3_SECRET_KEY", "s")
    assert embedded_s3_environment() == {}  # a complete environment is left alone
    monkeypatch.setenv("GGUFSHIP_STATE_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("GGUFSHIP_S3_ENDPOINT")
    assert embedded_s3_environment() == {}  # nothing to fill from: the library names what is missing


def test_cli_names_flag_env_and_state_dir_when_nothing_is_set(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty-state"
    code = main(["pull", "s3://models/models/x/1.0.0/", "-o", str(tmp_path / "d"), "--state-dir", str(empty)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "--s3-endpoint or GGUFSHIP_S3_ENDPOINT" in err and "ggufship up" in err and str(empty) in err
    assert not (tmp_path / "d").exists()

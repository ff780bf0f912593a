"""GGUFSHIP_GIT_TOKEN reaches git as an HTTP Authorization header (git's own HTTP client, a real
loopback HTTP server recording what arrives), never in a URL, a file of the clone, or an error."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufship.publish._errors import GitOpsError
from ggufship.publish._git_auth import auth_env, redact
from ggufship.publish._gitops import GitOpsTarget, _clone
from ggufship.rollback import RollbackError, RollbackRequest, rollback

TOKEN = "ghp_s3cretT0kenValue123"


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server on 127.0.0.1 that records each request's headers and answers 403."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/deploy.git", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _expected_header() -> str:
    return "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()


def test_publish_clone_sends_token_as_header(
    recording_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = recording_server
    monkeypatch.setenv("GGUFSHIP_GIT_TOKEN", TOKEN)
    with pytest.raises(GitOpsError) as info:
        _clone(GitOpsTarget(url=url), tmp_path / "clone")
    assert seen, "git made no request"
    assert seen[0]["path"].startswith("/deploy.git/info/refs")
    assert all(r.get("authorization") == _expected_header() for r in seen)
    assert TOKEN not in str(info.value) and _expected_header().split()[1] not in str(info.value)
    assert url in str(info.value)  # the error names the repository (its URL carries no token)
    # nothing on disk holds the token
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert TOKEN.encode() not in path.read_bytes(), path


def test_rollback_clone_sends_token_as_header(
    recording_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url, seen = recording_server
    monkeypatch.setenv("GGUFSHIP_GIT_TOKEN", TOKEN)
    with pytest.raises(RollbackError, match="cannot clone") as info:
        rollback(RollbackRequest(url=url, name="tiny", rejected_version="1.0.0", verdict="test"))
    assert seen and all(r.get("authorization") == _expected_header() for r in seen)
    assert TOKEN not in str(info.value) and TOKEN not in caplog.text


def test_no_token_no_header(recording_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, seen = recording_server
    monkeypatch.delenv("GGUFSHIP_GIT_TOKEN", raising=False)
    with pytest.raises(GitOpsError):
        _clone(GitOpsTarget(url=url), tmp_path / "clone")
    assert seen and all("authorization" not in r for r in seen)


def test_token_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFSHIP_GIT_TOKEN", TOKEN)
    env = auth_env("https://user:pw@git.example.com:8443/org/deploy.git")
    # scoped to the host (git-config(1): http.<url>.*), without the URL's user:password
    assert env["GIT_CONFIG_KEY_0"] == "http.https://git.example.com:8443/.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"] == f"Authorization: {_expected_header()}"
    assert auth_env("http://git.example.com/deploy.git") == {}  # never in clear over the network
    assert auth_env("file:///srv/deploy.git") == {}
    assert auth_env("git@github.com:org/deploy.git") == {}
    assert redact(f"fatal: {TOKEN} and {_expected_header()}") == "fatal: *** and Basic ***"
    monkeypatch.setenv("GGUFSHIP_GIT_USERNAME", "oauth2")
    assert base64.b64decode(auth_env("https://h/r.git")["GIT_CONFIG_VALUE_0"].split()[-1]) == (
        f"oauth2:{TOKEN}".encode()
    )

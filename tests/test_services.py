"""``ggufship up / down / status``: real SeaweedFS, docker-registry and git, on loopback only."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from ggufship.cli import services as services_cli
from ggufship.cli.settings_flags import resolve
from ggufship.errors import GgufshipError, UsageError
from ggufship.services import (
    ServicesNotRunningError,
    ServicesSettings,
    ServiceStartError,
    ServiceStateError,
    down,
    load_credentials,
    load_state,
    port_accepts,
    status,
)
from ggufship.services._process import is_alive
from tests.process_fixtures import listening_sockets, processes_under

pytest_plugins = ["tests.services_fixtures"]  # the services_factory fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

import minio  # noqa: E402

# ---------------------------------------------------------------- helpers


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def s3_client(state_dir: Path, *, access_key: str | None = None, secret_key: str | None = None):
    info = load_state(state_dir).services["s3"]
    creds = load_credentials(state_dir)
    return minio.Minio(
        f"127.0.0.1:{info.port}",
        access_key=access_key if access_key is not None else creds.s3.access_key,
        secret_key=secret_key if secret_key is not None else creds.s3.secret_key.get_secret_value(),
        secure=False,
        region="us-east-1",
    )


def wait_gone(pid: int, ticks: int | None, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, ticks):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def git(*args: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ggufship")
    sub = parser.add_subparsers(dest="command", required=True)
    services_cli.register(sub)
    args = resolve(parser.parse_args(argv))  # the settings model, as ggufship.cli.main builds it
    return int(args.func(args) or 0)


# ---------------------------------------------------------------- the whole cycle


def test_up_status_use_down(services_factory, tmp_path):
    state_dir, statuses = services_factory()
    assert [s.name for s in statuses] == ["s3", "registry", "git", "prometheus"]
    assert all(s.running for s in statuses), statuses
    assert all(s.running for s in status(state_dir))
    state = load_state(state_dir)

    # secrets: generated once, owner-only
    for secret_file in (state_dir / "credentials.json", state_dir / "seaweedfs" / "s3.json"):
        assert secret_file.stat().st_mode & 0o777 == 0o600, secret_file

    # every listening socket of every process is on 127.0.0.1, and the recorded ports are the ones open
    for info in state.services.values():
        if info.pid is None:
            continue
        # SeaweedFS opens internal ports shortly after S3 answers: poll, bounded.
        deadline = time.monotonic() + 30
        sockets = listening_sockets(info.pid)
        while not set(info.ports.values()) <= {p for _, p in sockets} and time.monotonic() < deadline:
            time.sleep(0.2)
            sockets = listening_sockets(info.pid)
        assert sockets, info.name
        assert {addr for addr, _ in sockets} == {"127.0.0.1"}, (info.name, sockets)
        assert set(info.ports.values()) <= {port for _, port in sockets}, (info.name, info.ports, sockets)

    # S3 round trip through the minio SDK with the generated credentials
    client = s3_client(state_dir)
    client.make_bucket("models")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    client.put_object("models", "tiny/1.0/model.gguf", io.BytesIO(payload), len(payload))
    response = client.get_object("models", "tiny/1.0/model.gguf")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()
    assert [b.name for b in client.list_buckets()] == ["models"]

    # the registry answers /v2/ and takes an OCI artifact push (oras)
    registry = state.services["registry"]
    code, headers = http_get(f"{registry.endpoint}/v2/")
    assert code == 200
    assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
    import oras.client as oras_client

    artifact = tmp_path / "model.gguf"
    artifact.write_bytes(b"GGUF" + os.urandom(1000))
    host = f"127.0.0.1:{registry.port}"
    client_oci = oras_client.OrasClient(hostname=host, insecure=True)
    cwd = Path.cwd()
    os.chdir(tmp_path)  # oras wants relative paths
    try:
        client_oci.push(target=f"{host}/ggufship/tiny:1.0", files=["model.gguf"], quiet=True)
        pulled = client_oci.pull(target=f"{host}/ggufship/tiny:1.0", outdir=str(tmp_path / "pulled"))
    finally:
        os.chdir(cwd)
    assert Path(pulled[0]).read_bytes() == artifact.read_bytes()

    # the GitOps remote clones with a main branch and takes a push
    remote = state.services["git"].endpoint
    work = tmp_path / "clone"
    git("clone", "--quiet", remote, str(work))
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=work) == "main"
    assert (work / "README.md").is_file()
    (work / "models").mkdir()
    (work / "models" / "tiny.yaml").write_text("name: tiny\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "--no-gpg-sign", "-m", "release tiny", cwd=work)
    git("push", "--quiet", "origin", "main", cwd=work)
    assert "release tiny" in git(
        "--git-dir", str(state.services["git"].data_dir), "log", "--format=%s", "main"
    )

    # down: processes gone, ports closed, sockets removed, records removed, data kept
    procs = [(i.name, i.pid, i.pid_start_ticks, i.ports, i.runtime_files) for i in state.services.values()]
    stopped = down(state_dir, stop_timeout_s=10)
    assert sorted(stopped) == ["prometheus", "registry", "s3"]
    for name, pid, ticks, ports, runtime_files in procs:
        if pid is not None:
            wait_gone(pid, ticks)
        for port in ports.values():
            assert not port_accepts(port), (name, port)
        for path in runtime_files:
            assert not path.exists(), path
    assert status(state_dir) == []
    assert not (state_dir / "state.json").exists()
    assert (state_dir / "credentials.json").exists()
    assert processes_under(state_dir) == []


def test_up_is_idempotent(services_factory):
    state_dir, _ = services_factory()
    before = load_state(state_dir)
    creds_before = (state_dir / "credentials.json").read_text()
    _, second = services_factory()
    after = load_state(state_dir)
    assert all(s.running for s in second)
    assert {n: (i.pid, i.endpoint) for n, i in after.services.items()} == {
        n: (i.pid, i.endpoint) for n, i in before.services.items()
    }
    assert (state_dir / "credentials.json").read_text() == creds_before


def test_status_detects_killed_process_and_up_restarts_it(services_factory):
    state_dir, _ = services_factory(services=("registry", "git"))
    old = load_state(state_dir).services["registry"]
    assert old.pid is not None
    os.killpg(old.pid, signal.SIGKILL)
    wait_gone(old.pid, old.pid_start_ticks)

    found = {s.name: s for s in status(state_dir)}
    assert found["registry"].state == "stale"
    assert str(old.pid) in found["registry"].detail
    assert found["git"].state == "running"
    assert cli("status", "--state-dir", str(state_dir)) == ServicesNotRunningError.exit_code

    _, statuses = services_factory(services=("registry", "git"))
    assert all(s.running for s in statuses)
    assert [s.name for s in statuses] == ["registry", "git"]  # restarted in place, start order kept
    new = load_state(state_dir).services["registry"]
    assert new.pid != old.pid
    assert http_get(f"{new.endpoint}/v2/")[0] == 200


def test_wrong_s3_credentials_are_refused(services_factory):
    state_dir, _ = services_factory(services=("s3",))
    s3_client(state_dir).make_bucket("models")
    creds = load_credentials(state_dir)

    with pytest.raises(minio.error.S3Error) as wrong_secret:
        s3_client(state_dir, secret_key=creds.s3.secret_key.get_secret_value() + "x").list_buckets()
    assert wrong_secret.value.code == "SignatureDoesNotMatch"

    with pytest.raises(minio.error.S3Error) as unknown_key:
        s3_client(state_dir, access_key="GGUFNOTAKEY000000000").list_buckets()
    assert unknown_key.value.code in ("InvalidAccessKeyId", "AccessDenied")

    port = load_state(state_dir).services["s3"].port
    anonymous = minio.Minio(f"127.0.0.1:{port}", secure=False, region="us-east-1")
    with pytest.raises(minio.error.S3Error) as anon:
        anonymous.put_object("models", "x", io.BytesIO(b"x"), 1)
    assert anon.value.code == "AccessDenied"


def test_registry_with_htpasswd_rejects_anonymous(services_factory):
    state_dir, statuses = services_factory(services=("registry",), registry_auth=True)
    assert all(s.running for s in statuses)
    info = load_state(state_dir).services["registry"]
    creds = load_credentials(state_dir).registry
    assert (state_dir / "registry" / "htpasswd").stat().st_mode & 0o777 == 0o600

    code, headers = http_get(f"{info.endpoint}/v2/")
    assert code == 401
    assert headers.get("Www-Authenticate", "").startswith("Basic")
    assert http_get(f"{info.endpoint}/v2/", auth=(creds.username, "not-the-password"))[0] == 401
    password = creds.password.get_secret_value()
    assert http_get(f"{info.endpoint}/v2/", auth=(creds.username, password))[0] == 200

    # asking for the registry without auth while it runs with auth is refused, not silently ignored
    with pytest.raises(ServiceStateError, match="auth"):
        services_factory(services=("registry",))


def test_s3_data_survives_down_and_up(services_factory):
    state_dir, _ = services_factory(services=("s3",))
    client = s3_client(state_dir)
    client.make_bucket("keep")
    client.put_object("keep", "a.txt", io.BytesIO(b"still here"), 10)
    down(state_dir)

    services_factory(services=("s3",))  # other ports this time, same data dir
    response = s3_client(state_dir).get_object("keep", "a.txt")
    try:
        assert response.read() == b"still here"
    finally:
        response.close()
        response.release_conn()


# ---------------------------------------------------------------- failures are bounded and clean


def test_start_timeout_is_bounded_and_rolls_back(services_factory, tmp_path):
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match=r"did not answer .* within"):
        services_factory(name="slow", services=("s3",), start_timeout_s=0.05)
    assert time.monotonic() - started < 30
    state_dir = tmp_path / "slow"
    assert load_state(state_dir).services == {}
    assert processes_under(state_dir) == []


def test_fixed_port_in_use_fails_early(services_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServiceStartError, match=str(port)):
            services_factory(services=("registry",), registry_port=port)


def test_partial_failure_stops_what_this_up_started(services_factory, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # s3 starts first, then the registry cannot get its port: s3 must be stopped again
        with pytest.raises(ServiceStartError):
            services_factory(name="partial", services=("s3", "registry"), registry_port=port)
    assert load_state(tmp_path / "partial").services == {}
    assert processes_under(tmp_path / "partial") == []


def test_corrupt_state_file_is_reported(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ServiceStateError, match=r"state\.json"):
        status(tmp_path)
    assert issubclass(ServiceStateError, GgufshipError)


def test_nothing_recorded(tmp_path):
    assert status(tmp_path / "never") == []
    assert down(tmp_path / "never") == []


def test_settings_are_validated():
    with pytest.raises(ValidationError):
        ServicesSettings(services=("s3", "ftp"))
    with pytest.raises(ValidationError):
        ServicesSettings(s3_port=80)
    assert ServicesSettings(services=("git", "s3")).services == ("s3", "git")


# ---------------------------------------------------------------- the CLI


def test_cli_up_status_down(tmp_path, capsys):
    state_dir = str(tmp_path / "cli")
    missing = [t for t in ("docker-registry", "git") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {missing}")
    assert cli("status", "--state-dir", state_dir) == ServicesNotRunningError.exit_code
    capsys.readouterr()
    try:
        assert cli("up", "--state-dir", state_dir, "--service", "registry", "--service", "git", "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert [s["name"] for s in report["services"]] == ["registry", "git"]
        assert all(s["state"] == "running" for s in report["services"])
        assert report["credentials"].endswith("credentials.json")

        assert cli("status", "--state-dir", state_dir) == 0
        table = capsys.readouterr().out
        assert "registry" in table and "running" in table and "127.0.0.1" in table

        assert cli("status", "--state-dir", state_dir, "--json") == 0
        assert json.loads(capsys.readouterr().out)["services"][0]["port"] > 0
    finally:
        assert cli("down", "--state-dir", state_dir, "--purge") == 0
    assert not Path(state_dir).exists()
    assert processes_under(Path(state_dir)) == []


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(UsageError, match="--s3-port"):  # the flag, as given
        cli("up", "--state-dir", str(tmp_path), "--s3-port", "80")


def test_state_dir_resolution_given_then_environment_then_default(monkeypatch, tmp_path):
    from ggufship.services import DEFAULT_STATE_DIR, resolve_state_dir

    monkeypatch.delenv("GGUFSHIP_STATE_DIR", raising=False)
    assert resolve_state_dir() == DEFAULT_STATE_DIR == Path(".ggufship")
    monkeypatch.setenv("GGUFSHIP_STATE_DIR", str(tmp_path / "env"))
    assert resolve_state_dir() == tmp_path / "env"
    assert resolve_state_dir(None) == tmp_path / "env"
    assert resolve_state_dir(tmp_path / "flag") == tmp_path / "flag"
    assert ServicesSettings().state_dir == tmp_path / "env"  # `up` reads the same declaration


class _RacyHttp:
    """A real ``python -m http.server`` that loses its port race (exits with the kernel's
    message) on its first ``losses`` starts."""

    name = "racy"
    engine = "python-http"

    def __init__(self, losses: int) -> None:
        self.losses = losses
        self.starts = 0

    def start(self, state_dir, ports):
        import sys
        from datetime import UTC, datetime

        from ggufship.services._process import ServiceInfo, spawn

        self.starts += 1
        port = ports.pick()
        lose = "import sys; print('listen tcp: bind: address already in use'); sys.exit(1)"
        command = (
            [sys.executable, "-c", lose]
            if self.starts <= self.losses
            else [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
        )
        log = state_dir / "logs" / "racy.log"
        pid, ticks = spawn(command, log=log, cwd=state_dir)
        return ServiceInfo(
            name=self.name,
            engine=self.engine,
            endpoint=f"http://127.0.0.1:{port}",
            pid=pid,
            pid_start_ticks=ticks,
            port=port,
            log=log,
            data_dir=state_dir,
            started_at=datetime.now(UTC),
        )

    def probe(self, info):
        from ggufship.services._process import http_status

        return http_status(info.endpoint + "/") is not None

    def stop(self, info, grace_s):
        from ggufship.services._process import stop_service

        return stop_service(info, grace_s)


@pytest.mark.parametrize(("losses", "started"), [(2, True), (3, False)])
def test_a_lost_port_race_is_retried_twice_with_new_ports(tmp_path, losses, started):
    from ggufship.services import _start

    service = _RacyHttp(losses)
    settings = ServicesSettings(state_dir=tmp_path, start_timeout_s=30, stop_timeout_s=5)
    if started:
        info = _start(service, tmp_path, settings)  # type: ignore[arg-type]
        try:
            assert service.starts == 3 and info.pid is not None and is_alive(info.pid, info.pid_start_ticks)
        finally:
            service.stop(info, 5)
        assert not is_alive(info.pid, info.pid_start_ticks)
    else:
        with pytest.raises(ServiceStartError, match="address already in use"):
            _start(service, tmp_path, settings)  # type: ignore[arg-type]
        assert service.starts == 3

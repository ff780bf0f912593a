"""The gate's options are declared once, in GateRequest/GatePolicy: the CLI flags, their help and
the gate server's query parameters are generated from the model's fields."""

from __future__ import annotations

import argparse
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from ggufship.cli import gate as gate_cli
from ggufship.cli.main import build_parser
from ggufship.cli.settings_flags import given
from ggufship.gate import GateConfigError, GatePolicy, GateRequest, make_request, request_from_query
from ggufship.options import options_of

GATE_DIR = Path(inspect.getfile(GateRequest)).parent
OPTIONS = options_of(GateRequest)


def _fields(model: type) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, GatePolicy):
            out |= _fields(ann)
        else:
            out.add(name)
    return out


@pytest.mark.parametrize("command", [["gate"], ["gate", "serve"]])
def test_every_field_has_a_flag_whose_help_is_the_description(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens otherwise
    assert {o.path[-1] for o in OPTIONS} == _fields(GateRequest)  # every field is an option
    with pytest.raises(SystemExit):
        _root().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for opt in OPTIONS:
        assert opt.flag in text, opt.name
        # the help is the field's description, then the model's default and bounds
        assert opt.help().startswith(opt.description) and opt.description, opt.name
        assert f"default: {opt.default_text()}" in opt.help(), opt.name
        assert " ".join(opt.help().split()) in text, opt.name
    assert "--max-p99 S" in text and "--two-sided, --no-two-sided" in text
    # argparse holds no default of its own: what was not given is left to the model (and env)
    args = _root().parse_args([*command, "--prometheus", "http://127.0.0.1:9"])
    assert given(args, args.gate_options) == {"prometheus_url": "http://127.0.0.1:9"}


def test_the_top_level_help_is_generated_from_the_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for opt in OPTIONS:
        assert " ".join(opt.description.split()) in text, opt.name


def test_no_flag_or_default_is_declared_outside_the_model() -> None:
    """cli/gate.py and gate/_server.py name no option flag and no query parameter by hand."""
    sources = {p: p.read_text() for p in (Path(inspect.getfile(gate_cli)), GATE_DIR / "_server.py")}
    for path, text in sources.items():
        literals = {
            n.value
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        for opt in OPTIONS:
            assert opt.flag not in literals, (path.name, opt.flag)
            if path.name == "_server.py":
                assert opt.name not in literals, (path.name, opt.name)


def test_cli_and_query_give_the_same_request() -> None:
    values = {
        "window": "90s",
        "model": "m",
        "endpoint": "chat",
        "stable_track": "s1",
        "canary_track": "c1",
        "track_label": "rollouts_pod_template_hash",
        "namespace": "ml",
        "at": "1700000000",
        "timeout": "3",
        "max_p99": "2.5",
        "max_error_ratio": "0.1",
        "alpha": "0.02",
        "analyses": "3",
        "min_samples": "7",
        "min_ks_d": "0.2",
        "min_median_shift": "0.1",
        "metrics": "ttft,latency",
        "rates": "refusal",
        "min_rate_increase": "0.05",
        "max_refusal_rate": "0.2",
        "max_bad_answer_rate": "0.3",
        "method": "quantile-series",
        "quantile": "0.9",
        "step": "1m",
        "min_series_points": "3",
    }
    query_options = {o.name for o in OPTIONS if o.query}
    assert query_options == set(values) | {"matcher", "two_sided"}  # all but --prometheus
    argv = ["gate", "--prometheus", "http://127.0.0.1:9", "--matcher", 'job="a,b"', "--matcher", 'x!="y"']
    argv += ["--two-sided"]
    for name, value in values.items():
        argv += ["--" + name.replace("_", "-"), value]
    cli = gate_cli.build_request(_root().parse_args(argv))
    query = "&".join(f"{k}={v}" for k, v in values.items())
    query += "&matcher=job%3D%22a%2Cb%22&matcher=x%21%3D%22y%22&two_sided=true"
    served = request_from_query(GateRequest(prometheus_url="http://127.0.0.1:9"), query)
    assert cli == served
    assert cli.window_s == 90.0 and cli.policy.series_step_s == 60.0 and cli.at is not None
    assert cli.matchers == ('job="a,b"', 'x!="y"') and cli.policy.planned_analyses == 3
    for name in values:  # every value differs from the default: nothing was silently dropped
        opt = next(o for o in OPTIONS if o.name == name)
        node = cli
        for key in opt.path:
            node = getattr(node, key)
        assert node != opt.default, name


def _root() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    gate_cli.register(parser.add_subparsers())
    return parser


def test_prometheus_is_not_a_query_parameter() -> None:
    with pytest.raises(GateConfigError, match="unknown query parameter 'prometheus'"):
        request_from_query(GateRequest(), "prometheus=http://evil:9090")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("window=soon", "query parameter window: Value error, duration"),
        ("two_sided=maybe", "query parameter two_sided"),
        ("analyses=0", "query parameter analyses"),
        ("model=", "query parameter model"),
    ],
)
def test_bad_query_parameters_name_the_parameter(query: str, needle: str) -> None:
    with pytest.raises(GateConfigError, match=needle):
        request_from_query(GateRequest(), query)


def test_policy_environment_variables_merge_with_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFSHIP_GATE_POLICY__ALPHA", "0.02")
    monkeypatch.setenv("GGUFSHIP_GATE_WINDOW_S", "10m")
    args = _root().parse_args(["gate", "--prometheus", "http://127.0.0.1:9", "--min-samples", "9"])
    request = gate_cli.build_request(args)
    assert (request.policy.alpha, request.policy.min_samples, request.window_s) == (0.02, 9, 600.0)
    assert make_request(None, max_p99_s=2.0).policy.alpha == 0.02


def test_state_dir_from_the_environment_need_not_record_a_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--state-dir (generated from services.StateDirSettings): the flag, else $GGUFSHIP_STATE_DIR,
    else .ggufship; only a state dir given as a flag must record a Prometheus."""
    from ggufship.cli.paths import absolute_paths
    from ggufship.cli.settings_flags import resolve

    def parse(argv: list[str]) -> argparse.Namespace:  # as ggufship.cli.main does
        return absolute_paths(resolve(_root().parse_args(argv)))

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GGUFSHIP_GATE_PROMETHEUS_URL", raising=False)
    monkeypatch.setenv("GGUFSHIP_STATE_DIR", "empty")
    for command in (["gate"], ["gate", "serve"]):
        args = parse(command)
        assert args.state_dir == tmp_path / "empty"
        assert gate_cli.build_request(args).prometheus_url == "http://127.0.0.1:9090"  # the default
        args = parse([*command, "--state-dir", "empty"])
        with pytest.raises(GateConfigError, match=r"--state-dir .*empty: no prometheus recorded"):
            gate_cli.build_request(args)
    args = parse(["gate", "serve", "--port", "0"])
    assert (args.host, args.port) == ("127.0.0.1", 0)


# ---------------------------------------------------------------- gate/ without an import cycle

# each module may import only the modules before it (the package front imports them all)
LAYERS = ["_errors", "_promql", "_model", "_stats", "_prometheus", "_report", "_analyze", "_server"]


def test_gate_modules_import_only_earlier_layers() -> None:
    assert sorted(p.stem for p in GATE_DIR.glob("_*.py") if p.stem != "__init__") == sorted(LAYERS)
    for i, name in enumerate(LAYERS):
        tree = ast.parse((GATE_DIR / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):  # module level and function level alike
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ggufship.gate"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("ggufship.gate")}
        allowed = {f"ggufship.gate.{m}" for m in LAYERS[:i]}
        assert imported <= allowed, (name, sorted(imported - allowed))


@pytest.mark.parametrize("name", LAYERS)
def test_each_gate_module_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import ggufship.gate.{name}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- `ggufship gate serve` as a process


def test_gate_serve_process_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal

    import httpx

    argv = ["gate", "serve", "--port", "0", "--timeout", "1", "--prometheus", "http://127.0.0.1:9"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggufship.cli.main", *argv, "--analyses", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # printed once bound
        assert url.startswith("http://127.0.0.1:") and url.endswith("/gate"), url
        with httpx.Client(timeout=30, trust_env=False) as http:
            assert http.get(url.removesuffix("/gate") + "/healthz").json() == {"status": "ok"}
            bad = http.get(url, params={"window": "soon"})
            assert bad.status_code == 400 and "query parameter window" in bad.json()["error"]
            body = http.get(url, params={"model": "m", "rates": ""}).json()  # Prometheus down: a verdict
            assert body["outcome"] == "inconclusive" and body["policy"]["planned_analyses"] == 3
            assert body["policy"]["rates"] == [] and body["selector"]["model"] == "m"
            assert http.get(url.removesuffix("/gate") + "/nope").status_code == 404
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (uvicorn/server.py,
        # Server.capture_signals): the exit status is the signal's, as for `ggufship serve`
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert proc.stderr is not None and "Shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

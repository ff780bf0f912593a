"""Every argument of every command is generated from a settings model (issue 12 part 3).

The walk covers the whole argparse tree of ``ggufship.cli.main.build_parser``; an argument
added by hand (not through ``settings_flags.add_model_flags``) fails it unless it is listed
below with the reason. ``--help`` shows what the model declares (description, default, bounds,
environment variable), and a bad value is reported naming the flag, with the command's exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from ggufship.cli.main import build_parser, main
from ggufship.cli.settings_flags import MARK, materialize_all, resolve
from ggufship.errors import UsageError

#: Hand-written arguments still allowed: (command path, first option string or dest) → why.
#: None: gate's CLI-only arguments (--state-dir, --json, --out, serve --host/--port, report
#: VERDICT/--out) are generated from cli/models.py and services.StateDirSettings as well.
NOT_GENERATED: dict[tuple[str, str], str] = {}
#: The root parser's own arguments (not a command's).
GLOBAL = {"-h", "--version", "-v", "-q"}


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    materialize_all(parser)  # the generated arguments of every command, not only a parsed one
    yield path, parser
    # argparse has no public API to list a parser's actions; `_actions` is the stdlib's own list.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _arguments() -> Iterator[tuple[str, argparse.Action]]:
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(
                action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction
            ):
                continue
            if not path and set(action.option_strings) & GLOBAL:
                continue
            yield " ".join(path), action


def _name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else str(action.metavar or action.dest)


def test_every_argument_is_generated_from_a_model() -> None:
    commands: set[str] = set()
    hand_written = []
    for command, action in _arguments():
        commands.add(command)
        if getattr(action, MARK, None) is None and (command, _name(action)) not in NOT_GENERATED:
            hand_written.append(f"{command} {_name(action)}")
    assert not hand_written, f"arguments not generated from a settings model: {hand_written}"
    # The walk reached every command (a subparser tree it missed would pass vacuously).
    for command in ("export", "serve", "rollout", "pipeline run", "up", "audit verify", "publish", "pull"):
        assert command in commands, command
    assert len(commands) >= 24, sorted(commands)


def test_every_generated_argument_has_help_from_its_field() -> None:
    for command, action in _arguments():
        opt = getattr(action, MARK, None)
        if opt is None or (opt.negative and action.option_strings[0] != opt.flag):
            continue  # hand-written, or the False flag of a pair (--s3-insecure)
        assert opt.description, f"{command} {_name(action)}: the field has no description"
        assert action.help and opt.description.replace("%", "%%") in action.help, (command, _name(action))


def test_no_exception_is_stale() -> None:
    """Each listed hand-written argument still exists (else the list hides nothing and must shrink)."""
    present = {(command, _name(action)) for command, action in _arguments()}
    assert set(NOT_GENERATED) <= present, set(NOT_GENERATED) - present


@pytest.mark.parametrize(
    ("argv", "flag", "fragments"),
    [
        (["serve"], "--port", ["listen port", "default: 8000", "≥ 0", "≤ 65535", "env GGUFSHIP_SERVE_PORT"]),
        (["serve"], "--track", ["{stable,canary}", "default: stable", "env GGUFSHIP_SERVE_TRACK"]),
        (["rollout"], "--analysis-count", ["override of analysis.count", "≥ 1", "≤ 100"]),
        (["evaluate"], "--min-top1", ["top token", "default: 0.9", "≤ 1"]),
        (["up"], "--timeout", ["default: 60", "> 0", "≤ 600", "env GGUFSHIP_START_TIMEOUT_S"]),
        (["down"], "--timeout", ["default: 10", "≤ 300", "env GGUFSHIP_STOP_TIMEOUT_S"]),
        (["await-canary"], "--poll", ["poll period", "default: 10", "> 0", "≤ 600"]),
        (["export"], "--quant", ["repeatable", "default: F16,Q4_K_M"]),
        (["gate", "serve"], "--port", ["port (0: a free one)", "default: 8090", "≥ 0", "≤ 65535"]),
        (["gate", "serve"], "--host", ["address to bind", "default: 127.0.0.1"]),
        (["gate"], "--state-dir", ["state.json", "default: .ggufship", "env GGUFSHIP_STATE_DIR"]),
        (["publish"], "--state-dir", ["`ggufship up`", "default: .ggufship", "env GGUFSHIP_STATE_DIR"]),
        (["gate", "report"], "VERDICT", ["a verdict.json written by `ggufship gate --out`"]),
    ],
)
def test_help_shows_what_the_model_declares(
    argv: list[str], flag: str, fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    start = text.rindex(f"{flag} ")  # the help entry, after the usage line
    entry = text[start : start + 400]
    for fragment in fragments:
        assert fragment in entry, (flag, fragment, entry)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["serve", "m.gguf", "--port", "99999"],
            2,
            "--port '99999': Input should be less than or equal to 65535",
        ),
        (["serve", "m.gguf", "--parallel", "x"], 2, "--parallel 'x': Input should be a valid integer"),
        (["await-canary", "--rollout", "r", "--poll", "0"], 2, "--poll '0': Input should be greater than 0"),
        (["up", "--service", "nope"], 2, "--service 'nope': Value error, unknown service(s) nope"),
        (["publish", "out", "--part-size-mib", "1"], 2, "--part-size-mib '1'"),
        (["rollout", "a", "b", "--steps", "5,x"], 2, "--steps '5,x'"),
        (["evaluate", "c", "--stable", "s", "--golden", "g", "--min-top1", "2"], 93, "--min-top1 '2'"),
        (["gate", "serve", "--port", "70000"], 11, "--port '70000': Input should be less than or equal"),
        (["gate", "serve", "--port", "x"], 11, "--port 'x': Input should be a valid integer"),
        (["gate", "serve", "--host", ""], 11, "--host '': String should have at least 1 character"),
    ],
)
def test_a_bad_value_names_the_flag(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing runs: the model rejects the value first
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_flags_override_the_environment_the_help_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFSHIP_SERVE_PORT", "8123")
    monkeypatch.setenv("GGUFSHIP_SERVE_TRACK", "canary")
    args = resolve(build_parser().parse_args(["serve", "m.gguf", "--track", "stable"]))
    assert (args.settings.port, args.settings.track) == (8123, "stable")
    monkeypatch.setenv("GGUFSHIP_START_TIMEOUT_S", "7")
    args = resolve(build_parser().parse_args(["up"]))
    assert args.settings.start_timeout_s == 7
    args = resolve(build_parser().parse_args(["up", "--timeout", "9"]))
    assert args.settings.start_timeout_s == 9
    # a bad value from the environment is named by its variable as well as its flag
    monkeypatch.setenv("GGUFSHIP_SERVE_PORT", "eighty")
    with pytest.raises(UsageError, match="--port / GGUFSHIP_SERVE_PORT: Input should be a valid integer"):
        resolve(build_parser().parse_args(["serve", "m.gguf"]))


def test_every_state_dir_is_the_services_declaration(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--state-dir`` has one declaration (``StateDirSettings.state_dir``): every command that
    takes it generates it from there and resolves it the same way (flag, then
    ``$GGUFSHIP_STATE_DIR``, then ``.ggufship``); publish keeps it in its one S3 help section."""
    from pathlib import Path

    from ggufship.cli.publish_options import S3_SECTION
    from ggufship.services import StateDirSettings

    declared = StateDirSettings.model_fields["state_dir"]
    commands = set()
    for command, action in _arguments():
        if "--state-dir" in action.option_strings:
            commands.add(command)
            assert repr(getattr(action, MARK).field) == repr(declared), command  # up/down/status: inherited
    assert commands >= {"gate", "gate serve", "rollout", "publish", "pull", "pipeline run", "up"}, commands
    argv = {
        "rollout": ["rollout", "status"],
        "publish": ["publish", "out"],
        "pull": ["pull", "s3://b/models/n/1/", "-o", "o"],
        "pipeline run": ["pipeline", "run", "--local"],
    }
    monkeypatch.chdir(tmp_path)
    for args in argv.values():
        monkeypatch.delenv("GGUFSHIP_STATE_DIR", raising=False)
        assert resolve(build_parser().parse_args(args)).state_dir == Path(".ggufship")
        monkeypatch.setenv("GGUFSHIP_STATE_DIR", "from-env")
        assert resolve(build_parser().parse_args(args)).state_dir == Path("from-env")
        flagged = resolve(build_parser().parse_args([*args, "--state-dir", "flag"]))
        assert flagged.state_dir == tmp_path / "flag"
    with pytest.raises(SystemExit):
        main(["publish", "--help"])
    assert capsys.readouterr().out.count(S3_SECTION) == 1


def test_choices_exclusive_sets_and_required_arguments_come_from_the_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "m.gguf", "--engine", "threads"])  # Literal["batch", "instances"]
    assert exc.value.code == 2 and "invalid choice: 'threads'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["reference", "--write", "a", "--check", "b"])  # one exclusive set, one required
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["pull", "s3://b/models/n/1/"])  # PullOptions.out has no default
    assert exc.value.code == 2 and "-o/--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["publish", "out", "--s3-secure", "--s3-insecure"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_every_spelling_the_options_module_offers() -> None:
    """One throwaway model per feature: positional lists, count, short alias, Enum choices,
    a required exclusive set, a True/False pair, a nested model respelled, env in the help."""
    import enum
    from pathlib import Path

    from pydantic import BaseModel, Field
    from pydantic_settings import BaseSettings, SettingsConfigDict

    from ggufship.cli.settings_flags import add_model_flags
    from ggufship.errors import UsageError
    from ggufship.options import option, switch

    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Inner(BaseModel):
        depth: int = Field(default=1, ge=1, le=9, description="how deep")

    class Demo(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True)

        files: tuple[Path, ...] = Field(description="input files", json_schema_extra=option(positional=True))
        verbose: int = Field(
            default=0, description="more output", json_schema_extra=option(short="-V", action="count")
        )
        color: Color = Field(default=Color.RED, description="a color")
        a: str | None = Field(
            default=None, description="one", json_schema_extra=option(exclusive="x", one_required=True)
        )
        b: str | None = Field(default=None, description="other", json_schema_extra=option(exclusive="x"))
        tls: bool | None = Field(default=None, description="TLS", json_schema_extra=option(negative="plain"))
        dry: bool = switch("do nothing")
        inner: Inner = Field(
            default_factory=Inner, json_schema_extra=option(nested={"depth": option("levels")})
        )

    parser = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    add_model_flags(parser, Demo, into="demo", spread=False)
    args = resolve(
        parser.parse_args(
            ["x.txt", "y.txt", "-VV", "--color", "blue", "--a", "1", "--plain", "--levels", "3"]
        )
    )
    demo = args.demo
    assert [p.name for p in demo.files] == ["x.txt", "y.txt"] and all(p.is_absolute() for p in demo.files)
    assert (demo.verbose, demo.color, demo.a, demo.tls, demo.dry, demo.inner.depth) == (
        2,
        Color.BLUE,
        "1",
        False,
        False,
        3,
    )
    text = " ".join(parser.format_help().split())
    assert (
        "{red,blue}" in text
        and "env DEMO_COLOR" in text
        and "--levels N how deep (default: 1; ≥ 1, ≤ 9)" in text
    )
    with pytest.raises(argparse.ArgumentError, match="not allowed with argument"):
        parser.parse_args(["x", "--a", "1", "--b", "2"])
    with pytest.raises(UsageError, match=r"--levels '0': Input should be greater than or equal to 1"):
        resolve(parser.parse_args(["x", "--a", "1", "--levels", "0"]))

"""Entry point: ``ggufship <command> ...``; maps exceptions to documented exit codes."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import signal
import sys

from ggufship.cli import audit as audit_cmd
from ggufship.cli import demo as demo_cmd
from ggufship.cli import evaluate as evaluate_cmd
from ggufship.cli import export as export_cmd
from ggufship.cli import gate as gate_cmd
from ggufship.cli import pipeline as pipeline_cmd
from ggufship.cli import publish as publish_cmd
from ggufship.cli import reference as reference_cmd
from ggufship.cli import rollout as rollout_cmd
from ggufship.cli import serve as serve_cmd
from ggufship.cli import services as services_cmd
from ggufship.cli import sign as sign_cmd
from ggufship.cli.paths import absolute_paths
from ggufship.cli.settings_flags import LazyArgumentParser, resolve
from ggufship.errors import GgufshipError

logger = logging.getLogger("ggufship")


def build_parser() -> argparse.ArgumentParser:
    from ggufship import __version__

    # Lazy: a command's generated arguments are added when that command is parsed or its help shown.
    parser = LazyArgumentParser(
        prog="ggufship",
        description="Checkpoint → verified, signed GGUF → API → canary-gated rollout.",
    )
    parser.add_argument("--version", action="version", version=f"ggufship {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One module per stage; each adds its own subcommands (imports of heavy
    # libraries happen inside the command functions, so --help stays fast).
    for module in (
        export_cmd,
        evaluate_cmd,
        sign_cmd,
        publish_cmd,
        serve_cmd,
        audit_cmd,
        gate_cmd,
        rollout_cmd,
        pipeline_cmd,
        services_cmd,
        demo_cmd,
        reference_cmd,
    ):
        module.register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    if verbose < 2:
        for noisy in ("transformers", "peft", "httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    # `kill -USR1 PID` prints every thread's stack to stderr: for a command that seems stuck.
    # (Skipped when stderr has no file descriptor, e.g. main() called under a capturing harness.)
    if hasattr(signal, "SIGUSR1"):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            faulthandler.register(signal.SIGUSR1, file=sys.stderr.fileno(), all_threads=True)
    try:
        # The command's settings model, built from its flags (bad values name the flag), then
        # every path argument made absolute.
        args = absolute_paths(resolve(args))
        # In the portable image the ggml CPU backends are loadable modules: register them before
        # any command loads a model (a no-op unless GGUFSHIP_GGML_BACKEND_DIR is set).
        from ggufship.runtime import load_ggml_backends

        load_ggml_backends()
        return int(args.func(args) or 0)
    except GgufshipError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

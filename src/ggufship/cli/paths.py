"""Path arguments mean what they mean in the caller's working directory.

Right after parsing, :func:`absolute_paths` makes every :class:`~pathlib.Path` option
and argument of every command absolute (``Path.absolute``: the cwd is prefixed, no
symlink is resolved, nothing needs to exist yet). Later stages run tools in other
working directories (llama.cpp's converter in a scratch directory, ``ggufship serve``
processes of a rollout beside their logs, KFP tasks under the pipeline root), so a
relative path must not leave the CLI.

Arguments that are a path *or* a URI (``serve MODEL``, ``rollout STABLE CANARY``,
``publish --gitops``, the path parameters of ``pipeline run --local``) go through
:func:`local_or_uri`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: ``pipeline run --local`` parameters that name local files or directories.
PIPELINE_PATH_PARAMS: frozenset[str] = frozenset(
    {
        "checkpoint",
        "adapter",
        "release",
        "signing_key",
        "certificate",
        "certificate_chain",
        "trust_config",
        "stable_model",
        "state_dir",
    }
)


def local_or_uri(text: str) -> str:
    """``text`` unchanged if it is a URI (``s3://…``, ``oci://…``, scp-style ``git@host:repo``)
    or empty, else an absolute path."""
    if not text or "://" in text or ":" in text.split("/", 1)[0]:
        return text
    return str(Path(text).expanduser().absolute())


def pipeline_params(params: dict[str, Any]) -> dict[str, Any]:
    """``pipeline run --local`` parameters with the local paths among them made absolute."""
    return {
        k: local_or_uri(v) if k in PIPELINE_PATH_PARAMS and isinstance(v, str) else v
        for k, v in params.items()
    }


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        return value.expanduser().absolute()
    if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
        return [v.expanduser().absolute() for v in value]
    return value


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Make the parsed path arguments of any command absolute, in place (and return ``args``)."""
    for name, value in vars(args).items():
        setattr(args, name, _absolute(value))
    # A path-or-URI option (``serve MODEL``, ``publish --gitops``) was made absolute when its model
    # was built (``settings_flags.resolve``: ``option(uri=True)``). ``rollout STABLE`` cannot be
    # one: it may be a control verb.
    command = getattr(args, "command", None)
    if command == "rollout" and getattr(args, "canary", None) is not None:
        # With one word (promote, abort, status) STABLE is a control verb, not a path.
        args.stable = local_or_uri(args.stable)
        args.canary = local_or_uri(args.canary)
    return args

"""The GitOps remote: a bare repository on disk, driven with real ``git``.

No process: ``start`` creates ``<state>/git/gitops.git`` (branch ``main``, one
initial commit so clones get a ``main`` branch) unless it exists, and clients
use its ``file://`` URL. The initial commit is built with plumbing commands
(``hash-object``, ``mktree``, ``commit-tree``), so no working tree and none of
the caller's hooks, templates or signing settings are involved.
"""

from __future__ import annotations

import logging
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from ggufship.services._process import (
    PortAllocator,
    Service,
    ServiceInfo,
    ServiceStartError,
    clean_env,
    require_tool,
)

logger = logging.getLogger(__name__)

BRANCH = "main"
REPO_NAME = "gitops.git"
README = """\
# GitOps remote (ggufship)

Release records are committed here as `models/<name>/<version>.yaml` by
`ggufship publish --gitops`; Argo CD (or the local rollout) follows `main`.
"""
_IDENTITY = {
    "GIT_AUTHOR_NAME": "ggufship",
    "GIT_AUTHOR_EMAIL": "ggufship@localhost",
    "GIT_COMMITTER_NAME": "ggufship",
    "GIT_COMMITTER_EMAIL": "ggufship@localhost",
    "GIT_TERMINAL_PROMPT": "0",
}


def _git(git_dir: Path, *args: str, stdin: str | None = None) -> str:
    git = require_tool("git")
    env = clean_env(("GIT_",), _IDENTITY)
    result = subprocess.run(
        [str(git), f"--git-dir={git_dir}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceStartError(f"git {' '.join(args)} in {git_dir} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def init_bare_repo(path: Path) -> bool:
    """Create the bare repo with one commit on ``main``; False if a valid one was already there."""
    if (path / "HEAD").is_file() and _has_branch(path):
        return False
    path.mkdir(parents=True, exist_ok=True)
    git = require_tool("git")
    init = subprocess.run(
        [str(git), "init", "--quiet", "--bare", f"--initial-branch={BRANCH}", str(path)],
        capture_output=True,
        text=True,
        env=clean_env(("GIT_",), _IDENTITY),
        timeout=60,
        check=False,
    )
    if init.returncode != 0:
        raise ServiceStartError(f"git init --bare {path} failed: {init.stderr.strip()}")
    blob = _git(path, "hash-object", "-w", "--stdin", stdin=README)
    tree = _git(path, "mktree", stdin=f"100644 blob {blob}\tREADME.md\n")
    commit = _git(path, "commit-tree", "--no-gpg-sign", tree, "-m", "Initialize GitOps remote")
    _git(path, "update-ref", f"refs/heads/{BRANCH}", commit, "")
    _git(path, "symbolic-ref", "HEAD", f"refs/heads/{BRANCH}")
    logger.info("created GitOps remote %s (main at %s)", path, commit[:12])
    return True


def _has_branch(path: Path) -> bool:
    try:
        _git(path, "rev-parse", "--verify", "--quiet", f"refs/heads/{BRANCH}^{{commit}}")
    except ServiceStartError:
        return False
    return True


class GitRemote(Service):
    """A bare Git repository used as the GitOps remote."""

    name = "git"
    engine = "git"

    def start(self, state_dir: Path, ports: PortAllocator) -> ServiceInfo:
        repo = (state_dir / "git" / REPO_NAME).resolve()
        init_bare_repo(repo)
        return ServiceInfo(
            name=self.name,
            engine=self.engine,
            endpoint=repo.as_uri(),
            data_dir=repo,
            started_at=datetime.now(UTC),
            options={"branch": BRANCH},
        )

    def probe(self, info: ServiceInfo) -> bool:
        return (info.data_dir / "HEAD").is_file() and _has_branch(info.data_dir)

"""Rollback written back to Git: after a canary is rejected, the deploy values name the stable again.

An aborted Argo Rollout serves the stable, but Git still names the rejected model: the
next Argo CD sync or chart change starts a new canary of it. :func:`rollback` commits
the revert in the GitOps repository — the ``model`` block of
``deploy/<environment>/<name>.values.yaml`` goes back to the last model that file named
before the rejected one (found in the file's Git history); every other key stays as it
is at the head. The commit message names the rejected digest and the verdict.

* Idempotent: when the head's values do not name the rejected release (already rolled
  back, or a newer release superseded it), nothing is committed.
* Concurrent writers: the push is never forced. A rejected push is followed by a fetch,
  the clone is moved to the new remote head and the decision is taken again from it.
* No stable: when the values' history holds no other model, :class:`NoStableModelError`
  says so and nothing is committed.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ggufship.errors import UsageError
from ggufship.publish import GitOpsError
from ggufship.publish._git_auth import auth_env, redact
from ggufship.retry import Rejected, retry_rejected

if TYPE_CHECKING:
    from git import Repo

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_TIMEOUT_S = 120.0
#: The trailer every rollback commit carries: later rollbacks never go back to a rejected model.
REJECTED_TRAILER = "Ggufship-Rejected-Sha256"
_TRAILER_RE = re.compile(rf"^{REJECTED_TRAILER}: ([0-9a-f]{{64}})\s*$", re.MULTILINE)


class RollbackError(GitOpsError):
    """The rollback commit could not be made or pushed (clone, unreadable values, push rejected)."""

    exit_code = 43


class NoStableModelError(RollbackError):
    """The deploy values' history names no model before the rejected one: nothing to go back to."""

    exit_code = 76


@dataclass(frozen=True)
class RollbackRequest:
    """Which release was rejected, where, and why.

    Give ``rejected_sha256`` (the deployed GGUF's digest) and/or ``rejected_version``;
    the head's values must match every one given, or nothing is rolled back.
    """

    url: str
    name: str
    environment: str = "dev"
    rejected_sha256: str | None = None
    rejected_version: str | None = None
    verdict: str = "canary aborted"
    branch: str = "main"
    author_name: str = "ggufship"
    author_email: str = "ggufship@localhost"
    max_attempts: int = 5
    backoff_s: float = 0.2

    @property
    def values_path(self) -> str:
        return f"deploy/{self.environment}/{self.name}.values.yaml"


@dataclass(frozen=True)
class RollbackResult:
    """What the head names now, and the commit that made it so (``rolled_back``) or that already did."""

    url: str
    branch: str
    commit: str
    values_path: str
    rolled_back: bool
    reason: str
    rejected_sha256: str
    rejected_version: str
    stable_sha256: str = ""
    stable_version: str = ""
    attempts: int = 1


def _check(request: RollbackRequest) -> None:
    if not request.url:
        raise UsageError("rollback: empty GitOps repository URL")
    for field, value in (("name", request.name), ("environment", request.environment)):
        if not _NAME_RE.match(value or ""):
            raise UsageError(f"rollback: invalid {field} {value!r}")
    if request.rejected_sha256 is None and not request.rejected_version:
        raise UsageError("rollback: give the rejected release's sha256 and/or version")
    if request.rejected_sha256 is not None and not _SHA_RE.match(request.rejected_sha256):
        raise UsageError(
            f"rollback: rejected sha256 {request.rejected_sha256!r} is not a 64-digit lowercase hex SHA256"
        )
    if not request.verdict.strip() or "\n" in request.verdict:
        raise UsageError("rollback: the verdict must be one non-empty line")
    if not 1 <= request.max_attempts <= 50:
        raise UsageError(f"rollback: max_attempts {request.max_attempts} must be between 1 and 50")


def _env(request: RollbackRequest) -> dict[str, str]:
    return {
        "GIT_AUTHOR_NAME": request.author_name,
        "GIT_AUTHOR_EMAIL": request.author_email,
        "GIT_COMMITTER_NAME": request.author_name,
        "GIT_COMMITTER_EMAIL": request.author_email,
        "GIT_TERMINAL_PROMPT": "0",
        **auth_env(request.url),  # GGUFSHIP_GIT_TOKEN as an http.extraHeader, never in a URL or file
    }


def _git_error(exc: Any) -> str:
    return redact((getattr(exc, "stderr", "") or str(exc)).strip())


def _model_block(text: str | None, where: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RollbackError(f"{where}: not valid YAML: {exc}") from exc
    if data is None:
        return None
    if not isinstance(data, dict):
        raise RollbackError(f"{where}: expected a mapping at the top level")
    model = data.get("model")
    return model if isinstance(model, dict) else None


def _show(repo: Repo, rev: str, path: str) -> str | None:
    from git import GitCommandError

    try:
        return str(repo.git.show(f"{rev}:{path}"))
    except GitCommandError:
        return None


def _matches(model: dict[str, Any] | None, request: RollbackRequest) -> bool:
    if model is None:
        return False
    if request.rejected_sha256 is not None and str(model.get("sha256")) != request.rejected_sha256:
        return False
    return not (request.rejected_version and str(model.get("version")) != request.rejected_version)


def _stable_before(repo: Repo, path: str, rejected_sha: str) -> tuple[dict[str, Any], str] | None:
    """The newest model block in ``path``'s history that is neither the rejected digest nor one an
    earlier rollback rejected (its commit's ``Ggufship-Rejected-Sha256`` trailer), and its commit."""
    log = str(repo.git.log("--format=%H%x1f%B%x1e", "--", path))
    revs: list[str] = []
    rejected = {rejected_sha}
    for chunk in log.split("\x1e"):
        rev, _, body = chunk.strip().partition("\x1f")
        if rev:
            revs.append(rev)
            rejected.update(_TRAILER_RE.findall(body))
    for rev in revs:
        model = _model_block(_show(repo, rev, path), f"{path} at {rev[:12]}")
        if model is not None and str(model.get("sha256") or "") not in rejected | {""}:
            return model, rev
    return None


def _decide(repo: Repo, request: RollbackRequest) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """Read the head: ``(new values text or '', stable model, rejected model)``; '' means nothing to do."""
    path = request.values_path
    head_text = _show(repo, "HEAD", path)
    if head_text is None:
        raise NoStableModelError(
            f"rollback: {path} does not exist in {request.url} ({request.branch}): nothing is deployed there"
        )
    current = _model_block(head_text, f"{path} in {request.url}")
    if current is None or not _matches(current, request):
        return "", None, current or {}
    rejected_sha = str(current.get("sha256") or "")
    found = _stable_before(repo, path, rejected_sha)
    if found is None:
        raise NoStableModelError(
            f"rollback: {path} in {request.url} has named no model other than the rejected "
            f"{current.get('version')} (sha256 {rejected_sha}); there is no stable to go back to"
        )
    stable, rev = found
    stable_sha = str(stable.get("sha256") or "")
    if not _SHA_RE.match(stable_sha):
        raise RollbackError(f"rollback: {path} at {rev[:12]}: model.sha256 {stable_sha!r} is not a SHA256")
    data = yaml.safe_load(head_text)
    data["model"] = stable
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True), stable, current


def _push(repo: Repo, request: RollbackRequest) -> tuple[bool, str]:
    from git import GitCommandError, PushInfo

    bad = PushInfo.ERROR | PushInfo.REJECTED | PushInfo.REMOTE_REJECTED | PushInfo.REMOTE_FAILURE
    try:
        infos = repo.remote("origin").push(
            refspec=f"HEAD:refs/heads/{request.branch}", kill_after_timeout=_GIT_TIMEOUT_S
        )
    except GitCommandError as exc:
        return False, _git_error(exc)
    failed = [i for i in infos if i.flags & bad]
    if not infos or failed or infos.error is not None:
        return False, "; ".join(i.summary.strip() for i in failed) or str(infos.error or "nothing pushed")
    remote = repo.git.ls_remote("origin", f"refs/heads/{request.branch}").split()
    if not remote or remote[0] != repo.head.commit.hexsha:
        return False, f"remote {request.branch} is not at the pushed {repo.head.commit.hexsha}"
    return True, infos[0].summary.strip()


def rollback(request: RollbackRequest, *, before_push: Callable[[int], None] | None = None) -> RollbackResult:
    """Commit the revert of the rejected release's deploy values and push it (bounded retries).

    ``before_push(attempt)`` is called before each push (tests use it to race a writer).
    """
    from git import GitCommandError, Repo

    _check(request)
    path = request.values_path
    workdir = Path(tempfile.mkdtemp(prefix="ggufship-rollback-"))
    try:
        try:
            repo = Repo.clone_from(
                request.url,
                workdir,
                branch=request.branch,
                env=_env(request),
                kill_after_timeout=_GIT_TIMEOUT_S,
            )
        except GitCommandError as exc:
            raise RollbackError(
                f"rollback: cannot clone branch {request.branch!r} of {request.url}: {_git_error(exc)}"
            ) from exc
        repo.git.update_environment(**_env(request))
        try:
            for trial in retry_rejected(request.max_attempts, request.backoff_s):
                with trial:
                    attempt = trial.retry_state.attempt_number
                    if attempt > 1:
                        # Decide again on the new remote head (another writer may have rolled back,
                        # or shipped).
                        try:
                            repo.remote("origin").fetch(request.branch, kill_after_timeout=_GIT_TIMEOUT_S)
                        except GitCommandError as exc:
                            raise RollbackError(
                                f"rollback: fetch from {request.url} failed: {_git_error(exc)}"
                            ) from exc
                        repo.git.reset("--hard", f"origin/{request.branch}")
                    text, stable, rejected = _decide(repo, request)
                    rejected_sha = str(rejected.get("sha256") or "")
                    rejected_version = str(rejected.get("version") or "")
                    if not text or stable is None:
                        head = repo.head.commit.hexsha
                        reason = (
                            f"{path} names {rejected_version or '?'} ({rejected_sha[:12] or 'no digest'}), "
                            "not the rejected release: nothing to roll back"
                        )
                        logger.info("rollback: %s (head %s)", reason, head[:12])
                        return RollbackResult(
                            request.url,
                            request.branch,
                            head,
                            path,
                            False,
                            reason,
                            request.rejected_sha256 or "",
                            request.rejected_version or "",
                            attempts=attempt,
                        )
                    stable_sha, stable_version = str(stable["sha256"]), str(stable.get("version") or "")
                    (workdir / path).write_text(text, encoding="utf-8")
                    message = (
                        f"rollback {request.name} in {request.environment}: reject {rejected_version} "
                        f"(sha256 {rejected_sha}): {request.verdict.strip()}\n\n"
                        f"The deploy values name {stable_version} (sha256 {stable_sha}) again, the model "
                        f"{path} named before {rejected_version}.\n\n"
                        f"{REJECTED_TRAILER}: {rejected_sha}\n"
                    )
                    repo.git.add("--", path)
                    repo.git.commit(
                        "--no-verify",
                        "--no-gpg-sign",
                        "--quiet",
                        "-m",
                        message,
                        f"--author={request.author_name} <{request.author_email}>",
                    )
                    if before_push is not None:
                        before_push(attempt)
                    ok, summary = _push(repo, request)
                    if ok:
                        commit = repo.head.commit.hexsha
                        logger.info(
                            "rollback: %s back to %s (%s); pushed %s (attempt %d)",
                            path,
                            stable_version,
                            stable_sha[:12],
                            commit[:12],
                            attempt,
                        )
                        return RollbackResult(
                            request.url,
                            request.branch,
                            commit,
                            path,
                            True,
                            f"{rejected_version} rejected: {request.verdict.strip()}",
                            rejected_sha,
                            rejected_version,
                            stable_sha,
                            stable_version,
                            attempt,
                        )
                    logger.info(
                        "rollback: push rejected (attempt %d/%d): %s", attempt, request.max_attempts, summary
                    )
                    raise Rejected(summary)
        except Rejected:
            pass
        raise RollbackError(
            f"rollback: push of {path} to {request.url} ({request.branch}) still rejected after "
            f"{request.max_attempts} attempts"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

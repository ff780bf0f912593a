"""The GitOps engine: one commit per release on the deploy repository, pushed without force.

The commit adds ``models/<name>/<version>.yaml`` (digests, URIs, signature
reference, evaluation metrics) and updates ``deploy/<environment>/<name>.values.yaml``
(the values the chart reads: which model file to fetch, from where, with which
digest). Both files are rendered from the manifest and the publish results, with
no timestamps, so publishing the same release again changes nothing and commits
nothing.

Pushing races other publishers. A rejected push (non-fast-forward) is followed
by fetch + rebase and another push, with jittered exponential back-off and a
bounded number of attempts. When the rebase conflicts (typically two versions of
one model both updating the same values file), the rebase is aborted, the clone
reset to the new remote head, and both files regenerated from it — the values
file keeps whatever else the other commit changed. Push results are checked
explicitly (GitPython reports a rejected push in flags, it does not raise), and
the remote branch is read back to confirm it points at our commit.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ggufship.manifest import Manifest, ManifestFile
from ggufship.publish._errors import GitOpsError, PublishConflictError, PublishSettingsError
from ggufship.publish._git_auth import auth_env, redact
from ggufship.retry import Rejected, retry_rejected

if TYPE_CHECKING:
    from git import Repo

    from ggufship.publish._s3 import S3PublishResult

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "ggufship.release/v1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_GIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GitOpsTarget:
    """The deploy repository and how to commit to it.

    ``message`` is a format string with ``{name}``, ``{version}``, ``{environment}``
    and ``{sha256}`` (of the deployed file). ``quantization`` picks the file the
    values point at (default ``Q4_K_M`` when exported, else the first GGUF).
    ``workdir``: where to clone (default a temporary directory, removed after).
    """

    url: str
    branch: str = "main"
    environment: str = "dev"
    author_name: str = "ggufship"
    author_email: str = "ggufship@localhost"
    message: str = "release {name} {version} to {environment}"
    quantization: str | None = None
    max_attempts: int = 5
    backoff_s: float = 0.2
    workdir: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class GitOpsResult:
    """The commit that carries the release (or the head that already did, when ``skipped``)."""

    url: str
    branch: str
    commit: str
    record_path: str
    values_path: str
    attempts: int
    rebase_conflicts: int
    skipped: bool


@dataclass(frozen=True)
class ReleaseLocations:
    """Where the release's bytes are, for the record: S3 and/or OCI results (either may be None)."""

    s3: S3PublishResult | None = None
    oci: Any | None = None


def _check_target(target: GitOpsTarget) -> None:
    if not target.url:
        raise PublishSettingsError("gitops: empty repository URL")
    if not _NAME_RE.match(target.environment):
        raise PublishSettingsError(f"gitops: invalid environment name {target.environment!r}")
    if not _BRANCH_RE.match(target.branch) or ".." in target.branch or target.branch.endswith((".lock", "/")):
        raise PublishSettingsError(f"gitops: invalid branch name {target.branch!r}")
    if not 1 <= target.max_attempts <= 50:
        raise PublishSettingsError(f"gitops: max_attempts {target.max_attempts} must be between 1 and 50")
    if not target.author_name.strip() or "@" not in target.author_email:
        raise PublishSettingsError(
            f"gitops: invalid author {target.author_name!r} <{target.author_email}> "
            "(need a name and an e-mail)"
        )
    try:
        target.message.format(name="n", version="v", environment="e", sha256="s")
    except (KeyError, IndexError, ValueError) as exc:
        raise PublishSettingsError(
            f"gitops: commit message template {target.message!r}: {exc!r} "
            "(fields: {name}, {version}, {environment}, {sha256})"
        ) from exc


# ---------------------------------------------------------------- rendering


def deployed_file(manifest: Manifest, quantization: str | None) -> ManifestFile:
    ggufs = manifest.gguf_files()
    if not ggufs:
        raise GitOpsError(f"{manifest.name} {manifest.version}: the manifest lists no GGUF file to deploy")
    wanted = quantization or ("Q4_K_M" if any(f.quantization == "Q4_K_M" for f in ggufs) else None)
    if wanted is None:
        return ggufs[0]
    for f in ggufs:
        if f.quantization == wanted:
            return f
    raise GitOpsError(
        f"{manifest.name} {manifest.version}: no {wanted} GGUF in the manifest "
        f"(exported: {', '.join(str(f.quantization) for f in ggufs)})"
    )


def _oci_reference(oci: Any) -> str | None:
    if oci is None:
        return None
    reference = getattr(oci, "reference", None)
    digest = getattr(oci, "digest", None)
    if reference and digest and "@" not in str(reference):
        return f"{reference}@{digest}"
    return str(reference) if reference else None


def render_record(
    manifest: Manifest, manifest_sha256: str, where: ReleaseLocations, signature: dict[str, Any] | None
) -> str:
    """``models/<name>/<version>.yaml``: everything a deployer needs, nothing volatile."""
    s3 = where.s3
    files = []
    for f in manifest.files:
        item: dict[str, Any] = {"path": f.path, "sha256": f.sha256, "size": f.size, "kind": f.kind}
        if f.quantization:
            item["quantization"] = f.quantization
        if s3 is not None:
            item["uri"] = s3.uri_of(f.path)
        files.append(item)
    sources: dict[str, Any] = {}
    if s3 is not None:
        sources["s3"] = s3.uri
    oci_ref = _oci_reference(where.oci)
    if oci_ref:
        sources["oci"] = oci_ref
    sig: dict[str, Any] | None = None
    if signature is not None:
        sig = dict(signature)
        if s3 is not None:
            sig["uri"] = s3.uri_of(signature["file"])
        oci_sig = getattr(where.oci, "signature_digest", None) if where.oci is not None else None
        if oci_sig:
            sig["oci_referrer"] = str(oci_sig)
    evaluations = manifest.metadata.get("evaluations") or []
    metrics: dict[str, Any] = {}
    for ev in evaluations:
        if isinstance(ev, dict):
            metrics.update(ev.get("metrics") or {})
    record = {
        "schema": RECORD_SCHEMA,
        "name": manifest.name,
        "version": manifest.version,
        "base_model": manifest.base_model,
        "manifest_sha256": manifest_sha256,
        "source_checkpoint_sha256": manifest.source.checkpoint_sha256,
        "sources": sources,
        "files": files,
        "signature": sig,
        "metrics": metrics,
        "evaluations": evaluations,
    }
    return yaml.safe_dump(record, sort_keys=False, allow_unicode=True)


def render_values(
    existing: str | None,
    manifest: Manifest,
    deployed: ManifestFile,
    where: ReleaseLocations,
    record_path: str,
    signature: dict[str, Any] | None,
    values_path: str,
) -> str:
    """The deploy values with their ``model`` block set to this release; other keys are kept."""
    data: dict[str, Any] = {}
    if existing:
        try:
            loaded = yaml.safe_load(existing)
        except yaml.YAMLError as exc:
            raise GitOpsError(f"{values_path}: not valid YAML in the deploy repository: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise GitOpsError(f"{values_path}: expected a mapping at the top level")
        data = dict(loaded or {})
    if where.s3 is not None:
        uri = where.s3.uri
    elif where.oci is not None:
        uri = f"oci://{_oci_reference(where.oci)}"
    else:
        uri = None
    model: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "uri": uri,
        "file": deployed.path,
        "sha256": deployed.sha256,
        "quantization": deployed.quantization,
        "record": record_path,
    }
    oci_ref = _oci_reference(where.oci)
    if oci_ref:
        model["oci"] = oci_ref
    model["signature"] = signature["file"] if signature else None
    data["model"] = model
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- git


@contextlib.contextmanager
def _clone_dir(target: GitOpsTarget) -> Iterator[Path]:
    if target.workdir is not None:
        path = Path(target.workdir)
        if path.exists() and any(path.iterdir()):
            raise PublishSettingsError(f"gitops workdir {path}: exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ggufship-gitops-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _env(target: GitOpsTarget) -> dict[str, str]:
    return {
        "GIT_AUTHOR_NAME": target.author_name,
        "GIT_AUTHOR_EMAIL": target.author_email,
        "GIT_COMMITTER_NAME": target.author_name,
        "GIT_COMMITTER_EMAIL": target.author_email,
        "GIT_TERMINAL_PROMPT": "0",
        **auth_env(target.url),  # GGUFSHIP_GIT_TOKEN as an http.extraHeader, never in a URL or file
    }


def _clone(target: GitOpsTarget, path: Path) -> Repo:
    from git import GitCommandError, Repo

    try:
        repo = Repo.clone_from(
            target.url, path, branch=target.branch, env=_env(target), kill_after_timeout=_GIT_TIMEOUT_S
        )
    except GitCommandError as exc:
        raise GitOpsError(
            f"gitops: cannot clone branch {target.branch!r} of {target.url}: "
            f"{redact((exc.stderr or str(exc)).strip())}"
        ) from exc
    repo.git.update_environment(**_env(target))
    with repo.config_writer() as cfg:
        cfg.set_value("commit", "gpgsign", "false")
        cfg.set_value("user", "name", target.author_name)
        cfg.set_value("user", "email", target.author_email)
    return repo


def _push(repo: Repo, target: GitOpsTarget) -> tuple[bool, str]:
    """Push HEAD to the branch (never forced); True only if the remote confirms our commit."""
    from git import GitCommandError, PushInfo

    head = repo.head.commit.hexsha
    bad = PushInfo.ERROR | PushInfo.REJECTED | PushInfo.REMOTE_REJECTED | PushInfo.REMOTE_FAILURE
    try:
        infos = repo.remote("origin").push(
            refspec=f"HEAD:refs/heads/{target.branch}", kill_after_timeout=_GIT_TIMEOUT_S
        )
    except GitCommandError as exc:
        return False, redact((exc.stderr or str(exc)).strip())
    if not infos:
        return False, "git push reported nothing"
    failed = [i for i in infos if i.flags & bad]
    if failed or infos.error is not None:
        return False, "; ".join(i.summary.strip() for i in failed) or str(infos.error)
    remote = _remote_head(repo, target)
    if remote != head:
        return False, f"remote {target.branch} is at {remote}, not at the pushed {head}"
    return True, infos[0].summary.strip()


def _remote_head(repo: Repo, target: GitOpsTarget) -> str | None:
    out = repo.git.ls_remote("origin", f"refs/heads/{target.branch}")
    return out.split()[0] if out.strip() else None


def _sync(repo: Repo, target: GitOpsTarget) -> bool:
    """Fetch and rebase onto the remote branch; False (rebase aborted, clone reset) on a conflict."""
    from git import GitCommandError

    origin = f"origin/{target.branch}"
    try:
        repo.remote("origin").fetch(target.branch, kill_after_timeout=_GIT_TIMEOUT_S)
    except GitCommandError as exc:
        raise GitOpsError(
            f"gitops: fetch from {target.url} failed: {redact((exc.stderr or str(exc)).strip())}"
        ) from exc
    try:
        repo.git.rebase(origin)
        return True
    except GitCommandError as exc:
        logger.info(
            "gitops: rebase onto the new %s conflicts; regenerating from it (%s)",
            origin,
            redact(exc.stderr or "").strip().splitlines()[-1:] or "",
        )
        with contextlib.suppress(GitCommandError):
            repo.git.rebase("--abort")
        repo.git.reset("--hard", origin)
        return False


def publish_gitops(
    manifest: Manifest,
    manifest_sha256: str,
    target: GitOpsTarget,
    where: ReleaseLocations,
    signature: dict[str, Any] | None = None,
    *,
    _before_push: Any = None,
) -> GitOpsResult:
    """Commit the release record and deploy values, push with bounded fetch/rebase retries."""
    _check_target(target)
    deployed = deployed_file(manifest, target.quantization)
    record_path = f"models/{manifest.name}/{manifest.version}.yaml"
    values_path = f"deploy/{target.environment}/{manifest.name}.values.yaml"
    record = render_record(manifest, manifest_sha256, where, signature)
    message = target.message.format(
        name=manifest.name, version=manifest.version, environment=target.environment, sha256=deployed.sha256
    )
    actor = f"{target.author_name} <{target.author_email}>"
    with _clone_dir(target) as workdir:
        repo = _clone(target, workdir)
        rebase_conflicts = 0
        need_commit = True
        try:
            for trial in retry_rejected(target.max_attempts, target.backoff_s):
                with trial:
                    attempt = trial.retry_state.attempt_number
                    if attempt > 1:
                        clean = _sync(repo, target)
                        need_commit = not clean
                        if not clean:
                            rebase_conflicts += 1
                        elif repo.head.commit.hexsha == _remote_head(repo, target):
                            # Our change was already upstream (identical commit content): rebase dropped it.
                            need_commit = True
                    if need_commit:
                        changed = _write_release(
                            repo,
                            workdir,
                            record,
                            record_path,
                            values_path,
                            manifest,
                            deployed,
                            where,
                            signature,
                            target.force,
                        )
                        if not changed:
                            head = repo.head.commit.hexsha
                            logger.info(
                                "gitops: %s already records %s %s (head %s); nothing to commit",
                                target.url,
                                manifest.name,
                                manifest.version,
                                head[:12],
                            )
                            return GitOpsResult(
                                target.url,
                                target.branch,
                                head,
                                record_path,
                                values_path,
                                attempt,
                                rebase_conflicts,
                                skipped=True,
                            )
                        # The git CLI, not repo.index: GitPython's index.add changes the process's cwd,
                        # which is not safe with other threads. No hooks, no signing, author as configured.
                        repo.git.add("--", record_path, values_path)
                        repo.git.commit(
                            "--no-verify", "--no-gpg-sign", "--quiet", "-m", message, f"--author={actor}"
                        )
                    if _before_push is not None:
                        _before_push(attempt)
                    ok, summary = _push(repo, target)
                    if ok:
                        commit = repo.head.commit.hexsha
                        logger.info(
                            "gitops: pushed %s to %s %s (attempt %d)",
                            commit[:12],
                            target.url,
                            target.branch,
                            attempt,
                        )
                        return GitOpsResult(
                            target.url,
                            target.branch,
                            commit,
                            record_path,
                            values_path,
                            attempt,
                            rebase_conflicts,
                            skipped=False,
                        )
                    logger.info(
                        "gitops: push to %s %s rejected (attempt %d/%d): %s",
                        target.url,
                        target.branch,
                        attempt,
                        target.max_attempts,
                        summary,
                    )
                    raise Rejected(summary)
        except Rejected as exc:
            raise GitOpsError(
                f"gitops: push of {record_path} to {target.url} ({target.branch}) still rejected after "
                f"{target.max_attempts} attempts: {exc}"
            ) from None
    raise GitOpsError(f"gitops: gave up on {target.url}")  # pragma: no cover (the loop returns or raises)


def _write_release(
    repo: Repo,
    workdir: Path,
    record: str,
    record_path: str,
    values_path: str,
    manifest: Manifest,
    deployed: ManifestFile,
    where: ReleaseLocations,
    signature: dict[str, Any] | None,
    force: bool,
) -> bool:
    """Write both files from the current HEAD; False if HEAD already records exactly this release.

    An identical record means the release was published before: nothing is written,
    and the values are left alone (re-publishing an old version does not roll back).
    """
    record_file = workdir / record_path
    values_file = workdir / values_path
    if record_file.exists():
        current = record_file.read_text(encoding="utf-8")
        if current == record:
            return False  # this release is already recorded; its values were set by its own commit
        if not force:
            raise PublishConflictError(
                f"gitops: {record_path} in {repo.remotes.origin.url} already records {manifest.name} "
                f"{manifest.version} with other content (other digests or locations); publish a new "
                "version, or replace it with --force"
            )
    existing_values = values_file.read_text(encoding="utf-8") if values_file.exists() else None
    values = render_values(existing_values, manifest, deployed, where, record_path, signature, values_path)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    values_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(record, encoding="utf-8")
    values_file.write_text(values, encoding="utf-8")
    return bool(repo.git.status("--porcelain", "--", record_path, values_path).strip())

"""Pipeline inputs given as ``s3://bucket/prefix`` or taken from Git: fetched into a local directory
before a step uses them.

The KFP ``checkpoint``, ``adapter`` and ``release`` parameters are either a local (or
mounted volume) path or an ``s3://`` URI; ``release`` may instead be a path in a Git
repository at a revision (``release_repo``, ``release_revision``: what the Argo Events
Sensor sends for a push to the release repository), see :func:`fetch_git_revision`.
An ``s3://`` input is downloaded with the minio SDK (credentials from the environment
only, as the publish step gets them: ``GGUFSHIP_S3_*`` / ``AWS_*``; the local runner
puts the embedded services' there) into a fresh directory:

* every object listed under the prefix is fetched; each key below the prefix must be a
  relative, normalised path (:func:`ggufship.layout.confined_join`);
* each object must arrive with exactly the size the listing gave, and, where the ETag
  is a plain MD5 (a single-part upload), with that MD5; a ``*.safetensors`` file must be
  as long as its own header says (a truncated upload is refused, not exported);
* a missing prefix, an empty one, or a checkpoint without ``config.json`` (an adapter
  without ``adapter_config.json``) is refused. Every error names the URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import subprocess
from pathlib import Path

from ggufship.layout import confined_join
from ggufship.pipeline.steps import PipelineStepError

logger = logging.getLogger(__name__)

#: At most this many objects under one input prefix (a checkpoint has tens).
MAX_OBJECTS = 10_000
CHUNK_SIZE = 1 << 20
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")

#: Seconds a git clone/checkout of the release repository may take.
GIT_TIMEOUT_S = 600.0
_REVISION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._/-]{0,199}$")

#: The file that marks a directory as this kind of input.
MARKERS = {"checkpoint": "config.json", "adapter": "adapter_config.json"}


class InputFetchError(PipelineStepError):
    """An ``s3://`` or Git pipeline input is missing, empty, truncated or not what the parameter needs."""


def is_s3(value: str) -> bool:
    return value.startswith("s3://")


def fetch_s3_prefix(uri: str, dest: Path) -> Path:
    """Download every object under ``uri`` (``s3://bucket/prefix``) into ``dest`` (created, must be empty)."""
    from minio.error import S3Error

    from ggufship.publish._errors import PublishError
    from ggufship.publish._s3 import S3Target, client_for, resolve_connection, s3_errors

    try:
        target = S3Target.from_uri(uri)
        conn = resolve_connection(target)
    except PublishError as exc:
        raise InputFetchError(f"{uri}: {exc}") from exc
    bucket, prefix = target.bucket, target.prefix
    base = f"{prefix}/" if prefix else ""
    client = client_for(conn)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise InputFetchError(f"{uri}: download directory {dest} is not empty")
    try:
        with s3_errors(conn, bucket, base or None, "list"):
            if not client.bucket_exists(bucket):
                raise InputFetchError(f"{uri}: bucket {bucket!r} does not exist at {conn.url}")
            listed = []
            for obj in client.list_objects(bucket, prefix=base, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                listed.append((obj.object_name, int(obj.size or 0), (obj.etag or "").strip('"').lower()))
                if len(listed) > MAX_OBJECTS:
                    raise InputFetchError(f"{uri}: more than {MAX_OBJECTS} objects under the prefix")
    except PublishError as exc:
        raise InputFetchError(f"{uri}: {exc}") from exc
    if not listed:
        raise InputFetchError(f"{uri}: no objects under this prefix at {conn.url} (missing or empty)")
    for key, size, etag in listed:
        rel = key[len(base) :]
        local = confined_join(dest, rel, what=f"{uri}: object {key!r}")
        local.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5(usedforsecurity=False)
        got = 0
        try:
            with s3_errors(conn, bucket, key, "download"):
                response = client.get_object(bucket, key)
                try:
                    with local.open("wb") as out:
                        for chunk in response.stream(CHUNK_SIZE):
                            got += len(chunk)
                            if got > size:
                                raise InputFetchError(
                                    f"{uri}: object {key!r} is larger than the {size} bytes listed"
                                )
                            md5.update(chunk)
                            out.write(chunk)
                finally:
                    response.close()
                    response.release_conn()
        except S3Error as exc:  # pragma: no cover - s3_errors maps these
            raise InputFetchError(f"{uri}: object {key!r}: {exc}") from exc
        except PublishError as exc:
            raise InputFetchError(f"{uri}: {exc}") from exc
        if got != size:
            raise InputFetchError(f"{uri}: object {key!r}: {got} bytes received, {size} listed (truncated)")
        if _MD5_ETAG.match(etag) and md5.hexdigest() != etag:
            raise InputFetchError(
                f"{uri}: object {key!r}: MD5 {md5.hexdigest()} does not match its ETag {etag} (corrupted)"
            )
        if local.suffix == ".safetensors":
            _check_safetensors(local, f"{uri}: object {key!r}")
    logger.info("fetched %d objects from %s into %s", len(listed), uri, dest)
    return dest


def _check_safetensors(path: Path, where: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data the header places."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputFetchError(f"{where}: {size} bytes, too short for a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise InputFetchError(f"{where}: safetensors header of {n} bytes exceeds the file (truncated)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputFetchError(f"{where}: safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InputFetchError(f"{where}: safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InputFetchError(f"{where}: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise InputFetchError(
            f"{where}: {size} bytes but its header places data up to byte {8 + n + end} (truncated)"
        )


def resolve_dir_input(value: str, kind: str, workdir: Path) -> Path:
    """A local directory for the ``checkpoint``/``adapter`` parameter: the path itself, or the
    fetched ``s3://`` prefix (which must hold the kind's marker file, :data:`MARKERS`)."""
    if not is_s3(value):
        return Path(value)
    dest = fetch_s3_prefix(value, workdir / kind)
    marker = MARKERS[kind]
    if not (dest / marker).is_file():
        raise InputFetchError(
            f"{value}: not a {kind} — no {marker} directly under the prefix "
            f"(found: {', '.join(sorted(p.name for p in dest.iterdir())[:10])})"
        )
    return dest


def fetch_git_revision(repo: str, revision: str, dest: Path) -> Path:
    """Clone ``repo`` into ``dest`` (created, must be empty) and check out ``revision``
    (a commit, tag or branch; empty: the remote's default branch) detached.

    ``GGUFSHIP_GIT_TOKEN`` authenticates to an ``https://`` repository as for the GitOps
    publish (an ``http.extraHeader`` in git's environment, never in the URL or a file:
    :mod:`ggufship.publish._git_auth`). Raises :class:`InputFetchError` naming the
    repository and revision when the clone fails or the revision is not a commit there.
    Returns ``dest``.
    """
    from ggufship.publish._git_auth import auth_env, redact

    where = f"{repo}@{revision or 'HEAD'}"
    if not repo:
        raise InputFetchError("release_repo is empty")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise InputFetchError(f"{where}: release_revision {revision!r} is not a commit, tag or branch name")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise InputFetchError(f"{where}: checkout directory {dest} is not empty")
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", **auth_env(repo)}

    def git(*args: str, cwd: Path | None = None) -> str:
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=cwd,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise InputFetchError(f"{where}: git {args[0]} took longer than {GIT_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            detail = redact(lines[-1]) if lines else f"exit status {done.returncode}"
            raise InputFetchError(f"{where}: git {args[0]} failed: {detail}")
        return done.stdout.strip()

    git("clone", "--quiet", "--no-checkout", "--", repo, str(dest))
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{revision or 'HEAD'}^{{commit}}", cwd=dest)
    except InputFetchError as exc:
        raise InputFetchError(f"{where}: no such commit, tag or branch in the repository") from exc
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit, cwd=dest)
    logger.info("release repository %s at %s (commit %s) in %s", repo, revision or "HEAD", commit, dest)
    return dest


def resolve_release_input(value: str, workdir: Path, *, repo: str = "", revision: str = "") -> Path:
    """A local file for the ``release`` parameter.

    * ``repo`` given: ``value`` is the spec's path in that Git repository (e.g.
      ``releases/<name>-<version>.yaml``), checked out at ``revision``
      (:func:`fetch_git_revision`); the golden set beside it comes from the same checkout.
    * ``s3://bucket/prefix/release.yaml``: every object under ``prefix/`` is fetched (the
      golden set beside the spec is resolved relative to it) and the spec's local path returned.
    * otherwise a local (or mounted volume) path, returned as it is.
    """
    if repo:
        if is_s3(value):
            raise InputFetchError(f"{value}: give either an s3:// release or release_repo {repo}, not both")
        where = f"{repo}@{revision or 'HEAD'}"
        checkout = fetch_git_revision(repo, revision, workdir / "release-repo")
        spec = confined_join(checkout, value, what=f"{where}: release {value!r}")
        if not spec.is_file():
            raise InputFetchError(f"{where}: no file {value!r} in the repository at that revision")
        return spec
    if revision:
        raise InputFetchError(f"release_revision {revision!r} given without release_repo")
    if not is_s3(value):
        return Path(value)
    parent, _, name = value.rstrip("/").rpartition("/")
    if not name.endswith((".yaml", ".yml")) or parent in ("s3:/", "s3:"):
        raise InputFetchError(
            f"{value}: a release spec URI names the spec object, e.g. s3://bucket/prefix/release.yaml"
        )
    dest = fetch_s3_prefix(parent, workdir / "release")
    spec = dest / name
    if not spec.is_file():
        raise InputFetchError(f"{value}: no such object under {parent}/")
    return spec

"""One way to produce a directory atomically: stage it beside its destination, fsync, rename into place.

Used by every stage that writes a whole directory (export, pull). A reader of the
destination sees either the old directory or the complete new one, never a half:

* :func:`staging_dir` creates an empty sibling ``.<name>.<purpose>-XXXX`` (same file
  system, so the final rename is atomic);
* :func:`commit_dir` fsyncs every file and directory of the staging tree, then renames
  it onto ``dest`` (an existing ``dest`` is moved aside first and restored if the
  rename fails, then removed);
* :func:`atomic_directory` is both around a ``with`` block, and removes the staging
  directory when the block raises: a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ggufship.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = ["atomic_directory", "commit_dir", "discard_dir", "staging_dir"]


def staging_dir(dest: Path, purpose: str = "staging") -> Path:
    """An empty directory beside ``dest`` (created with its parents); :class:`OutputError` if impossible."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{purpose}-", dir=dest.parent))
    except OSError as exc:
        raise OutputError(f"{dest.parent}: cannot create a staging directory for {dest.name}: {exc}") from exc


def _fsync_tree(root: Path) -> None:
    for current, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(current) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(current, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_dir(staging: Path, dest: Path) -> None:
    """fsync ``staging``'s tree and rename it onto ``dest`` (replacing a ``dest`` that exists)."""
    staging, dest = Path(staging), Path(dest)
    staging.chmod(0o755)  # mkdtemp makes it 0700
    _fsync_tree(staging)
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(backup, ignore_errors=True)
        dest.rename(backup)
        try:
            staging.rename(dest)
        except OSError:
            backup.rename(dest)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(dest)
    _fsync_dir(dest.parent)


def discard_dir(staging: Path) -> None:
    """Remove a staging directory and everything in it (a failed run)."""
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: Path, purpose: str = "staging") -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``dest``, on an exception it is removed."""
    staging = staging_dir(dest, purpose)
    try:
        yield staging
        commit_dir(staging, dest)
    except BaseException:
        discard_dir(staging)
        raise

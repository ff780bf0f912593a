"""Digests: streaming SHA256, the ``sha256sum`` sidecar format, export verification."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ggufship.errors import IntegrityError, ManifestError, UnsafePathError
from ggufship.layout import SIDECAR_SUFFIX, confined_join
from ggufship.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024

ProgressFn = Callable[[int], None]


def sha256_file(path: Path, on_bytes: ProgressFn | None = None) -> tuple[str, int]:
    """Return ``(hex digest, size)`` of ``path`` in one streaming pass."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest(), size


def sidecar_text(digest: str, filename: str) -> str:
    """One ``sha256sum`` line (text mode: two spaces) for ``filename``."""
    return f"{digest}  {filename}\n"


def parse_sidecar(path: Path) -> tuple[str, str]:
    """Parse a one-line ``sha256sum`` file into ``(digest, filename)``."""
    try:
        line = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read checksum file: {exc}") from exc
    parts = line.split(maxsplit=1)
    if len(parts) != 2 or len(parts[0]) != 64:
        raise IntegrityError(f"{path}: not a sha256sum line: {line[:80]!r}")
    return parts[0].lower(), parts[1].lstrip("*")


def tree_digest(root: Path, files: Iterable[Path]) -> str:
    """SHA256 over the sorted ``sha256sum`` listing of ``files`` (relative to root).

    A stable digest of a directory of inputs (a checkpoint, an adapter): it
    changes when any file's bytes or name changes, and not with mtimes.
    """
    lines = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest, _ = sha256_file(path)
        lines.append(sidecar_text(digest, path.relative_to(root).as_posix()))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_export`: what was checked, and every problem."""

    out_dir: Path
    checked: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_export(out_dir: Path, *, raise_on_error: bool = True) -> VerifyReport:
    """Re-check every file of an export against ``manifest.json``.

    Checks size and SHA256 of each listed file, and that each ``.sha256``
    sidecar agrees with the manifest. Reports every mismatch, not just the
    first; raises :class:`IntegrityError` naming all of them unless
    ``raise_on_error`` is false. A listed path that is not confined to
    ``out_dir`` (see :func:`ggufship.layout.confined_join`) is never read: the
    manifest model refuses it, and :class:`UnsafePathError` is raised here too.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = Manifest.load(manifest_path)
    problems: list[str] = []
    checked: list[str] = []
    for index, entry in enumerate(manifest.files):
        path = confined_join(out_dir, entry.path, what=f"{manifest_path}: files[{index}].path")
        checked.append(entry.path)
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{entry.path}: size {size} != manifest {entry.size}")
            continue
        digest, _ = sha256_file(path)
        if digest != entry.sha256:
            problems.append(f"{entry.path}: sha256 {digest} != manifest {entry.sha256}")
        sidecar = confined_join(
            out_dir, entry.path + SIDECAR_SUFFIX, what=f"{manifest_path}: sidecar of files[{index}]"
        )
        if sidecar.exists():
            side_digest, side_name = parse_sidecar(sidecar)
            if side_digest != entry.sha256 or side_name != Path(entry.path).name:
                problems.append(f"{sidecar.name}: disagrees with manifest for {entry.path}")
    report = VerifyReport(out_dir=out_dir, checked=tuple(checked), problems=tuple(problems))
    if problems and raise_on_error:
        raise IntegrityError(
            f"{out_dir}: {len(problems)} file(s) do not match {MANIFEST_NAME}: " + "; ".join(problems),
            problems,
        )
    return report


__all__ = [
    "SIDECAR_SUFFIX",
    "IntegrityError",
    "ManifestError",
    "UnsafePathError",
    "VerifyReport",
    "parse_sidecar",
    "sha256_file",
    "sidecar_text",
    "tree_digest",
    "verify_export",
]

"""Digests: streaming SHA256, the ``sha256sum`` sidecar format, export verification."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ggufship.errors import IntegrityError, ManifestError, UnsafePathError
from ggufship.layout import SIDECAR_SUFFIX, SIGNATURE_NAME, confined_join
from ggufship.manifest import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from ggufship.sign import SignatureReport

logger = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
#: The largest single write() of :class:`HashingFileSink`: bigger pieces are written in slices of
#: this size. Measured here (1 GiB download into the page cache, Linux 6.18, ext4; perf puts the
#: difference in the kernel's copy into page-cache folios): writes of 512 KiB-4 MiB cost 1.2-3.9 s
#: CPU per GiB, unevenly from run to run, 256 KiB writes 1.3-1.6 s (bench/RESULTS.md, pull).
WRITE_BYTES = 256 * 1024

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


class HashingFileSink:
    """Write a stream of chunks to ``path`` and SHA256 them, overlapped with whoever produces them.

    A download's one hashing pass: the network reader calls :meth:`write` with each chunk;
    one thread hashes and another writes (both release the GIL on large buffers), so
    receiving, hashing and writing run at the same time instead of one after another.
    Chunks are handed over in batches of at least ``batch_bytes`` (a tuple of the chunks
    as received, not copied): a reader that yields 64 KiB pieces (httpx) would otherwise
    pay two thread hand-offs per piece. Memory: at most ``max_queued`` batches wait in
    each queue (a batch waiting in both is held once), plus one being hashed, one being
    written and the one being filled. ``sync_bytes``: the writer starts the file's
    writeback (``fdatasync``) after every ``sync_bytes`` written, while the download goes
    on, so the final fsync of an atomic commit (:mod:`ggufship.atomic`) has little left
    to flush; ``0`` never syncs here. ``write_bytes``: pieces larger than this are written
    in slices of it (:data:`WRITE_BYTES`).
    :meth:`finish` waits for both threads and returns ``(hex digest, size)``; an error in
    either thread is raised there (or at the next :meth:`write`). Use as a context
    manager: leaving on an exception stops the threads.
    """

    _DONE = object()

    def __init__(
        self,
        path: Path,
        max_queued: int = 2,
        batch_bytes: int = 1024 * 1024,
        sync_bytes: int = 64 * 1024 * 1024,
        write_bytes: int = WRITE_BYTES,
    ) -> None:
        self._fh = Path(path).open("wb")  # noqa: SIM115 - closed in _stop (the object is the context)
        self._hasher = hashlib.sha256()
        self._queues: tuple[queue.Queue[object], ...] = (queue.Queue(max_queued), queue.Queue(max_queued))
        self._error: BaseException | None = None
        self._batch: list[bytes] = []
        self._batched = 0
        self._batch_bytes = batch_bytes
        self._sync_bytes = sync_bytes
        self._write_bytes = max(1, write_bytes)
        self.size = 0
        self._unsynced = 0
        self._threads = (
            threading.Thread(target=self._drain, args=(self._queues[0], self._hash), daemon=True),
            threading.Thread(target=self._drain, args=(self._queues[1], self._write), daemon=True),
        )
        for thread in self._threads:
            thread.start()
        self._open = True

    def _hash(self, batch: tuple[bytes, ...]) -> None:
        for piece in batch:
            self._hasher.update(piece)

    def _write(self, batch: tuple[bytes, ...]) -> None:
        step = self._write_bytes
        for piece in batch:
            if len(piece) <= step:
                self._fh.write(piece)
            else:
                view = memoryview(piece)  # slices, not copies
                for start in range(0, len(piece), step):
                    self._fh.write(view[start : start + step])
            self._unsynced += len(piece)
        if self._sync_bytes and self._unsynced >= self._sync_bytes:
            self._fh.flush()
            os.fdatasync(self._fh.fileno())
            self._unsynced = 0

    def _drain(self, source: queue.Queue[object], sink: Callable[[tuple[bytes, ...]], None]) -> None:
        while (item := source.get()) is not self._DONE:
            if self._error is None:
                try:
                    sink(item)  # type: ignore[arg-type]
                except BaseException as exc:  # handed to the producer in write()/finish()
                    self._error = exc

    def _hand_off(self) -> None:
        if self._batch:
            batch = tuple(self._batch)
            self._batch.clear()
            self._batched = 0
            for q in self._queues:
                q.put(batch)

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._batch.append(chunk)
        self._batched += len(chunk)
        self.size += len(chunk)
        if self._batched >= self._batch_bytes:
            self._hand_off()

    def _stop(self, *, complete: bool) -> None:
        if self._open:
            self._open = False
            if complete:
                self._hand_off()
            for q in self._queues:
                q.put(self._DONE)
            for thread in self._threads:
                thread.join()
            self._fh.close()

    def finish(self) -> tuple[str, int]:
        self._stop(complete=True)
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest(), self.size

    def __enter__(self) -> HashingFileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop(complete=False)


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


# ---------------------------------------------------------------- verify once

#: Names model_signing leaves out of a signature (``ignore_git_paths``); never part of an export.
GIT_NAMES = frozenset({".git", ".gitattributes", ".github", ".gitignore"})


@dataclass(frozen=True)
class FetchedFiles:
    """What a pull wrote into its staging directory, with each file's SHA256 computed while it streamed.

    ``digests``: relative path -> sha256 hex of every file written (``manifest.json``,
    listed files, sidecars; not ``model.sig``). ``absent``: listed GGUFs deliberately
    not fetched (a pull of one quantization).
    """

    manifest: Manifest
    digests: Mapping[str, str]
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedExport:
    """An export directory whose every file was hashed once and checked (the value pull hands to serve).

    ``digests`` (relative path -> sha256) covers every file in the directory but
    ``model.sig``; each listed file's digest equals ``manifest.json``'s, and each
    sidecar agrees with it. ``absent``: GGUFs the manifest lists that are not in the
    directory (a partial export of one quantization, see :meth:`serves`).
    ``signature``: what the signature check established, ``None`` when no policy was
    given. Build it with ``ggufship.sign.verify_export_once`` (or a pull), not by hand.
    """

    export_dir: Path
    manifest: Manifest
    digests: Mapping[str, str]
    absent: tuple[str, ...] = ()
    signature: SignatureReport | None = None

    @property
    def manifest_sha256(self) -> str:
        return self.digests[MANIFEST_NAME]

    @property
    def partial(self) -> bool:
        return bool(self.absent)

    def sha256_of(self, path: str) -> str:
        """The checked digest of one file; :class:`IntegrityError` if it is not in the export."""
        try:
            return self.digests[path]
        except KeyError:
            raise IntegrityError(f"{self.export_dir}: {path}: not part of this verified export") from None

    def serves(self, path: str) -> bool:
        """True if ``path`` is present and verified (a partial export serves only its quantization)."""
        return path in self.digests and path not in self.absent


def frozen_digests(digests: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(digests.items())))


def hash_export_dir(export_dir: Path) -> dict[str, str]:
    """SHA256 of every file under ``export_dir`` but ``model.sig`` and git files: one pass each.

    What a signature check compares (model_signing hashes the whole directory, so a file
    added after signing is found). A symlink leading outside is :class:`UnsafePathError`,
    any other symlink or non-regular file (socket, FIFO) :class:`IntegrityError` (model_signing
    refuses symlinks too).
    """
    root = Path(export_dir)
    digests: dict[str, str] = {}
    for current, dirs, files in os.walk(root):
        here = Path(current)
        rel_dir = here.relative_to(root)
        if rel_dir == Path():
            dirs[:] = [d for d in dirs if d not in GIT_NAMES]
            files = [f for f in files if f not in GIT_NAMES]
        for name in [*dirs, *files]:
            rel = (rel_dir / name).as_posix()
            if (here / name).is_symlink():
                confined_join(root, rel, what=f"{root}: {rel}")  # outside: UnsafePathError
                raise IntegrityError(f"{here / name}: a symlink in an export directory (refused)")
        for name in files:
            rel = (rel_dir / name).as_posix()
            if rel == SIGNATURE_NAME:
                continue
            if not (here / name).is_file():
                raise IntegrityError(f"{here / name}: not a regular file (refused in an export directory)")
            digests[rel], _ = sha256_file(here / name)
    return digests


def hash_listed_files(export_dir: Path, manifest: Manifest, absent: Iterable[str] = ()) -> dict[str, str]:
    """SHA256 of what the export delivers — ``manifest.json``, each listed file present (but
    ``absent``) and its sidecar — one pass each; for checks without a signature."""
    root = Path(export_dir)
    skipped = set(absent)
    digests = {MANIFEST_NAME: sha256_file(root / MANIFEST_NAME)[0]}
    for index, entry in enumerate(manifest.files):
        if entry.path in skipped:
            continue
        for rel in (entry.path, entry.path + SIDECAR_SUFFIX):
            path = confined_join(root, rel, what=f"{root / MANIFEST_NAME}: files[{index}]")
            if path.is_file():
                digests[rel], _ = sha256_file(path)
    return digests


def export_digest_problems(
    export_dir: Path, manifest: Manifest, digests: Mapping[str, str], absent: Iterable[str] = ()
) -> list[str]:
    """Every listed file whose digest (already computed) differs from ``manifest.json``, or is missing;
    every sidecar that disagrees with the manifest (sidecars are one line: read, not hashed)."""
    skipped = set(absent)
    root = Path(export_dir)
    problems: list[str] = []
    for index, entry in enumerate(manifest.files):
        if entry.path in skipped:
            if entry.kind != "gguf":
                problems.append(
                    f"{root / entry.path}: missing (only GGUFs of other quantizations may be absent)"
                )
            continue
        digest = digests.get(entry.path)
        if digest is None:
            problems.append(f"{root / entry.path}: missing")
            continue
        if digest != entry.sha256:
            problems.append(f"{root / entry.path}: sha256 {digest} != manifest {entry.sha256}")
        sidecar_name = entry.path + SIDECAR_SUFFIX
        if sidecar_name in digests:
            sidecar = confined_join(
                export_dir, sidecar_name, what=f"{MANIFEST_NAME}: sidecar of files[{index}]"
            )
            side_digest, side_name = parse_sidecar(sidecar)
            if side_digest != entry.sha256 or side_name != Path(entry.path).name:
                problems.append(f"{sidecar.name}: disagrees with manifest for {entry.path}")
    return problems


__all__ = [
    "GIT_NAMES",
    "SIDECAR_SUFFIX",
    "FetchedFiles",
    "HashingFileSink",
    "IntegrityError",
    "ManifestError",
    "UnsafePathError",
    "VerifiedExport",
    "VerifyReport",
    "export_digest_problems",
    "frozen_digests",
    "hash_export_dir",
    "hash_listed_files",
    "parse_sidecar",
    "sha256_file",
    "sidecar_text",
    "tree_digest",
    "verify_export",
]

"""The file layout of an export directory, and the one way to join an untrusted name onto a root.

Every file name that arrives from outside (a ``manifest.json`` entry, an OCI layer
title, an S3 key below the export prefix) is a *relative, normalised POSIX path*
inside its root, or it is refused:

* not empty, at most :data:`MAX_PATH_BYTES` bytes (UTF-8), each segment at most
  :data:`MAX_SEGMENT_BYTES` (the usual ``NAME_MAX``);
* no leading ``/`` (absolute), no ``\\`` (a Windows separator, or an escape
  some tool will read as one), no empty segment (``a//b``, trailing ``/``), no
  ``.`` or ``..`` segment;
* no control, format, surrogate or line/paragraph separator characters
  (``NUL``, ``\\n``, ``U+202E``, a lone ``\\ud800`` that no file system can encode).

:func:`path_problem` says what is wrong with a name (pure; the manifest model uses
it as its validator); :func:`check_relpath` raises :class:`UnsafePathError`;
:func:`confined_join` is the join every reader and writer of an export uses: it
checks the name again, joins it, and refuses a result that a symlink already on
disk would lead outside the root.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ggufship.errors import UnsafePathError

if TYPE_CHECKING:
    from ggufship.manifest import Manifest

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"
SIDECAR_SUFFIX = ".sha256"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 1024

# Unicode categories never allowed in a name: controls, format characters (bidi
# overrides, zero-width), surrogates, line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

__all__ = [
    "MANIFEST_NAME",
    "MAX_PATH_BYTES",
    "MAX_SEGMENT_BYTES",
    "RESERVED_NAMES",
    "SIDECAR_SUFFIX",
    "SIGNATURE_NAME",
    "UnsafePathError",
    "check_relpath",
    "confined_join",
    "export_files",
    "file_set_problems",
    "path_problem",
]


def path_problem(value: object) -> str | None:
    """Why ``value`` is not a relative, normalised POSIX path (``None`` when it is one)."""
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if not value:
        return "empty path"
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"contains U+{ord(ch):04X} (a control, format, surrogate or separator character)"
    if "\\" in value:
        return "contains a backslash (use '/' between segments)"
    if value.startswith("/"):
        return "absolute path (must be relative to the export directory)"
    if len(value.encode("utf-8")) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    for segment in value.split("/"):
        if segment == "":
            return "empty segment ('//' or a trailing '/')"
        if segment == "..":
            return "'..' segment (would leave the export directory)"
        if segment == ".":
            return "'.' segment (not a normalised path)"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def check_relpath(value: object, what: str) -> str:
    """Return ``value`` if it is a relative, normalised POSIX path, else raise :class:`UnsafePathError`.

    ``what`` names where the value came from (``"s3://b/k/manifest.json: files[2].path"``,
    ``"OCI layer sha256:… title"``); it leads the message.
    """
    problem = path_problem(value)
    if problem is not None or not isinstance(value, str):
        raise UnsafePathError(f"{what}: {value!r}: {problem}")
    return value


def confined_join(root: Path, relpath: object, *, what: str) -> Path:
    """``root / relpath`` for an untrusted ``relpath``; raises :class:`UnsafePathError` if it is not
    a relative, normalised path, or if symlinks on disk would resolve it outside ``root``."""
    rel = check_relpath(relpath, what)
    joined = Path(root) / rel
    base = Path(root).resolve()
    resolved = joined.resolve()  # non-strict: follows whatever part of the path exists
    if resolved != base and not resolved.is_relative_to(base):
        raise UnsafePathError(f"{what}: {rel!r}: resolves to {resolved}, outside {base} (a symlink?)")
    return joined


def _fold(name: str) -> str:
    """The key under which two names land on the same file on a case-insensitive or
    normalising file system (macOS, Windows)."""
    return unicodedata.normalize("NFC", name).casefold()


def file_set_problems(paths: Iterable[str]) -> list[str]:
    """What makes this list of (individually valid) export entries unusable as one directory.

    Duplicates (also after case folding and Unicode normalisation), names reserved
    for ``manifest.json``, ``model.sig`` and the ``.sha256`` sidecars, and a name
    that is both a file and the directory of another entry (``a`` and ``a/b``).
    """
    problems: list[str] = []
    files: dict[str, str] = {}
    for path in paths:
        key = _fold(path)
        if key in files:
            problems.append(f"{path!r}: listed twice (as {files[key]!r})")
            continue
        files[key] = path
        if path in RESERVED_NAMES or key in {_fold(n) for n in RESERVED_NAMES}:
            problems.append(f"{path!r}: reserved for the file ggufship writes under that name")
        elif key.endswith(SIDECAR_SUFFIX):
            problems.append(f"{path!r}: names ending in {SIDECAR_SUFFIX} are reserved for checksum sidecars")
    occupied = set(files) | {k + SIDECAR_SUFFIX for k in files} | {_fold(n) for n in RESERVED_NAMES}
    for key, path in files.items():
        parts = key.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory in occupied:
                problems.append(f"{path!r}: its directory {directory!r} is also a file of the export")
                break
    return problems


def export_files(export_dir: Path, manifest: Manifest) -> tuple[str, ...]:
    """The files an export delivers (what publish uploads and pull writes), besides ``model.sig``:
    every listed file, the ``.sha256`` sidecar of each that has one on disk, and ``manifest.json``."""
    names: list[str] = []
    for index, entry in enumerate(manifest.files):
        names.append(entry.path)
        sidecar = entry.path + SIDECAR_SUFFIX
        if confined_join(export_dir, sidecar, what=f"{MANIFEST_NAME}: sidecar of files[{index}]").is_file():
            names.append(sidecar)
    names.append(MANIFEST_NAME)
    return tuple(names)

"""The ggufship exception hierarchy.

Every failure the product reports on purpose is a :class:`GgufshipError`. Each
class carries the process exit code the CLI uses for it, so scripts can tell
failures apart without parsing messages. The codes are listed in
docs/reference/exit-codes.md (generated: ``ggufship reference``).
"""

from __future__ import annotations


class GgufshipError(Exception):
    """Base class of all errors ggufship raises deliberately."""

    exit_code: int = 1


class UsageError(GgufshipError):
    """A command-line parameter or option value is invalid."""

    exit_code = 2


class ToolchainError(GgufshipError):
    """The llama.cpp converter, gguf-py or libllama is missing or broken."""

    exit_code = 3


class CheckpointError(GgufshipError):
    """The input checkpoint (or adapter) is unsupported or broken."""

    exit_code = 4


class ReleaseSpecError(GgufshipError):
    """The release spec file is missing, unreadable or invalid."""

    exit_code = 5


class OutputError(GgufshipError):
    """The output location cannot be written."""

    exit_code = 6


class ConversionError(GgufshipError):
    """llama.cpp's converter or quantizer failed."""

    exit_code = 7


class IntegrityError(GgufshipError):
    """Files do not match the digests or sizes recorded in the manifest."""

    exit_code = 8

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems or [])


class ManifestError(IntegrityError):
    """manifest.json is missing or cannot be parsed."""

    exit_code = 9


class UnsafePathError(ManifestError):
    """A file name from untrusted input (a manifest entry, an OCI layer title, an S3 key) is not a
    relative, normalised path inside its root (absolute, ``..``, ``.``, empty segment, backslash,
    control character), or a symlink would lead it outside. The message names the source and the
    problem."""

    exit_code = 9


class UnlistedFileError(IntegrityError):
    """Files arrived or were signed that ``manifest.json`` does not list (an extra OCI layer; a
    signature whose file set is not the manifest's). ``problems`` names each file."""

    exit_code = 8

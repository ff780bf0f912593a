"""An append-only, hash-chained audit log (JSON lines) and its verification.

Each line is one JSON object, written with compact separators and a trailing
``\\n``::

    {"seq":1,"ts":"2026-11-23T16:27:31.123456Z","prev":"000…000","event":{...}}

- ``seq`` counts lines from 1;
- ``ts`` is RFC 3339 UTC with microseconds;
- ``prev`` is the SHA256 (hex) of the previous line's bytes *including* its
  ``\\n``; the first line carries 64 zeros (the genesis value);
- ``event`` is the caller's mapping, with PII redacted (:mod:`ggufship.redaction`)
  unless the log is opened with ``redact_pii=False``.

Editing, deleting, reordering or truncating a line breaks the chain and
:func:`verify_audit` names the line. The last line has no successor to vouch
for it, so the writer also keeps a *head* file beside the log
(``<log>.head``: ``seq`` (20 digits) and SHA256 of the last line it wrote,
rewritten in place with one fixed-width ``pwrite`` under the lock); it catches
an edited last line, deleted trailing lines and lines appended by other means.
:func:`verify_audit` takes no lock (a verification of a long log never stalls the
writers): it reads head, log, head, and when a writer is between its line and its
head update it reads again (briefly); while writers keep appending it checks the
prefix the head vouches for and notes the lines after it. It requires the head by
default.

**Keyed chain** (``key=``: a secret of at least 32 bytes, from a file or
``GGUFSHIP_AUDIT_KEY_FILE`` / ``GGUFSHIP_AUDIT_KEY``, see :func:`load_audit_key`):
``prev`` is HMAC-SHA256(key, previous line's bytes), every line carries
``"key":"hmac-sha256:<key id>"`` (16 hex digits of SHA256 over a label and the key;
it names the key, it does not reveal it), and the head holds
HMAC-SHA256(key, "ggufship-audit-head", seq, last link) instead of a plain digest.

What each proves (verified with the key where there is one):

* unkeyed — the lines are consistent with each other and with the head: accidental
  damage and a careless edit are found. Anyone who can write the log and its head
  can rewrite, append, delete or replace the whole chain consistently: it proves
  nothing about who wrote it.
* keyed — additionally, every line and the head were written by a holder of the
  key, in this order: without the key, no line can be edited, inserted, appended,
  reordered or deleted (at the end too, given the head) unnoticed. Not caught: a
  rollback of log *and* head together to a state saved earlier (the empty state
  included), or a log swapped for another one written with the same key — keep a
  copy of recent heads elsewhere if that matters.

Appends are serialised across threads (a lock) and processes (an exclusive
``flock`` on the log's own descriptor through :func:`filelock.lock_descriptor`, polled
with a bounded wait: no lock file beside the log); the file is opened ``O_APPEND``
and each line is a single ``write``. Opening an existing log checks its tail and continues its
chain; a broken tail is refused (:class:`AuditTamperedError`).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import filelock
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.errors import GgufshipError
from ggufship.redaction import redact_value
from ggufship.retry import poll_until

__all__ = [
    "GENESIS",
    "KEY_MIN_BYTES",
    "AuditError",
    "AuditEventError",
    "AuditKeyError",
    "AuditKeySettings",
    "AuditLockTimeoutError",
    "AuditLog",
    "AuditProblem",
    "AuditRecord",
    "AuditReport",
    "AuditTamperedError",
    "generate_audit_key",
    "head_path",
    "key_id",
    "load_audit_key",
    "verify_audit",
]

logger = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
HEAD_SUFFIX: Final = ".head"
KEY_MIN_BYTES: Final = 32
_TAIL_CHUNK: Final = 64 * 1024
_KEY_ID_RE: Final = re.compile(r"^hmac-sha256:[0-9a-f]{16}$")

ProblemKind = Literal[
    "edited", "deleted", "reordered", "truncated", "bad_json", "bad_record", "head", "appended", "key"
]


class AuditError(GgufshipError):
    """The audit log cannot be opened, read or written."""

    exit_code = 80


class AuditTamperedError(AuditError):
    """The audit log's hash chain is broken: a line was edited, deleted, reordered or truncated."""

    exit_code = 81

    def __init__(self, message: str, problems: list[AuditProblem] | None = None) -> None:
        super().__init__(message)
        self.problems: list[AuditProblem] = list(problems or [])


class AuditEventError(AuditError):
    """An event cannot be recorded (not a mapping of str keys, or not JSON-encodable)."""

    exit_code = 82


class AuditLockTimeoutError(AuditError):
    """Another writer held the audit log's lock for longer than the timeout."""

    exit_code = 83


class AuditKeyError(AuditError):
    """The audit key is unreadable or too short, or is not the key the log was written with
    (a keyed log opened or verified without its key, an unkeyed log opened with one)."""

    exit_code = 84


class AuditKeySettings(BaseSettings):
    """Where the HMAC key of the audit chain comes from (environment ``GGUFSHIP_AUDIT_<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_AUDIT_", frozen=True, extra="ignore")

    key_file: Path | None = Field(
        default=None, description="file holding the key (e.g. a mounted Kubernetes Secret); preferred"
    )
    key: SecretStr | None = Field(
        default=None, description=f"the key itself (at least {KEY_MIN_BYTES} bytes); used without key_file"
    )


def load_audit_key(key_file: Path | None = None) -> bytes | None:
    """The audit key: ``key_file`` if given, else ``GGUFSHIP_AUDIT_KEY_FILE``, else
    ``GGUFSHIP_AUDIT_KEY``, else None (an unkeyed chain). A file's trailing newline is not
    part of the key. Raises :class:`AuditKeyError` for an unreadable or short key."""
    settings = AuditKeySettings()
    path = key_file or settings.key_file
    if path is not None:
        try:
            key = Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise AuditKeyError(f"audit key file {path}: unreadable: {exc}") from exc
        where = f"audit key file {path}"
    elif settings.key is not None:
        key = settings.key.get_secret_value().encode()
        where = "GGUFSHIP_AUDIT_KEY"
    else:
        return None
    if len(key) < KEY_MIN_BYTES:
        raise AuditKeyError(f"{where}: {len(key)} bytes; an audit key needs at least {KEY_MIN_BYTES}")
    return key


def generate_audit_key(path: Path) -> Path:
    """Write a new random key (64 hex digits) to ``path`` (mode 0600); refuses to overwrite."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AuditKeyError(f"audit key file {path}: cannot create: {exc}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


def key_id(key: bytes) -> str:
    """The key's public name as recorded in each line: ``hmac-sha256:`` and 16 hex digits."""
    return "hmac-sha256:" + hashlib.sha256(b"ggufship-audit-key-id\0" + key).hexdigest()[:16]


@dataclass(frozen=True)
class _Chain:
    """How links and heads are computed: SHA256 (unkeyed) or HMAC-SHA256 with ``key``."""

    key: bytes | None

    @property
    def key_id(self) -> str | None:
        return key_id(self.key) if self.key is not None else None

    def link(self, raw: bytes) -> str:
        """The next line's ``prev`` for a line of bytes ``raw``."""
        if self.key is None:
            return _sha256(raw)
        return hmac.new(self.key, raw, hashlib.sha256).hexdigest()

    def head_value(self, seq: int, link: str) -> str:
        """What the head file records for a log whose last line (seq ``seq``) has link ``link``."""
        if self.key is None:
            return link
        msg = f"ggufship-audit-head\0{seq}\0{link}".encode("ascii")
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def describe(self, recorded: str | None) -> str:
        return f"key id {recorded}" if recorded else "no key (unkeyed)"


class _FromEnvironment:
    def __repr__(self) -> str:
        return "FROM_ENVIRONMENT"


#: ``AuditLog(key=FROM_ENVIRONMENT)`` (the default): the key of :func:`load_audit_key`.
FROM_ENVIRONMENT: Final = _FromEnvironment()


@dataclass(frozen=True)
class AuditRecord:
    """One appended line: its fields and the SHA256 of its bytes (the next line's ``prev``)."""

    seq: int
    ts: str
    prev: str
    event: Mapping[str, Any]
    sha256: str


@dataclass(frozen=True)
class AuditProblem:
    """A break in the chain, located at a 1-based line number of the file."""

    line: int
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class AuditReport:
    """The outcome of :func:`verify_audit`."""

    path: Path
    ok: bool
    lines: int
    problems: tuple[AuditProblem, ...] = ()
    head_checked: bool = False
    notes: tuple[str, ...] = field(default=())
    key_id: str | None = None  # the key the chain was verified with; None: an unkeyed chain

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "lines": self.lines,
            "head_checked": self.head_checked,
            "keyed": self.key_id is not None,
            "key_id": self.key_id,
            "problems": [{"line": p.line, "kind": p.kind, "detail": p.detail} for p in self.problems],
            "notes": list(self.notes),
        }

    def raise_for_problems(self) -> None:
        if not self.ok:
            listing = "; ".join(str(p) for p in self.problems)
            raise AuditTamperedError(f"{self.path}: audit chain broken: {listing}", list(self.problems))


def head_path(path: Path) -> Path:
    """Where the head file of the log at ``path`` lives."""
    return path.with_name(path.name + HEAD_SUFFIX)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _encode(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _parse_record(raw: bytes) -> dict[str, Any] | str:
    """The record of one line, or a string saying what is wrong with it."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    seq, prev = obj.get("seq"), obj.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "field 'seq' missing or not a positive integer"
    if not isinstance(prev, str) or len(prev) != 64 or any(c not in "0123456789abcdef" for c in prev):
        return "field 'prev' missing or not a 64-digit SHA256 hex"
    if not isinstance(obj.get("ts"), str):
        return "field 'ts' missing or not a string"
    if not isinstance(obj.get("event"), dict):
        return "field 'event' missing or not an object"
    if "key" in obj and not (isinstance(obj["key"], str) and _KEY_ID_RE.match(obj["key"])):
        return "field 'key' is not a key id (hmac-sha256:<16 hex digits>)"
    return obj


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """``(seq, sha256)`` from a head file, None if absent, or a string saying what is wrong."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return f"head file {path} unreadable: {exc}"
    parts = text.split()
    if not parts:  # created, not yet written (a writer stopped right after creating it)
        return None
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 64:
        return f"head file {path} malformed (expected 'SEQ SHA256')"
    return int(parts[0]), parts[1]


def _write_head(fd: int, path: Path, seq: int, digest: str) -> None:
    """Overwrite the head in place: one fixed-width ``pwrite`` (no rename: ~1 ms on overlay filesystems)."""
    data = f"{seq:020d} {digest}\n".encode("ascii")
    try:
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short write")
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
    except OSError as exc:
        raise AuditError(f"cannot write audit head file {path}: {exc}") from exc


def _last_lines(fd: int, size: int, count: int) -> tuple[list[bytes], bool]:
    """The last ``count`` lines (with their ``\\n``) of the open file; and whether the file starts there."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        # count+1 newlines inside buf (ignoring the final one) means we have count whole lines
        if buf.count(b"\n", 0, len(buf) - 1) >= count:
            break
    lines = buf.splitlines(keepends=True)
    at_start = pos == 0 and len(lines) <= count
    return lines[-count:], at_start


class AuditLog:
    """Append-only, hash-chained JSON-lines audit log at ``path``.

    ``AuditLog(path)`` creates the file (and its parent directory) if needed,
    checks the tail of an existing log and continues its chain. ``append`` is
    safe from several threads and several processes at once. Use it as a
    context manager or call :meth:`close`.

    ``fsync=True`` flushes every line (and head) to disk before returning;
    ``lock_timeout_s`` bounds the wait for another writer's lock. ``key``: the HMAC key
    of a keyed chain (bytes), None for an unkeyed one; by default the key of
    :func:`load_audit_key` (``GGUFSHIP_AUDIT_KEY_FILE`` / ``GGUFSHIP_AUDIT_KEY``), if any.
    A log keeps the kind and key it was started with (:class:`AuditKeyError` otherwise).
    """

    def __init__(
        self,
        path: Path,
        *,
        redact_pii: bool = True,
        fsync: bool = False,
        lock_timeout_s: float = 10.0,
        key: bytes | _FromEnvironment | None = FROM_ENVIRONMENT,
    ) -> None:
        if not lock_timeout_s > 0:
            raise AuditError(f"lock_timeout_s must be > 0, got {lock_timeout_s}")
        if isinstance(key, _FromEnvironment):
            key = load_audit_key()
        if key is not None and len(key) < KEY_MIN_BYTES:
            raise AuditKeyError(f"audit key: {len(key)} bytes; an audit key needs at least {KEY_MIN_BYTES}")
        self._chain = _Chain(key)
        self.path = Path(path)
        self.head = head_path(self.path)
        self.redact_pii = redact_pii
        self.fsync = fsync
        self.lock_timeout_s = lock_timeout_s
        self._thread_lock = threading.Lock()
        # (inode, size) at which (last seq, last line sha256) were known
        self._cached: tuple[int, int, int, str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        self._head_fd = -1
        try:
            with self._locked():
                self._tail_state()  # before the head file is created: an absent head stays absent
                self._head_fd = os.open(self.head, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
                if self._cached is not None:
                    seq, link = self._cached[2], self._cached[3]
                    _write_head(self._head_fd, self.head, seq, self._chain.head_value(seq, link))
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot open audit head file {self.head}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- public ---------------------------------------------------------------------------------

    def append(self, event: Mapping[str, Any]) -> AuditRecord:
        """Append one event; return the record written (its ``seq``, ``prev`` and line SHA256)."""
        if not isinstance(event, Mapping) or not all(isinstance(k, str) for k in event):
            raise AuditEventError(f"{self.path}: an audit event must be a mapping with str keys")
        body = redact_value(event) if self.redact_pii else dict(event)
        with self._thread_lock, self._locked():
            seq_prev, prev = self._tail_state()
            record: dict[str, Any] = {"seq": seq_prev + 1, "ts": _now(), "prev": prev}
            if self._chain.key_id is not None:
                record["key"] = self._chain.key_id
            record["event"] = body
            try:
                data = _encode(record)
            except (TypeError, ValueError) as exc:
                raise AuditEventError(f"{self.path}: audit event is not JSON-encodable: {exc}") from exc
            self._write(data)
            digest = self._chain.link(data)
            _write_head(self._head_fd, self.head, seq_prev + 1, self._chain.head_value(seq_prev + 1, digest))
            if self.fsync:
                os.fsync(self._head_fd)
            st = os.fstat(self._fd)
            self._cached = (st.st_ino, st.st_size, seq_prev + 1, digest)
        return AuditRecord(seq=seq_prev + 1, ts=record["ts"], prev=prev, event=body, sha256=digest)

    def close(self) -> None:
        for name in ("_head_fd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    # -- engine ---------------------------------------------------------------------------------

    def _locked(self) -> _WriterLock:
        if self._fd < 0:
            raise AuditError(f"audit log {self.path} is closed")
        return _WriterLock(self._fd, self.path, self.lock_timeout_s)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            written = 0
            for _ in range(1000):  # a regular file takes it in one write; bounded anyway
                written += os.write(self._fd, view[written:])
                if written == len(data):
                    break
            else:
                raise AuditError(f"{self.path}: short writes, gave up after 1000 attempts")
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"cannot append to audit log {self.path}: {exc}") from exc

    def _tail_state(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the last line (``(0, GENESIS)`` if empty); the lock must be held."""
        st = os.fstat(self._fd)
        if self._cached is not None and self._cached[:2] == (st.st_ino, st.st_size):
            return self._cached[2], self._cached[3]
        state = self._check_tail(st.st_size)
        self._cached = (st.st_ino, st.st_size, *state)
        return state

    def _check_tail(self, size: int) -> tuple[int, str]:
        chain = self._chain
        head = _read_head(self.head)
        if size == 0:
            if isinstance(head, tuple) and head[0] > 0:
                raise AuditTamperedError(
                    f"{self.path}: log is empty but its head file {self.head} records {head[0]} line(s): "
                    "lines deleted; refusing to append"
                )
            return 0, GENESIS
        try:
            rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc
        try:
            tail, at_start = _last_lines(rfd, size, 2)
        finally:
            os.close(rfd)
        last = tail[-1]
        where = f"{self.path}: last line (seq ?)"
        if not last.endswith(b"\n"):
            raise AuditTamperedError(f"{where} is truncated (no newline at the end); refusing to append")
        rec = _parse_record(last)
        if isinstance(rec, str):
            raise AuditTamperedError(f"{where}: {rec}; refusing to append")
        where = f"{self.path}: last line (seq {rec['seq']})"
        if rec.get("key") != chain.key_id:
            raise AuditKeyError(
                f"{where} was written with {chain.describe(rec.get('key'))}, this writer has "
                f"{chain.describe(chain.key_id)}; a log keeps its key (start a new log to change it)"
            )
        if len(tail) == 2:
            before = _parse_record(tail[0])
            if isinstance(before, str):
                raise AuditTamperedError(f"{self.path}: line before the last: {before}; refusing to append")
            if rec["seq"] != before["seq"] + 1:
                raise AuditTamperedError(
                    f"{where} follows seq {before['seq']}: lines deleted or reordered; refusing to append"
                )
            if rec["prev"] != chain.link(tail[0]):
                raise AuditTamperedError(
                    f"{self.path}: line seq {before['seq']} was edited (its link differs from the "
                    "'prev' recorded by the last line); refusing to append"
                )
        elif at_start and (rec["seq"] != 1 or rec["prev"] != GENESIS):
            raise AuditTamperedError(
                f"{where} is the only line but is not a genesis line; refusing to append"
            )
        digest = chain.link(last)
        if isinstance(head, str):
            raise AuditTamperedError(f"{head}; refusing to append")
        if head is None:
            raise AuditTamperedError(
                f"{where} but the head file {self.head} is missing (every writer keeps one): lines may "
                "have been deleted at the end; refusing to append (verify the log, then restore its head "
                "or start a new log)"
            )
        if head is not None:
            head_seq, head_sha = head
            if head_seq > rec["seq"]:
                raise AuditTamperedError(
                    f"{where} but the head file records seq {head_seq}: lines deleted; refusing to append"
                )
            if head_seq == rec["seq"] and head_sha != chain.head_value(head_seq, digest):
                raise AuditTamperedError(
                    f"{where} was edited (or the head file was): they disagree; refusing to append"
                )
            if head_seq < rec["seq"]:
                # A writer stopped between its line and the head update — or someone appended. In a
                # keyed log the last link above proves the tail was written with the key.
                logger.warning(
                    "%s: %d line(s) after the recorded head (seq %d); continuing the chain from seq %d%s",
                    self.path,
                    rec["seq"] - head_seq,
                    head_seq,
                    rec["seq"],
                    "" if chain.key is not None else " (unkeyed: their author is not proven)",
                )
        return rec["seq"], digest


class _WriterLock:
    """The exclusive lock of the log's writers: ``flock`` on the writer's own descriptor
    (:func:`filelock.lock_descriptor`), waited for at most ``timeout_s``.

    Only writers lock; :func:`verify_audit` reads without a lock (see :func:`_snapshot`).
    """

    def __init__(self, fd: int, path: Path, timeout_s: float) -> None:
        self.fd, self.path, self.timeout_s = fd, path, timeout_s

    def _try(self) -> bool:
        try:
            return filelock.lock_descriptor(self.fd, blocking=False)
        except OSError as exc:
            raise AuditError(f"cannot lock audit log {self.path}: {exc}") from exc

    def __enter__(self) -> None:
        if not poll_until(self._try, timeout_s=self.timeout_s, interval_s=0.0005, max_interval_s=0.02):
            raise AuditLockTimeoutError(
                f"audit log {self.path} stayed locked by another writer for {self.timeout_s:g}s"
            )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        filelock.unlock_descriptor(self.fd)


def _in_flight(data: bytes, head: tuple[int, str] | str | None, head_file: Path) -> bool:
    """Whether ``data`` ends the way it does while a writer is between its line and its head
    update: a cut-off last line, or a last line one past the head (the first line of a new log
    before its head file got a value)."""
    if not data:
        return False
    if not data.endswith(b"\n"):
        return True
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 :]
    rec = _parse_record(last)
    if not isinstance(rec, dict):
        return False
    if isinstance(head, tuple):
        return rec["seq"] == head[0] + 1
    return head is None and rec["seq"] == 1 and head_file.exists()


def _snapshot(
    path: Path, head_file: Path, settle_s: float
) -> tuple[bytes, tuple[int, str] | str | None, str]:
    """The log's bytes and its head as one writer left them, read without a lock; and a note.

    Writers append the line, then rewrite the head. Read head, log, head: when both head reads
    agree and the log does not end in a write in progress (:func:`_in_flight`), that is a state
    between two appends. Otherwise read again, for at most ``settle_s``. A log whose head never
    moved in that time is taken as it is (lines beyond the head are then reported, as they must
    be); a log whose head kept moving (writers busy) is cut after the line the first head read
    vouches for — every line up to it was complete before that read — and the note says how
    many bytes written meanwhile were left unchecked.
    """
    state: dict[str, Any] = {"moved": False}

    def settled() -> bool:
        first = _read_head(head_file)
        data = path.read_bytes()
        second = _read_head(head_file)
        state["data"], state["head"] = data, first
        if first != second:
            state["moved"] = True
            return False
        return not _in_flight(data, first, head_file)

    if poll_until(settled, timeout_s=settle_s, interval_s=0.001, max_interval_s=0.05):
        return state["data"], state["head"], ""
    data, head = state["data"], state["head"]
    if state["moved"] and isinstance(head, tuple):
        cut = _end_of_seq(data, head[0])
        if cut is not None:
            note = (
                f"writers kept appending: checked up to seq {head[0]}, "
                f"{len(data) - cut} byte(s) written meanwhile left for a later verify"
            )
            return data[:cut], head, note
    return data, head, ""


def _end_of_seq(data: bytes, seq: int) -> int | None:
    """The offset just after the last complete line of ``data`` whose record has ``seq``; None if none."""
    end = data.rfind(b"\n")
    while end >= 0:
        start = data.rfind(b"\n", 0, end) + 1
        rec = _parse_record(data[start : end + 1])
        if isinstance(rec, dict) and rec["seq"] == seq:
            return end + 1
        end = start - 1
    return None


def verify_audit(
    path: Path,
    *,
    head: Path | None = None,
    require_head: bool = True,
    key: bytes | None = None,
    settle_s: float = 1.0,
) -> AuditReport:
    """Check every line's record and chain link; name each problem by its line number.

    The head file (``head``, default ``<path>.head``) is required (``require_head=False``:
    checked when present, its absence only noted): it catches an edited last line,
    deleted trailing lines and lines appended beyond it. A head whose log is gone is a
    problem too. With ``key`` the chain is checked as a keyed chain (HMAC-SHA256) and
    every line must carry that key's id; a keyed log verified without a key raises
    :class:`AuditKeyError` (its links cannot be checked). Raises :class:`AuditError`
    if neither the log nor its head can be read; a broken chain is reported
    (``ok=False``), not raised — see :meth:`AuditReport.raise_for_problems`.
    """
    path = Path(path)
    head_file = head if head is not None else head_path(path)
    chain = _Chain(key)
    if key is not None and len(key) < KEY_MIN_BYTES:
        raise AuditKeyError(f"audit key: {len(key)} bytes; an audit key needs at least {KEY_MIN_BYTES}")
    try:
        data, head_state, in_flight_note = _snapshot(path, head_file, settle_s)
    except FileNotFoundError as exc:
        orphan = _read_head(head_file)
        if orphan is None:
            raise AuditError(f"cannot read audit log {path}: {exc}") from exc
        detail = orphan if isinstance(orphan, str) else f"the head file records seq {orphan[0]}"
        return AuditReport(
            path=path,
            ok=False,
            lines=0,
            problems=(
                AuditProblem(1, "deleted", f"log missing but its head file {head_file} exists: {detail}"),
            ),
            key_id=chain.key_id,
        )
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc}") from exc
    raw_lines = data.splitlines(keepends=True)
    records: list[dict[str, Any] | str] = [_parse_record(r) for r in raw_lines]
    seq_at: dict[int, list[int]] = {}
    for lineno, rec in enumerate(records, start=1):
        if isinstance(rec, dict):
            seq_at.setdefault(rec["seq"], []).append(lineno)
    if key is None:
        keyed = next((r["key"] for r in records if isinstance(r, dict) and "key" in r), None)
        if keyed is not None:
            raise AuditKeyError(
                f"{path}: a keyed log (key id {keyed}): verify it with its key "
                "(--key-file, GGUFSHIP_AUDIT_KEY_FILE or GGUFSHIP_AUDIT_KEY)"
            )

    problems: list[AuditProblem] = []
    expected_seq = 1
    prev_hash = GENESIS
    prev_clean = True  # the previous line parsed and sat in its place
    for lineno, (raw, rec) in enumerate(zip(raw_lines, records, strict=True), start=1):
        this_hash = chain.link(raw)
        if isinstance(rec, str):
            if lineno == len(raw_lines) and not raw.endswith(b"\n"):
                problems.append(AuditProblem(lineno, "truncated", f"last line is cut off ({rec})"))
            else:
                kind: ProblemKind = "bad_json" if rec.startswith("not ") else "bad_record"
                problems.append(AuditProblem(lineno, kind, rec))
            expected_seq += 1
            prev_hash, prev_clean = this_hash, False
            continue
        seq = rec["seq"]
        if rec.get("key") != chain.key_id:
            problems.append(
                AuditProblem(
                    lineno,
                    "key",
                    f"written with {chain.describe(rec.get('key'))}, "
                    f"verified with {chain.describe(chain.key_id)}",
                )
            )
        if lineno == len(raw_lines) and not raw.endswith(b"\n"):
            problems.append(AuditProblem(lineno, "truncated", "last line has no newline at the end"))
        if seq != expected_seq:
            missing = range(expected_seq, seq)
            if seq < expected_seq or any(s in seq_at for s in missing):
                problems.append(
                    AuditProblem(lineno, "reordered", f"seq {seq} where seq {expected_seq} was expected")
                )
            else:
                span = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seq {expected_seq}..{seq - 1}"
                problems.append(
                    AuditProblem(lineno, "deleted", f"line(s) with {span} missing before this line")
                )
            expected_seq = max(expected_seq - 1, seq) + 1
            prev_hash, prev_clean = this_hash, False
            continue
        if rec["prev"] != prev_hash and prev_clean:
            if lineno == 1:
                problems.append(AuditProblem(1, "edited", "first line's 'prev' is not the genesis value"))
            else:
                problems.append(
                    AuditProblem(
                        lineno - 1,
                        "edited",
                        f"link of line {lineno - 1} is {prev_hash[:16]}…, "
                        f"line {lineno} recorded {rec['prev'][:16]}…",
                    )
                )
        expected_seq = seq + 1
        prev_hash, prev_clean = this_hash, True

    notes: list[str] = [in_flight_note] if in_flight_note else []
    head_checked = False
    n = len(raw_lines)
    if head_state is None:
        if require_head:
            problems.append(
                AuditProblem(
                    max(n, 1),
                    "head",
                    f"head file {head_file} missing (every writer keeps one; --no-require-head for a log "
                    "copied without it)",
                )
            )
        else:
            notes.append(
                f"no head file {head_file}: an edit of the last line, deleted last lines or appended "
                "lines go unseen"
            )
    elif isinstance(head_state, str):
        problems.append(AuditProblem(n, "head", head_state))
    else:
        head_checked = True
        head_seq, head_sha = head_state
        where = seq_at.get(head_seq, [])
        last_seq = max(seq_at) if seq_at else 0
        cut_off = bool(problems) and problems[-1].kind == "truncated" and problems[-1].line == n
        if head_seq > last_seq and not (cut_off and head_seq == last_seq + 1):
            span = f"seq {last_seq + 1}" if head_seq == last_seq + 1 else f"seq {last_seq + 1}..{head_seq}"
            problems.append(
                AuditProblem(
                    n + 1, "deleted", f"the head file records seq {head_seq}; line(s) with {span} missing"
                )
            )
        elif head_seq == 0:
            if chain.key is not None and head_sha != chain.head_value(0, GENESIS):
                problems.append(
                    AuditProblem(1, "head", "the head file's value was not written with this key")
                )
            if n:
                problems.append(
                    AuditProblem(1, "appended", f"the head file records an empty log; {n} line(s) found")
                )
        elif where:
            lineno = where[-1]
            expected = chain.head_value(head_seq, chain.link(raw_lines[lineno - 1]))
            if expected != head_sha and not (cut_off and lineno == n):
                problems.append(
                    AuditProblem(
                        lineno, "edited", f"line {lineno} (or the head file) differs from the head's record"
                    )
                )
            elif lineno < n and not problems:  # (after a reorder the head's line moved: reported above)
                problems.append(
                    AuditProblem(
                        lineno + 1,
                        "appended",
                        f"{n - lineno} line(s) after the recorded head (seq {head_seq}): appended by other "
                        "means, or a writer stopped between its line and the head update (the next writer "
                        "to open the log continues from them)",
                    )
                )
    problems.sort(key=lambda p: p.line)
    return AuditReport(
        path=path,
        ok=not problems,
        lines=n,
        problems=tuple(problems),
        head_checked=head_checked,
        notes=tuple(notes),
        key_id=chain.key_id,
    )

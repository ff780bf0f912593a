"""The hash-chained audit log: chain, tamper detection by line, resume, concurrency, CLI exit codes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ggufship.audit import (
    GENESIS,
    AuditError,
    AuditEventError,
    AuditKeyError,
    AuditLockTimeoutError,
    AuditLog,
    AuditTamperedError,
    head_path,
    key_id,
    load_audit_key,
    verify_audit,
)
from ggufship.cli.main import main

N = 6


@pytest.fixture
def good_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        for i in range(N):
            log.append({"action": "request", "i": i, "user": "alice@example.com"})
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _tampered(src: Path, name: str, lines: list[bytes], keep_head: bool = True) -> Path:
    dst = src.with_name(name)
    dst.write_bytes(b"".join(lines))
    if keep_head:
        shutil.copyfile(head_path(src), head_path(dst))
    return dst


def _kinds(path: Path) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in verify_audit(path).problems]


def test_chain_format(good_log: Path) -> None:
    lines = _lines(good_log)
    assert len(lines) == N
    prev = GENESIS
    for seq, raw in enumerate(lines, start=1):
        rec = json.loads(raw)
        assert list(rec) == ["seq", "ts", "prev", "event"]
        assert rec["seq"] == seq
        assert rec["prev"] == prev
        assert rec["ts"].endswith("Z")
        assert rec["event"]["user"] == "[REDACTED:email]"
        prev = hashlib.sha256(raw).hexdigest()
    assert head_path(good_log).read_text() == f"{N:020d} {prev}\n"  # fixed width, rewritten in place
    report = verify_audit(good_log)
    assert report.ok
    assert report.lines == N
    assert report.head_checked
    assert report.problems == ()


def test_append_returns_record(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.log", redact_pii=False) as log:
        first = log.append({"who": "bob@example.com"})
        second = log.append({"n": 2})
    assert (first.seq, first.prev) == (1, GENESIS)
    assert first.event == {"who": "bob@example.com"}
    assert (second.seq, second.prev) == (2, first.sha256)
    assert second.sha256 == hashlib.sha256(_lines(tmp_path / "a.log")[1]).hexdigest()


def test_empty_log_verifies(tmp_path: Path) -> None:
    AuditLog(tmp_path / "empty.log").close()
    report = verify_audit(tmp_path / "empty.log")
    assert report.ok
    assert report.lines == 0


def test_edited_line_detected(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[2] = lines[2].replace(b'"i":2', b'"i":7')
    assert _kinds(_tampered(good_log, "edited.log", lines)) == [(3, "edited")]


def test_edited_last_line_detected_by_head(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[-1] = lines[-1].replace(b'"i":5', b'"i":8')
    path = _tampered(good_log, "edited-last.log", lines)
    assert _kinds(path) == [(N, "edited")]
    with pytest.raises(AuditTamperedError, match="edited") as exc:
        AuditLog(path)
    assert str(path) in str(exc.value)


def test_deleted_line_detected(good_log: Path) -> None:
    lines = _lines(good_log)
    del lines[3]
    problems = verify_audit(_tampered(good_log, "deleted.log", lines)).problems
    assert [(p.line, p.kind) for p in problems] == [(4, "deleted")]
    assert "seq 4" in problems[0].detail


def test_deleted_first_line_detected(good_log: Path) -> None:
    assert _kinds(_tampered(good_log, "deleted-first.log", _lines(good_log)[1:])) == [(1, "deleted")]


def test_deleted_last_line_detected_by_head(good_log: Path) -> None:
    path = _tampered(good_log, "deleted-last.log", _lines(good_log)[:-1])
    assert _kinds(path) == [(N, "deleted")]
    before = path.read_bytes()
    with pytest.raises(AuditTamperedError, match="deleted"):
        AuditLog(path)
    assert path.read_bytes() == before


def test_swapped_pair_detected(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[2], lines[3] = lines[3], lines[2]
    assert _kinds(_tampered(good_log, "swapped.log", lines)) == [(3, "reordered"), (4, "reordered")]


def test_swapped_last_pair_detected_and_refused(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[-2], lines[-1] = lines[-1], lines[-2]
    path = _tampered(good_log, "swapped-last.log", lines)
    assert _kinds(path) == [(N - 1, "reordered"), (N, "reordered")]
    with pytest.raises(AuditTamperedError, match="reordered"):
        AuditLog(path)


def test_truncated_last_line_detected_and_refused(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[-1] = lines[-1][:25]
    path = _tampered(good_log, "truncated.log", lines)
    problems = verify_audit(path).problems
    assert [(p.line, p.kind) for p in problems] == [(N, "truncated")]
    before = path.read_bytes()
    with pytest.raises(AuditTamperedError, match="truncated") as exc:
        AuditLog(path).append({"x": 1})
    assert str(path) in str(exc.value)
    assert path.read_bytes() == before


def test_missing_newline_detected(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[-1] = lines[-1].rstrip(b"\n")
    assert _kinds(_tampered(good_log, "no-newline.log", lines)) == [(N, "truncated")]


def test_bad_json_line_detected(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[1] = b"not json at all\n"
    assert _kinds(_tampered(good_log, "bad.log", lines)) == [(2, "bad_json")]
    lines = _lines(good_log)
    lines[1] = b'{"seq": 2}\n'
    assert _kinds(_tampered(good_log, "bad-record.log", lines)) == [(2, "bad_record")]


def test_without_head_file(good_log: Path) -> None:
    """The head is required by default; --no-require-head checks a log copied without it."""
    path = _tampered(good_log, "no-head.log", _lines(good_log), keep_head=False)
    assert [(p.line, p.kind) for p in verify_audit(path).problems] == [(N, "head")]
    report = verify_audit(path, require_head=False)
    assert report.ok
    assert not report.head_checked
    assert any("no head file" in n for n in report.notes)
    with pytest.raises(AuditTamperedError, match=r"head file .* is missing"):
        AuditLog(path)  # a writer does not continue a log whose head is gone


def test_resume_continues_chain(good_log: Path) -> None:
    with AuditLog(good_log) as log:
        rec = log.append({"action": "resumed"})
    assert rec.seq == N + 1
    assert rec.prev == hashlib.sha256(_lines(good_log)[N - 1]).hexdigest()
    assert verify_audit(good_log).ok


def test_two_writers_in_one_process_interleave(tmp_path: Path) -> None:
    path = tmp_path / "two.log"
    with AuditLog(path) as a, AuditLog(path) as b:
        for i in range(5):
            a.append({"w": "a", "i": i})
            b.append({"w": "b", "i": i})
    report = verify_audit(path)
    assert report.ok
    assert report.lines == 10


def test_threads_keep_chain(tmp_path: Path) -> None:
    path = tmp_path / "threads.log"
    log = AuditLog(path)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                log.append({"t": t, "i": i})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    log.close()
    assert not errors
    report = verify_audit(path)
    assert report.ok, report.problems
    assert report.lines == 200


def _append_many(path: str, worker: int, count: int) -> None:
    with AuditLog(Path(path), lock_timeout_s=60) as log:
        for i in range(count):
            log.append({"worker": worker, "i": i})


def _append_pausing(path: str, worker: int, count: int, paused: Any, resume: Any) -> None:
    """Append ``count`` lines; after the first half, say so (``paused``) and wait for ``resume``."""
    with AuditLog(Path(path), lock_timeout_s=60) as log:
        for i in range(count):
            if i == count // 2:
                paused.release()
                if not resume.wait(120):
                    raise SystemExit(3)
            log.append({"worker": worker, "i": i})


def test_processes_keep_chain(tmp_path: Path) -> None:
    path = tmp_path / "procs.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    report = verify_audit(path)
    assert report.ok, report.problems
    assert report.lines == 240
    seen = {(json.loads(r)["event"]["worker"], json.loads(r)["event"]["i"]) for r in _lines(path)}
    assert len(seen) == 240


def test_verify_while_other_processes_append(tmp_path: Path) -> None:
    """verify takes no lock: while three writer processes append, every verification sees a
    consistent log (a line whose head update is in flight is read again, or left for later)."""
    path = tmp_path / "live.log"
    AuditLog(path).close()
    ctx = multiprocessing.get_context("fork")
    # the writers stop halfway until one verification has run, so that at least one verification
    # sees a log the writers are still writing, however fast they are; the rest race freely
    paused, resume = ctx.Semaphore(0), ctx.Event()
    writers = [
        ctx.Process(target=_append_pausing, args=(str(path), w, 300, paused, resume)) for w in range(3)
    ]
    for w in writers:
        w.start()
    seen: list[int] = []
    try:
        assert all(paused.acquire(timeout=120) for _ in writers), "writers never reached halfway"
        report = verify_audit(path)
        assert report.ok, report.problems
        seen.append(report.lines)
        resume.set()
        deadline = time.monotonic() + 120
        for _ in range(500):  # bounded in count and time
            report = verify_audit(path)
            assert report.ok, report.problems
            seen.append(report.lines)
            if not any(w.is_alive() for w in writers) or time.monotonic() > deadline:
                break
    finally:
        resume.set()
        for w in writers:
            w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert seen[0] == 450, seen  # a verification of a log whose writers are halfway
    assert any(0 < n < 900 for n in seen), seen  # some verifications ran while the writers wrote
    assert seen == sorted(seen)
    assert verify_audit(path).lines == 900


def test_verify_needs_no_lock(tmp_path: Path) -> None:
    """A writer's exclusive lock does not hold up a verification, and a verification holds no
    lock a writer would wait for."""
    path = tmp_path / "held.log"
    with AuditLog(path) as log:
        log.append({"x": 1})
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a writer in the middle of an append
        report = verify_audit(path)
        assert report.ok and report.lines == 1, report.problems
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_bad_event_rejected_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with AuditLog(path) as log:
        log.append({"ok": True})
        before = path.read_bytes()
        with pytest.raises(AuditEventError, match="JSON") as exc:
            log.append({"when": object()})
        assert str(path) in str(exc.value)
        with pytest.raises(AuditEventError, match="str keys"):
            log.append({1: "x"})  # type: ignore[dict-item]
        with pytest.raises(AuditEventError):
            log.append({"nan": float("nan")})
        assert path.read_bytes() == before
        assert log.append({"ok": 2}).seq == 2
    assert verify_audit(path).ok


def test_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.log"
    log = AuditLog(path, lock_timeout_s=0.2)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(AuditLockTimeoutError, match="locked") as exc:
            log.append({"x": 1})
        assert exc.value.exit_code == 83
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    log.append({"x": 2})
    log.close()
    assert verify_audit(path).lines == 1


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"missing\.log"):
        verify_audit(tmp_path / "missing.log")
    (tmp_path / "dir.log").mkdir()
    with pytest.raises(AuditError, match=r"dir\.log"):
        AuditLog(tmp_path / "dir.log")


def test_exit_codes() -> None:
    assert AuditError.exit_code == 80
    assert AuditTamperedError.exit_code == 81
    assert AuditEventError.exit_code == 82
    assert AuditLockTimeoutError.exit_code == 83
    assert AuditKeyError.exit_code == 84


def test_cli_verify(good_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(good_log)]) == 0
    lines = _lines(good_log)
    lines[2] = lines[2].replace(b'"i":2', b'"i":9')
    del lines[4]
    bad = _tampered(good_log, "cli-bad.log", lines)
    assert main(["audit", "verify", str(bad), "--json"]) == 81
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(p["line"], p["kind"]) for p in report["problems"]] == [(3, "edited"), (5, "deleted")]
    assert main(["audit", "verify", str(good_log.with_name("nope.log"))]) == 80
    assert "nope.log" in capsys.readouterr().err


def test_cli_subprocess_exit_codes(good_log: Path) -> None:
    lines = _lines(good_log)
    lines[0], lines[1] = lines[1], lines[0]
    bad = _tampered(good_log, "cli-swapped.log", lines)
    cmd = [sys.executable, "-m", "ggufship.cli.main", "audit", "verify"]
    ok = subprocess.run([*cmd, str(good_log)], capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    broken = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120, check=False)
    assert broken.returncode == 81
    assert "line 1: reordered" in broken.stderr
    assert "line 2: reordered" in broken.stderr


# ---------------------------------------------------------------- head required, appended lines, wiped logs


def test_lines_appended_beyond_the_head_are_an_error(good_log: Path) -> None:
    """Someone appends a well-chained line without updating the head: reported (was: a note, exit 0)."""
    lines = _lines(good_log)
    last = json.loads(lines[-1])
    extra = {"seq": N + 1, "ts": last["ts"], "prev": hashlib.sha256(lines[-1]).hexdigest(), "event": {"x": 1}}
    lines.append((json.dumps(extra, separators=(",", ":")) + "\n").encode())
    path = _tampered(good_log, "appended.log", lines)
    assert _kinds(path) == [(N + 1, "appended")]
    assert main(["audit", "verify", str(path)]) == 81


def test_wiped_log_without_its_head_is_an_error(good_log: Path) -> None:
    path = _tampered(good_log, "wiped.log", [], keep_head=False)
    assert path.read_bytes() == b""
    assert _kinds(path) == [(1, "head")]
    assert main(["audit", "verify", str(path)]) == 81


def test_wiped_log_with_its_head_is_an_error(good_log: Path) -> None:
    path = _tampered(good_log, "wiped-head.log", [])
    assert _kinds(path) == [(1, "deleted")]


def test_head_without_its_log_is_an_error(good_log: Path) -> None:
    path = _tampered(good_log, "gone.log", [])
    path.unlink()
    report = verify_audit(path)
    assert not report.ok and [(p.line, p.kind) for p in report.problems] == [(1, "deleted")]
    assert f"seq {N}" in report.problems[0].detail
    assert main(["audit", "verify", str(path)]) == 81


def test_fresh_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "fresh.log"
    AuditLog(path).close()
    assert verify_audit(path).ok  # the writer wrote a seq-0 head at once


# ---------------------------------------------------------------- keyed chain (HMAC-SHA256)

KEY = b"k" * 32
OTHER = b"o" * 32


@pytest.fixture
def keyed_log(tmp_path: Path) -> Path:
    path = tmp_path / "keyed.log"
    with AuditLog(path, key=KEY) as log:
        for i in range(N):
            log.append({"action": "request", "i": i})
    return path


def _keyed_kinds(path: Path, key: bytes = KEY) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in verify_audit(path, key=key).problems]


def _forge(lines: list[bytes], index: int, **changes: object) -> bytes:
    """Line ``index`` with fields changed, re-linked as well as someone *without* the key can (SHA256)."""
    rec = json.loads(lines[index])
    rec.update(changes)
    return (json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def test_keyed_chain_format(keyed_log: Path) -> None:
    import hmac

    lines = _lines(keyed_log)
    recs = [json.loads(line) for line in lines]
    assert all(r["key"] == key_id(KEY) for r in recs)
    assert key_id(KEY).startswith("hmac-sha256:") and KEY.hex() not in key_id(KEY)
    assert recs[0]["prev"] == GENESIS
    for before, rec in zip(lines, recs[1:], strict=False):
        assert rec["prev"] == hmac.new(KEY, before, hashlib.sha256).hexdigest()
    report = verify_audit(keyed_log, key=KEY)
    assert report.ok and report.head_checked and report.key_id == key_id(KEY)
    with AuditLog(keyed_log, key=KEY) as log:  # resumes its chain
        assert log.append({"x": 1}).seq == N + 1
    assert verify_audit(keyed_log, key=KEY).ok


def test_keyed_tampering_detected(keyed_log: Path) -> None:
    lines = _lines(keyed_log)

    edited = list(lines)
    edited[2] = _forge(lines, 2, event={"action": "forged"})
    assert _keyed_kinds(_tampered(keyed_log, "k-edited.log", edited)) == [(3, "edited")]

    # Rewrite the whole chain with SHA256 links (what works against an unkeyed log): every link fails.
    rewritten, prev = [], GENESIS
    for i in range(N):
        rec = json.loads(lines[i])
        rec["prev"] = prev
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        rewritten.append(line)
        prev = hashlib.sha256(line).hexdigest()
    path = _tampered(keyed_log, "k-rewritten.log", rewritten)
    head_path(path).write_text(f"{N:020d} {prev}\n")
    assert _keyed_kinds(path) == [(i, "edited") for i in range(1, N + 1)]  # N-1 links and the head

    # Truncate and write a head for the shorter log as an attacker can: the next line's prev as digest.
    short = _tampered(keyed_log, "k-truncated.log", lines[:3])
    head_path(short).write_text(f"{3:020d} {json.loads(lines[3])['prev']}\n")
    assert _keyed_kinds(short) == [(3, "edited")]
    with pytest.raises(AuditTamperedError):
        AuditLog(short, key=KEY)

    # Deleted at the end with the head kept; appended beyond the head.
    assert _keyed_kinds(_tampered(keyed_log, "k-deleted.log", lines[:-1])) == [(N, "deleted")]
    appended = [*lines, _forge(lines, N - 1, seq=N + 1, prev=hashlib.sha256(lines[-1]).hexdigest())]
    # (the forged line's prev is not the HMAC of line N: that link breaks, naming line N)
    assert _keyed_kinds(_tampered(keyed_log, "k-appended.log", appended)) == [(N, "edited")]


def test_keyed_log_and_keys(keyed_log: Path, tmp_path: Path) -> None:
    # verified without its key: cannot be checked → a key error, never "intact"
    with pytest.raises(AuditKeyError, match="keyed log"):
        verify_audit(keyed_log)
    assert main(["audit", "verify", str(keyed_log)]) == 84
    # with another key: every line is of another key, every link breaks
    kinds = _keyed_kinds(keyed_log, OTHER)
    assert ("key" in {k for _, k in kinds}) and not verify_audit(keyed_log, key=OTHER).ok
    # writers keep the log's kind and key
    with pytest.raises(AuditKeyError):
        AuditLog(keyed_log, key=OTHER)
    with pytest.raises(AuditKeyError):
        AuditLog(keyed_log, key=None)
    unkeyed = tmp_path / "plain.log"
    with AuditLog(unkeyed, key=None) as log:
        log.append({"a": 1})
    with pytest.raises(AuditKeyError):
        AuditLog(unkeyed, key=KEY)
    # an unkeyed log verified with a key: its lines are not of this key
    assert ("key" in {k for _, k in _keyed_kinds(unkeyed)}) and not verify_audit(unkeyed, key=KEY).ok
    with pytest.raises(AuditKeyError, match="at least 32"):
        AuditLog(tmp_path / "short.log", key=b"short")


def test_key_from_file_env_and_cli(keyed_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "audit.key"
    assert main(["audit", "keygen", str(key_file)]) == 0
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert main(["audit", "keygen", str(key_file)]) == 84  # never overwritten
    key = load_audit_key(key_file)
    assert key is not None and len(key) == 64

    monkeypatch.delenv("GGUFSHIP_AUDIT_KEY", raising=False)
    monkeypatch.setenv("GGUFSHIP_AUDIT_KEY_FILE", str(key_file))
    path = tmp_path / "env.log"
    with AuditLog(path) as log:  # the default key: the environment's
        log.append({"a": 1})
    assert json.loads(path.read_bytes())["key"] == key_id(key)
    assert main(["audit", "verify", str(path)]) == 0  # the CLI reads the same setting
    monkeypatch.delenv("GGUFSHIP_AUDIT_KEY_FILE")
    assert main(["audit", "verify", str(path), "--key-file", str(key_file)]) == 0
    assert main(["audit", "verify", str(path)]) == 84

    monkeypatch.setenv("GGUFSHIP_AUDIT_KEY", KEY.decode())
    assert main(["audit", "verify", str(keyed_log)]) == 0
    monkeypatch.setenv("GGUFSHIP_AUDIT_KEY", "too-short")
    with pytest.raises(AuditKeyError, match="GGUFSHIP_AUDIT_KEY"):
        load_audit_key()
    with pytest.raises(AuditKeyError, match="unreadable"):
        load_audit_key(tmp_path / "missing.key")


def test_busy_log_is_checked_up_to_the_line_its_head_vouched_for(tmp_path: Path) -> None:
    """When writers never pause, verify checks the prefix ending at the line the head it read names
    (every line up to it was complete before that read); a cut-off line after it is not a problem."""
    from ggufship.audit import _end_of_seq

    path = tmp_path / "busy.log"
    with AuditLog(path) as log:
        for i in range(3):
            log.append({"i": i})
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    partial = data + lines[-1][:10]
    assert _end_of_seq(partial, 2) == len(lines[0]) + len(lines[1])
    assert _end_of_seq(partial, 3) == len(data)
    assert _end_of_seq(partial, 4) is None
    assert _end_of_seq(b"", 1) is None

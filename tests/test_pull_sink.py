"""``integrity.HashingFileSink``: a download's one hashing pass, written and hashed in batches while the
next chunks arrive; the writeback started as it goes; memory bounded; errors reach the producer."""

from __future__ import annotations

import hashlib
import random
import threading
import tracemalloc
from pathlib import Path

import pytest

from ggufship.integrity import HashingFileSink

KIB = 1024


def _chunks(seed: int, total: int) -> list[bytes]:
    """Uneven pieces (1 byte to 96 KiB), like a socket hands them out."""
    rng = random.Random(seed)
    out, left = [], total
    while left:
        n = min(left, rng.choice((1, 17, 4096, 65536, 98304, rng.randrange(1, 70000))))
        out.append(rng.randbytes(n))
        left -= n
    return out


@pytest.mark.parametrize("write_bytes", [1000, 256 * KIB, 4096 * KIB])
def test_large_pieces_are_written_in_slices_whole(tmp_path: Path, write_bytes: int) -> None:
    """Pieces larger than ``write_bytes`` (S3's 4 MiB reads) go to the file in slices: same bytes,
    same digest, also for a piece that is not a multiple of the slice."""
    rng = random.Random(3)
    chunks = [rng.randbytes(n) for n in (4096 * KIB, 1, 300 * KIB + 7, 4096 * KIB - 1)]
    data = b"".join(chunks)
    out = tmp_path / "blob"
    with HashingFileSink(out, write_bytes=write_bytes) as sink:
        for chunk in chunks:
            sink.write(chunk)
        digest, size = sink.finish()
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert out.read_bytes() == data


@pytest.mark.parametrize(
    ("batch_bytes", "sync_bytes"), [(1, 0), (256 * KIB, 512 * KIB), (64 * 1024 * KIB, 0)]
)
def test_file_and_digest_equal_the_stream(tmp_path: Path, batch_bytes: int, sync_bytes: int) -> None:
    chunks = _chunks(7, 3 * 1024 * KIB + 5)
    data = b"".join(chunks)
    out = tmp_path / "blob"
    with HashingFileSink(out, max_queued=2, batch_bytes=batch_bytes, sync_bytes=sync_bytes) as sink:
        for chunk in chunks:
            sink.write(chunk)
        digest, size = sink.finish()
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert out.read_bytes() == data


def test_empty_stream(tmp_path: Path) -> None:
    with HashingFileSink(tmp_path / "empty") as sink:
        assert sink.finish() == (hashlib.sha256(b"").hexdigest(), 0)
    assert (tmp_path / "empty").read_bytes() == b""


def test_a_write_error_reaches_the_producer_and_the_threads_end(tmp_path: Path) -> None:
    """/dev/full refuses every write (ENOSPC): finish() (or a later write) raises it."""
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full here")
    before = threading.active_count()
    sink = HashingFileSink(full, batch_bytes=64 * KIB, sync_bytes=0)
    with pytest.raises(OSError) as err, sink:
        for _ in range(64):
            sink.write(b"x" * 64 * KIB)
        sink.finish()
    assert err.value.errno == 28  # ENOSPC
    assert threading.active_count() == before


def test_leaving_on_an_exception_stops_the_threads(tmp_path: Path) -> None:
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="broke off"), HashingFileSink(tmp_path / "part") as sink:
        sink.write(b"a" * 100_000)
        raise RuntimeError("download broke off")
    assert threading.active_count() == before


def test_memory_is_bounded_by_the_batches_not_the_stream(tmp_path: Path) -> None:
    """32 MiB in 64 KiB pieces through 1 MiB batches, 2 queued: the sink holds a few MiB at most."""
    batch, queued, piece = 1024 * KIB, 2, 64 * KIB
    tracemalloc.start()
    try:
        with HashingFileSink(tmp_path / "big", max_queued=queued, batch_bytes=batch) as sink:
            for i in range(512):
                sink.write(i.to_bytes(4, "big") * (piece // 4))
            _, size = sink.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == 512 * piece
    # queued batches + one being hashed + one being written + the one filling, + slack
    assert peak < (queued + 3) * batch + 1024 * KIB, f"peak {peak} bytes"

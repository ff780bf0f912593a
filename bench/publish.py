"""Publish/pull throughput against the local S3 (SeaweedFS), next to raw loopback copies of the same bytes.

    .venv/bin/python bench/publish.py [--size-mib 256] [--part-size-mib 16] [--parallel 4] [--runs 3]

Starts its own SeaweedFS (``ggufship up --service s3`` in a temporary state dir),
writes one random file of ``--size-mib`` and measures, best of ``--runs``:

* ours, upload: ``ggufship.publish._s3_write.upload_file`` — checksummed multipart upload
  through boto3 (SHA256 per part, checked by the server; botocore also hashes each body
  for SigV4 over plain HTTP), plus the whole-file SHA256 re-check before completing;
* ours, download: the pull path (``_s3._download``: streamed, hashed, compared);
* curl PUT / GET: one raw S3 request of the same bytes with ``--aws-sigv4``
  (no checksums, unsigned payload) — what the server and loopback can do;
* cp: a local file copy of the same bytes (page cache) — the machine's ceiling.

Prints a Markdown table (MiB/s) to paste into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ggufship.progress import Reporter  # noqa: E402
from ggufship.publish import S3Target, _s3, _s3_write  # noqa: E402
from ggufship.services import ServicesSettings, down, load_credentials, load_state, up  # noqa: E402

MIB = 1024 * 1024


def best_of(runs: int, fn: Callable[[int], None]) -> float:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ggufship-bench-publish-"))
    state_dir = work / "state"
    try:
        up(ServicesSettings(state_dir=state_dir, services=("s3",)))
        endpoint = load_state(state_dir).services["s3"].endpoint
        creds = load_credentials(state_dir).s3
        target = S3Target(
            bucket="bench",
            endpoint=endpoint,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            create_bucket=True,
            part_size=args.part_size_mib * MIB,
            parallel=args.parallel,
        )
        conn = _s3.resolve_connection(target)
        client = _s3.client_for(conn)
        writer = _s3_write.write_client(conn)
        _s3_write.ensure_bucket(writer, conn, "bench", create=True)

        src = work / "payload.bin"
        size = args.size_mib * MIB
        with src.open("wb") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(MIB))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()

        def ours_up(i: int) -> None:
            key = f"ours/{i}"
            _s3_write.upload_file(
                writer,
                conn,
                "bench",
                key,
                src,
                digest,
                size,
                {"name": "b", "version": "1"},
                Reporter(enabled=False),
            )

        def ours_down(i: int) -> None:
            out = work / "down.bin"
            _s3._download(client, conn, "bench", "ours/0", out, digest, size)
            out.unlink()

        sigv4 = [
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            f"{creds.access_key}:{creds.secret_key.get_secret_value()}",
        ]

        def curl_put(i: int) -> None:
            subprocess.run(
                [
                    "curl",
                    "-sSf",
                    "-o",
                    "/dev/null",
                    *sigv4,
                    "-H",
                    "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                    "-T",
                    str(src),
                    f"{endpoint}/bench/curl/{i}",
                ],
                check=True,
            )

        def curl_get(i: int) -> None:
            subprocess.run(
                [
                    "curl",
                    "-sSf",
                    "-o",
                    "/dev/null",
                    *sigv4,
                    "-H",
                    "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                    f"{endpoint}/bench/curl/0",
                ],
                check=True,
            )

        def cp(i: int) -> None:
            shutil.copyfile(src, work / f"copy-{i}.bin")
            (work / f"copy-{i}.bin").unlink()

        rows = []
        for label, fn in (
            ("ours: upload (checksummed multipart, SHA256 per part)", ours_up),
            ("ours: download (pull path, streamed SHA256 check)", ours_down),
            ("curl PUT, one request, SigV4, unsigned payload", curl_put),
            ("curl GET, one request", curl_get),
            ("cp (local copy, page cache)", cp),
        ):
            seconds = best_of(args.runs, fn)
            rows.append((label, seconds, args.size_mib / seconds))
            print(f"{label}: {seconds:.3f} s, {args.size_mib / seconds:.0f} MiB/s", file=sys.stderr)

        print(
            f"\n{args.size_mib} MiB random, part size {args.part_size_mib} MiB, "
            f"{args.parallel} parts in flight, best of {args.runs}; "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs\n"
        )
        print("| path | seconds | MiB/s |")
        print("|---|---|---|")
        for label, seconds, rate in rows:
            print(f"| {label} | {seconds:.2f} | {rate:.0f} |")
    finally:
        down(state_dir)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile-load benchmark (issue 13, item 4): does one client's request stall the whole server?

Starts a real ``ggufship serve`` process (``--context-policy truncate --parallel 1 --queue-size 16``)
of a tiny model, then, for ``--duration`` seconds, ``--concurrency`` client threads (default 32) each
send hostile requests back to back, rotating through:

- ``many-messages``: a chat with 100,000 short messages (3 MB body);
- ``truncate``: a chat with 2,000 messages of ~20 words (truncated to fit n_ctx 512);
- ``big-body``: a 20 MB completion prompt with Content-Length;
- ``big-chunked``: the same 20 MB, chunked (no Content-Length);
- ``near-limit``: a 3.9 MB completion prompt (just under the default 4 MiB limit; truncated).

Meanwhile another process (so that the clients' GIL does not delay it) asks ``GET /healthz`` every
50 ms (one keep-alive connection, 30 s timeout; a timeout counts as 30 s) and the server's RSS is read
from psutil (VmRSS) every 100 ms; the server is killed if it passes ``--rss-limit-mb`` (6000;
reported). Reported: /healthz latency p50 / p99 / max and how many answered, RSS after load and its
peak, and per kind the status codes and the median latency. Targets: /healthz p99 < 100 ms; RSS bounded.

The model: the tiny Llama of the tests (``ggufship.demo_checkpoint``, exported to Q4_K_M here; n_ctx
512), or ``--model`` (an export directory or .gguf). Measure another checkout (e.g. the code before the
fix) by running it with ``PYTHONPATH=/path/to/checkout/src``: the server is started with this Python and
that path::

    git worktree add /tmp/base <commit> && PYTHONPATH=/tmp/base/src .venv/bin/python bench/hostile.py
    .venv/bin/python bench/hostile.py [--model DIR] [--duration 30] [--concurrency 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.queues
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

HEALTH_TIMEOUT = 30.0
JSON_HEADERS = {"content-type": "application/json"}
KINDS = ("many-messages", "truncate", "big-body", "big-chunked", "near-limit")


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_tiny(out: Path) -> Path:
    from ggufship.demo_checkpoint import TinySpec, build_checkpoint
    from ggufship.export import ExportRequest, export_checkpoint

    ckpt = build_checkpoint(out / "ckpt", TinySpec())
    target = out / "tiny-1.0.0"
    export_checkpoint(
        ExportRequest(checkpoint=ckpt, out_dir=target, name="tiny", version="1.0.0", quants=("Q4_K_M",))
    )
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(model: Path, log: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ggufship.cli.main import main; sys.exit(main())",
        "serve",
        str(model),
        "--port",
        str(port),
        "--parallel",
        "1",
        "--queue-size",
        "16",
        "--n-threads",
        "1",
        "--context-policy",
        "truncate",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in 180 s; see {log}")
                time.sleep(0.1)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / (1024 * 1024)
    except psutil.Error:
        return None


def bodies() -> dict[str, tuple[bytes, str, bool]]:
    """kind → (body, path, chunked)"""
    many = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}] * 100_000}
    turns = []
    for i in range(1000):
        turns += [
            {"role": "user", "content": f"question {i}: " + "lorem ipsum dolor sit amet " * 4},
            {"role": "assistant", "content": "answer " * 20},
        ]
    truncate = {"model": "tiny", "max_tokens": 4, "messages": [*turns, {"role": "user", "content": "Last?"}]}
    big = {"model": "tiny", "max_tokens": 4, "prompt": "a " * (10 * 1024 * 1024)}
    near = {"model": "tiny", "max_tokens": 4, "prompt": "a " * (1_950_000)}
    enc = {k: json.dumps(v).encode() for k, v in (("m", many), ("t", truncate), ("b", big), ("n", near))}
    return {
        "many-messages": (enc["m"], "/v1/chat/completions", False),
        "truncate": (enc["t"], "/v1/chat/completions", False),
        "big-body": (enc["b"], "/v1/completions", False),
        "big-chunked": (enc["b"], "/v1/completions", True),
        "near-limit": (enc["n"], "/v1/completions", False),
    }


@dataclass
class KindResult:
    codes: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)


@dataclass
class Result:
    code: str  # which checkout: the PYTHONPATH given, or "this checkout"
    concurrency: int
    duration_s: float
    health_n: int = 0
    health_timeouts: int = 0
    health_p50_ms: float = 0.0
    health_p99_ms: float = 0.0
    health_max_ms: float = 0.0
    rss_ready_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    killed_at_rss_limit: bool = False
    kinds: dict[str, KindResult] = field(default_factory=dict)


def probe(url: str, duration: float, answers: multiprocessing.queues.Queue[list[float]]) -> None:
    """``GET /healthz`` every 50 ms for ``duration`` s: the latencies (a timeout counts as its limit)."""
    health: list[float] = []
    end = time.monotonic() + duration
    with httpx.Client(timeout=HEALTH_TIMEOUT) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                c.get(f"{url}/healthz").raise_for_status()
                health.append(time.perf_counter() - t0)
            except httpx.TimeoutException:
                health.append(HEALTH_TIMEOUT)
            time.sleep(0.05)
    answers.put(health)


def run(
    model: Path, concurrency: int, duration: float, log: Path, rss_limit_mb: float, kinds: tuple[str, ...]
) -> Result:
    payloads = bodies()
    res = Result(os.environ.get("PYTHONPATH", "this checkout"), concurrency, duration)
    res.kinds = {k: KindResult() for k in kinds}
    lock = threading.Lock()
    with server(model, log) as (url, pid):
        res.rss_ready_mb = rss_mb(pid) or 0.0
        stop = threading.Event()
        rss: list[float] = []

        def sample() -> None:
            while not stop.is_set():
                if (value := rss_mb(pid)) is not None:
                    rss.append(value)
                    if value > rss_limit_mb and not res.killed_at_rss_limit:  # protect a shared machine
                        res.killed_at_rss_limit = True
                        os.kill(pid, signal.SIGKILL)
                stop.wait(0.1)

        def attack(worker: int) -> None:
            n = worker
            with httpx.Client(timeout=httpx.Timeout(duration + 60, connect=10)) as c:
                while not stop.is_set():
                    kind = kinds[n % len(kinds)]
                    n += 1
                    body, path, chunked = payloads[kind]
                    content = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
                    t0 = time.perf_counter()
                    try:
                        r = c.post(
                            f"{url}{path}", content=content, headers={"content-type": "application/json"}
                        )
                        code = str(r.status_code)
                    except httpx.HTTPError as exc:
                        code = "unfinished" if stop.is_set() else type(exc).__name__
                    with lock:
                        k = res.kinds[kind]
                        k.codes[code] = k.codes.get(code, 0) + 1
                        if code != "unfinished":
                            k.seconds.append(time.perf_counter() - t0)

        # the probe runs in its own process: this one's GIL is busy with 32 clients sending megabytes
        ctx = multiprocessing.get_context("spawn")
        answers: multiprocessing.queues.Queue[list[float]] = ctx.Queue()
        prober = ctx.Process(target=probe, args=(url, duration, answers))
        prober.start()
        threads = [threading.Thread(target=sample)]
        threads += [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(concurrency)]
        for t in threads:
            t.start()
        time.sleep(duration)
        stop.set()
        threads[0].join()
        health = answers.get(timeout=HEALTH_TIMEOUT + 30)
        prober.join()
        res.health_timeouts = sum(1 for h in health if h >= HEALTH_TIMEOUT)
        res.rss_end_mb = rss_mb(pid) or 0.0
    res.health_n = len(health)
    res.health_p50_ms = pct(health, 50) * 1000
    res.health_p99_ms = pct(health, 99) * 1000
    res.health_max_ms = max(health, default=float("nan")) * 1000
    res.rss_peak_mb = max(rss, default=0.0)
    return res


def report(res: Result) -> str:
    lines = [
        f"code: {res.code}; {res.concurrency} hostile clients for {res.duration_s:.0f} s",
        f"/healthz: n={res.health_n} p50={res.health_p50_ms:.1f} ms p99={res.health_p99_ms:.1f} ms "
        f"max={res.health_max_ms:.1f} ms timeouts(>{HEALTH_TIMEOUT:.0f}s)={res.health_timeouts}",
        f"RSS: ready {res.rss_ready_mb:.0f} MB, peak {res.rss_peak_mb:.0f} MB, end {res.rss_end_mb:.0f} MB"
        + (" (server KILLED at the RSS limit)" if res.killed_at_rss_limit else ""),
    ]
    for kind, k in res.kinds.items():
        codes = ", ".join(f"{c}×{n}" for c, n in sorted(k.codes.items()))
        lines.append(f"  {kind:14s} {codes or '-'}; median {pct(k.seconds, 50):.2f} s (completed requests)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="export directory or .gguf (default: build the tiny model)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of hostile load")
    p.add_argument("--json", type=Path, help="write the result here too")
    p.add_argument("--kinds", help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    p.add_argument(
        "--rss-limit-mb", type=float, default=6000, help="kill the server beyond this RSS (reported)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ggufship-hostile-") as tmp:
        model = args.model or build_tiny(Path(tmp))
        kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
        res = run(model, args.concurrency, args.duration, Path(tmp) / "server.log", args.rss_limit_mb, kinds)
        if args.json:
            data = asdict(res)
            for k in data["kinds"].values():
                k["median_s"] = pct(k.pop("seconds"), 50)
            args.json.write_text(json.dumps(data, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

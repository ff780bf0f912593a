"""The load generator of the local rollout: replays a prompt set through the proxy.

Async (httpx), ``concurrency`` workers, bounded in request count and in time, and
optionally paced to ``rate_per_s``. Every request carries a fresh W3C
``traceparent`` (the proxy splits traffic on its trace id) and is recorded with its
HTTP status, the track that served it (the proxy's ``x-ggufship-track`` header) or
the transport error. Records stream to a JSONL file as they complete, so the
evidence survives a crash and can be checked afterwards: for example, that no
request failed while the proxy switched its routes.

Connections to the proxy are not kept alive: an idle keep-alive connection that an
old nginx worker closes at a reload can race with a new request on it, and a POST
must not be retried blindly. A loopback connect per request costs well under a
millisecond.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.rollout._errors import RolloutError
from ggufship.rollout._proxy import TRACK_HEADER

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The quick brown fox",
    "Once upon a time",
    "def fibonacci(n):",
    "Hello, how are you today?",
    "List three colors:",
    "The capital of France is",
    "Translate to German: good morning",
    "1, 2, 3, 4,",
)


class LoadSpec(BaseModel):
    """What to send, how fast, and for how long at most."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="base URL of the proxy, e.g. http://127.0.0.1:8080")
    prompts: tuple[str, ...] = Field(default=DEFAULT_PROMPTS, min_length=1)
    endpoint: str = Field(default="/v1/completions", pattern=r"^/v1/(chat/)?completions$")
    model: str | None = Field(default=None, description="the request's `model` field (None: left out)")
    max_tokens: int = Field(default=8, ge=1, le=4096)
    concurrency: int = Field(default=4, ge=1, le=256)
    max_requests: int = Field(default=100_000, ge=1, le=10_000_000)
    max_seconds: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    rate_per_s: float | None = Field(
        default=None, gt=0, le=10_000, description="pace (None: as fast as possible)"
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers on every request")


class RequestRecord(BaseModel):
    """One request the generator sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    started_at: float = Field(description="wall clock (Unix seconds) when the request was sent")
    duration_s: float
    status: int | None = Field(description="HTTP status; None on a transport error")
    track: str | None = Field(description="the proxy's x-ggufship-track header")
    trace_id: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class LoadSummary(BaseModel):
    """Counts over the records (for the status file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests: int = 0
    ok: int = 0
    transport_errors: int = 0
    by_track_status: dict[str, int] = Field(default_factory=dict, description='"track status" → count')

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> LoadSummary:
        counts = Counter(f"{r.track or '-'} {r.status if r.status is not None else 'error'}" for r in records)
        return cls(
            requests=len(records),
            ok=sum(r.ok for r in records),
            transport_errors=sum(r.status is None for r in records),
            by_track_status=dict(sorted(counts.items())),
        )


def new_traceparent() -> tuple[str, str]:
    """A fresh W3C ``traceparent`` (sampled) and its trace id."""
    trace = secrets.token_hex(16)
    return f"00-{trace}-{secrets.token_hex(8)}-01", trace


def _body(spec: LoadSpec, prompt: str) -> dict[str, object]:
    body: dict[str, object] = {"max_tokens": spec.max_tokens, "temperature": 0.0}
    if spec.model is not None:
        body["model"] = spec.model
    if spec.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


class LoadGenerator:
    """Runs :class:`LoadSpec` in a background thread (its own event loop) until done or stopped."""

    def __init__(self, spec: LoadSpec, records_file: Path | None = None) -> None:
        self.spec = spec
        self.records_file = records_file
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -------------------------------------------------------------- thread API

    def start(self) -> None:
        if self._thread is not None:
            raise RolloutError("the load generator was already started")
        if self.records_file is not None:
            self.records_file.parent.mkdir(parents=True, exist_ok=True)
            self.records_file.write_text("", encoding="utf-8")
        self._thread = threading.Thread(target=self._main, name="ggufship-load", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> list[RequestRecord]:
        """Stop sending, wait (bounded) for requests in flight, return all records."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("load generator still busy %.0fs after stop; leaving it", timeout_s)
        if self._error is not None:
            raise RolloutError(f"load generator failed: {self._error}") from self._error
        return self.records()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def summary(self) -> LoadSummary:
        return LoadSummary.of(self.records())

    # -------------------------------------------------------------- engine

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop()
            logger.error("load generator failed: %s", exc)
            self._error = exc

    async def _run(self) -> None:
        import httpx

        spec = self.spec
        limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=0)
        timeout = httpx.Timeout(spec.timeout_s, connect=min(10.0, spec.timeout_s))
        start = time.monotonic()
        deadline = start + spec.max_seconds
        counter = iter(range(spec.max_requests))
        out = self.records_file.open("a", encoding="utf-8") if self.records_file is not None else None

        async def worker(client: httpx.AsyncClient) -> None:
            while not self._stop.is_set():
                index = next(counter, None)
                if index is None or time.monotonic() >= deadline:
                    return
                if spec.rate_per_s is not None:
                    due = start + index / spec.rate_per_s
                    while (wait := due - time.monotonic()) > 0:
                        if self._stop.is_set() or time.monotonic() >= deadline:
                            return
                        await asyncio.sleep(min(wait, 0.1))
                record = await self._one(client, index)
                with self._lock:
                    self._records.append(record)
                if out is not None:
                    out.write(record.model_dump_json() + "\n")
                    out.flush()

        try:
            async with httpx.AsyncClient(
                base_url=spec.url, limits=limits, timeout=timeout, trust_env=False
            ) as client:
                await asyncio.gather(*(worker(client) for _ in range(spec.concurrency)))
        finally:
            if out is not None:
                out.close()

    async def _one(self, client: object, index: int) -> RequestRecord:
        import httpx

        if not isinstance(client, httpx.AsyncClient):  # pragma: no cover (typing aid)
            raise TypeError(client)
        spec = self.spec
        traceparent, trace = new_traceparent()
        headers = {"traceparent": traceparent, **spec.headers}
        prompt = spec.prompts[index % len(spec.prompts)]
        started_wall = time.time()
        t0 = time.perf_counter()
        try:
            resp = await client.post(spec.endpoint, json=_body(spec, prompt), headers=headers)
            await resp.aread()
        except httpx.HTTPError as exc:
            return RequestRecord(
                index=index,
                started_at=started_wall,
                duration_s=time.perf_counter() - t0,
                status=None,
                track=None,
                trace_id=trace,
                error=f"{type(exc).__name__}: {exc}",
            )
        return RequestRecord(
            index=index,
            started_at=started_wall,
            duration_s=time.perf_counter() - t0,
            status=resp.status_code,
            track=resp.headers.get(TRACK_HEADER),
            trace_id=trace,
            error=None if resp.is_success else resp.text[:200],
        )


def read_records(path: Path) -> list[RequestRecord]:
    """The records a generator streamed to ``path``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read load records: {exc}") from exc
    return [RequestRecord.model_validate(json.loads(line)) for line in lines if line.strip()]

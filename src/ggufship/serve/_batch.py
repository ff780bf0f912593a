"""Continuous batching: one llama.cpp context serves up to ``parallel`` sequences at once.

The engine of :mod:`ggufship.serve._engine` gives each request a whole llama instance; this one
gives it a *sequence* of one shared context (llama-cpp-python's low-level API: ``llama_batch`` with
sequence ids, ``llama_decode``, one sampler chain per sequence, ``llama_memory_seq_rm`` /
``llama_memory_seq_cp`` on the KV cache). One scheduler thread owns the context and loops:

1. admit the sequences that arrived (each reuses the longest cached prompt prefix it finds in any
   slot: its own previous request, or another slot's, copied with ``seq_cp`` — the system prompt
   shared by requests is decoded once);
2. build one batch: the next token of every generating sequence, then prompt tokens of the
   sequences still prefilling, in chunks, up to ``n_batch`` tokens in all (a long prompt never
   stalls running streams for more than one step);
3. ``llama_decode`` once, sample each sequence that got logits, hand the text to its request.

A request joins between two steps; a cancelled (client gone) or failed sequence leaves the batch
at the next step without touching the others. The queue, 429s, streaming, stop sequences, token
faults and metrics are the ones of :class:`~ggufship.serve._engine.Engine`, which this subclasses:
only loading, the tokenizer and one generation's loop differ.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufship.runtime import amx_active, amx_message, cpu_budget
from ggufship.serve._engine import (
    Emitter,
    Engine,
    FinishReason,
    Item,
    SamplingParams,
    TokenFault,
    TokenLogprob,
    _Run,
    emit_together,
    stop_cut,
    token_logprob,
)
from ggufship.serve._quality import BatchNLL
from ggufship.serve.errors import GenerationError, InjectedFaultError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

# per-sequence window when neither the setting nor a smaller training context gives one: the KV
# cache holds parallel × this many cells, so the model's own (often 32k+) context is not the default
DEFAULT_SEQUENCE_CTX = 4096
PENALTY_LAST_N = 64


@dataclass
class _Sequence:
    """One generation inside the shared context (owned by the scheduler thread)."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    cancel: threading.Event
    emit: Emitter
    endpoint: str
    started: float
    fault: TokenFault | None
    limit: int
    run: _Run
    sampler: Any = None
    greedy: bool = False  # the argmax of the raw logits, without llama.cpp's sampler (plain_greedy)
    decoder: Any = None
    kv: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, by position
    next_token: int | None = None  # sampled and delivered, to be decoded next step
    held: tuple[int, float, float | None] | None = None  # (token, due, nll): a token-delay fault holds it
    batch_index: int = -1  # index of this sequence's logits in the current batch
    out_row: int = -1  # its row among the step's output logits (llama_get_logits)
    reused: int = 0  # prompt tokens taken from the cache
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def prefilling(self) -> bool:
        return len(self.kv) < len(self.prompt)


class BatchEngine(Engine):
    """``parallel`` sequences of one llama.cpp context, decoded together (continuous batching)."""

    def __init__(self, model_path: Path, *, n_threads: int | None = None, **options: Any) -> None:
        """The options of :class:`Engine`; ``parallel`` is the number of sequences in the batch."""
        super().__init__(model_path, n_threads=n_threads, **options)
        # one context uses every core the container may use (cgroup quota, affinity)
        self._n_threads = n_threads or cpu_budget()
        self._model: Any = None
        self._ctx: Any = None
        self._vocab_p: Any = None
        self._seq_ctx = 0
        self._cond = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._closing = False
        self._scheduler: threading.Thread | None = None
        self._cache: dict[int, list[int]] = {}  # seq id → tokens its KV cells hold (finished or not)
        self._active: dict[int, _Sequence] = {}
        # items for the requests' event loops, handed over together (_flush) before the next
        # llama_decode, before waiting, and when a sequence ends
        self._outbox: list[tuple[Emitter, Item]] = []
        # counters for tests and metrics
        self.steps = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.reused_tokens = 0
        self.argmax_tokens = 0  # sampled as the logits' argmax (plain_greedy), not by llama.cpp
        self.max_batch_sequences = 0
        # the answer-surprisal NLLs: each step's log-sum-exps, on a helper thread and/or the
        # scheduler (see _step; the scheduler's own share is timed for bench/nll.py)
        self._nll_calc: BatchNLL | None = None
        self._nll_pool: ThreadPoolExecutor | None = None
        self.nll_seconds = 0.0
        self.nll_tokens = 0

    # --- loading -----------------------------------------------------------------------------------------

    def load(self) -> None:
        import llama_cpp

        logger.info(
            "loading %s: one context, %d sequence(s), %d thread(s)",
            self.model_path,
            self.parallel,
            self._n_threads,
        )
        _route_llama_log()
        llama_cpp.llama_backend_init()
        amx = amx_active()
        if amx:
            logger.warning("%s; this engine keeps the weights out of AMX buffers", amx_message("serve"))
        mparams = model_params(amx)
        model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"MODEL {self.model_path}: llama.cpp cannot load it")
        self._model = model
        self._vocab_p = llama_cpp.llama_model_get_vocab(model)
        train = int(llama_cpp.llama_model_n_ctx_train(model))
        self._seq_ctx = self._n_ctx or (
            min(train, DEFAULT_SEQUENCE_CTX) if train > 0 else DEFAULT_SEQUENCE_CTX
        )
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self._seq_ctx * self.parallel
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_batch
        cparams.n_seq_max = self.parallel
        cparams.n_threads = self._n_threads
        cparams.n_threads_batch = self._n_threads
        # one cell pool for all sequences: a prefix copied with seq_cp shares its cells
        cparams.kv_unified = True
        # attention as llama_cpp.Llama computes it by default (flash attention off): the same
        # request gives the same greedy answer from either engine
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ModelLoadError(
                f"MODEL {self.model_path}: llama.cpp cannot create a context of "
                f"{self.parallel} × {self._seq_ctx} tokens"
            )
        self._ctx = ctx
        self.metadata = self._read_metadata()
        self._vocab_size = self.n_vocab()
        self._vocab = self._vocab_p
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._instances = list(range(self.parallel))
        self._free = list(reversed(self._instances))
        if self._metrics is not None:
            self._nll_calc = BatchNLL(self._vocab_size, self._n_batch)
            self._nll_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-nll")
        self._scheduler = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._scheduler.start()

    def _read_metadata(self) -> dict[str, str]:
        import llama_cpp

        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1024)
        for i in range(int(llama_cpp.llama_model_meta_count(self._model))):
            n = llama_cpp.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            size = int(llama_cpp.llama_model_meta_val_str_by_index(self._model, i, None, 0))
            val = ctypes.create_string_buffer(max(1, size + 1))
            llama_cpp.llama_model_meta_val_str_by_index(self._model, i, val, len(val))
            out[key] = val.value.decode("utf-8", "replace")
        return out

    @property
    def loaded(self) -> bool:
        return self._ctx is not None

    @property
    def n_ctx(self) -> int:
        return self._seq_ctx

    def close(self) -> None:
        import llama_cpp

        with self._cond:
            self._closing = True
            for seq in list(self._active.values()) + list(self._incoming):
                seq.cancel.set()
            self._cond.notify_all()
        if self._scheduler is not None:
            self._scheduler.join()
            self._scheduler = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._nll_pool is not None:
            self._nll_pool.shutdown(wait=True)
            self._nll_pool = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        self._instances.clear()
        self._free.clear()

    # --- tokenizer -----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        import llama_cpp

        data = text.encode("utf-8")
        n_max = len(data) + 8
        tokens = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab_p, data, len(data), tokens, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            tokens = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab_p, data, len(data), tokens, n_max, add_bos, special)
        return list(tokens[:n])

    def _piece(self, token: int, *, special: bool) -> bytes:
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab_p, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab_p, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", "replace")

    def n_vocab(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_n_tokens(self._vocab_p))

    def bos_token(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_bos(self._vocab_p))

    def eos_token(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_eos(self._vocab_p))

    def add_bos(self) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab_p))

    @property
    def running(self) -> int:
        return len(self._active)

    # --- one generation (on an executor thread: hands the sequence over and waits) ----------------------

    def _generate(
        self,
        inst: Any,
        prompt: list[int],
        p: SamplingParams,
        cancel: threading.Event,
        emit: Emitter,
        endpoint: str,
        started: float,
        fault: TokenFault | None = None,
    ) -> None:
        seq = _Sequence(
            seq_id=int(inst),
            prompt=list(prompt),
            params=p,
            cancel=cancel,
            emit=emit,
            endpoint=endpoint,
            started=started,
            fault=fault,
            limit=min(p.max_tokens, self._seq_ctx - len(prompt)),
            run=_Run(prompt_tokens=len(prompt), started=started),
        )
        with self._cond:
            if self._closing:
                raise GenerationError("server shutting down")
            self._incoming.append(seq)
            self._cond.notify_all()
        seq.done.wait()
        if seq.error is not None:
            raise seq.error

    # --- the scheduler thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        import llama_cpp

        batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._incoming and not self._runnable():
                        self._flush()
                        self._cond.wait(self._wait_time())
                    if self._closing:
                        break
                    arrivals = list(self._incoming)
                    self._incoming.clear()
                if arrivals:  # admitting (prefix search, cache edits) never delays delivered tokens
                    self._flush()
                for seq in arrivals:
                    self._admit(seq)
                self._step(batch)
        except BaseException as exc:  # the context is unusable: fail everything still running
            logger.exception("batch scheduler failed")
            for seq in list(self._active.values()):
                self._fail(seq, GenerationError(f"generation failed: {exc}"))
        finally:
            for seq in list(self._active.values()) + list(self._incoming):
                self._finish(seq, "cancelled")
            self._incoming.clear()
            llama_cpp.llama_batch_free(batch)

    def _runnable(self) -> bool:
        now = time.perf_counter()
        return any(
            s.cancel.is_set() or s.prefilling or s.next_token is not None or (s.held and s.held[1] <= now)
            for s in self._active.values()
        )

    def _wait_time(self) -> float | None:
        dues = [s.held[1] for s in self._active.values() if s.held is not None]
        if dues:
            return max(0.0, min(dues) - time.perf_counter())
        return 0.05 if self._active else None  # a held-back cancel is checked every 50 ms

    def _admit(self, seq: _Sequence) -> None:
        import llama_cpp

        seq.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        seq.sampler = self._sampler(seq.params)
        seq.greedy = plain_greedy(seq.params)
        if seq.sampler is None:  # a grammar llama.cpp rejects (checked before; never the batch's problem)
            self._active[seq.seq_id] = seq
            self._fail(
                seq,
                InvalidRequestError(
                    "response_format: llama.cpp cannot compile its grammar", param="response_format"
                ),
            )
            return
        if seq.limit <= 0:
            self._active[seq.seq_id] = seq
            self._finish(seq, "length")
            return
        # the longest cached prefix of this prompt, in any slot (at least one prompt token is
        # decoded again: its logits start the generation)
        best_slot, best = seq.seq_id, 0
        for slot, cached in self._cache.items():
            n = _common_prefix(cached, seq.prompt, len(seq.prompt) - 1)
            if n > best or (n == best and slot == seq.seq_id):
                best_slot, best = slot, n
        mem = llama_cpp.llama_get_memory(self._ctx)
        if best_slot == seq.seq_id and best > 0:
            llama_cpp.llama_memory_seq_rm(mem, seq.seq_id, best, -1)
        else:
            llama_cpp.llama_memory_seq_rm(mem, seq.seq_id, -1, -1)
            if best > 0:
                llama_cpp.llama_memory_seq_cp(mem, best_slot, seq.seq_id, 0, best)
        seq.kv = seq.prompt[:best]
        seq.reused = best
        self.reused_tokens += best
        if self._metrics is not None:
            self._metrics.observe_reused_prompt(best)
        self._cache[seq.seq_id] = seq.kv
        self._active[seq.seq_id] = seq

    def _sampler(self, p: SamplingParams) -> Any:
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if p.grammar is not None:  # first: every later sampler only sees tokens the grammar allows
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab_p, p.grammar.encode("utf-8"), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                return None
            add(chain, grammar)
        if _penalized(p):
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab(), PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                ),
            )
        if p.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
        add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else random.getrandbits(31)
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _step(self, batch: Any) -> None:
        import llama_cpp

        now = time.perf_counter()
        for seq in list(self._active.values()):
            if seq.cancel.is_set():
                self._finish(seq, "cancelled")
            elif seq.held is not None and seq.held[1] <= now:
                token, _, nll = seq.held
                seq.held = None
                self._deliver(seq, token, time.perf_counter(), nll)
        entries: list[tuple[_Sequence, int]] = []  # (sequence, tokens added this step)
        n = 0
        outputs = 0  # entries with logits: their rows of llama_get_logits, in batch order
        # every generating sequence advances one token per step ...
        for seq in self._active.values():
            if seq.next_token is not None and n < self._n_batch:
                _batch_add(batch, n, seq.next_token, len(seq.kv), seq.seq_id, True)
                seq.batch_index = n
                seq.out_row = outputs
                outputs += 1
                seq.kv.append(seq.next_token)
                seq.next_token = None
                entries.append((seq, 1))
                n += 1
        decode_tokens = n
        # ... and prompts fill what is left of the batch, in arrival order, in chunks
        for seq in self._active.values():
            if not seq.prefilling or n >= self._n_batch:
                continue
            take = min(self._n_batch - n, len(seq.prompt) - len(seq.kv))
            start = len(seq.kv)
            for i in range(take):
                last = start + i == len(seq.prompt) - 1
                _batch_add(batch, n, seq.prompt[start + i], start + i, seq.seq_id, last)
                if last:
                    seq.batch_index = n
                    seq.out_row = outputs
                    outputs += 1
                n += 1
            seq.kv.extend(seq.prompt[start : start + take])
            entries.append((seq, take))
        if n == 0:
            return
        batch.n_tokens = n
        self._flush()  # the event loop runs while llama.cpp computes (ctypes releases the GIL)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        self.steps += 1
        self.decode_tokens += decode_tokens
        self.prefill_tokens += n - decode_tokens
        self.max_batch_sequences = max(self.max_batch_sequences, len(entries))
        if self._metrics is not None:
            self._metrics.observe_step(len(entries), n - decode_tokens, decode_tokens)
        if rc != 0:
            for seq, added in entries:
                del seq.kv[len(seq.kv) - added :]
                self._fail(seq, GenerationError(f"llama_decode failed (code {rc}) for a batch of {n} tokens"))
            return
        rows = self._rows(outputs)
        sampling = [seq for seq, _ in entries if not seq.prefilling and seq.batch_index >= 0]
        # the NLLs' log-sum-exps run on the helper while llama.cpp's sampler chains work (they
        # release the GIL); when every row is a plain greedy argmax there is nothing to overlap, so
        # the scheduler computes a share itself: one row alone, or half of several (the helper the
        # other half, at the same time: numpy releases the GIL)
        chains = any(not seq.greedy for seq in sampling)
        shared = outputs if chains else outputs // 2
        lse = self._start_nll(rows[:shared])
        own: Any = None
        now = time.perf_counter()
        sampled: list[tuple[_Sequence, int]] = []
        try:
            for seq in sampling:
                if seq.greedy:
                    token = int(rows[seq.out_row].argmax())
                    self.argmax_tokens += 1
                else:
                    token = int(llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.batch_index))
                if seq.params.logprobs is not None:
                    seq.run.logprobs.append(self._logprob(rows[seq.out_row], token, seq.params.logprobs))
                sampled.append((seq, token))
            own = self._own_nll(rows, shared, sampled)
        finally:  # the helper reads the context's logits: never past this step
            if lse is not None:
                wait([lse])
        nlls = self._nlls(lse, own, rows, sampled)
        for (seq, token), nll in zip(sampled, nlls, strict=True):
            seq.batch_index = -1
            seq.out_row = -1
            delay = seq.fault.delay_seconds if seq.fault is not None else 0.0
            if delay > 0:
                seq.held = (token, now + delay, nll)  # a slow model: this token "takes" delay longer
            else:
                self._deliver(seq, token, now, nll)

    def _rows(self, outputs: int) -> Any:
        """This step's ``outputs`` rows of logits, in batch order: a view of the context's buffer,
        valid (and unchanged by sampling) until the next ``llama_decode``."""
        import llama_cpp
        import numpy as np

        if outputs == 0:
            return np.empty((0, self._vocab_size), dtype=np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(outputs, self._vocab_size))

    def _start_nll(self, rows: Any) -> Future[Any] | None:
        """Start the log-sum-exps of this step's rows of logits on the helper thread."""
        if self._nll_pool is None or self._nll_calc is None or rows.shape[0] == 0:
            return None
        t0 = time.perf_counter()
        started = self._nll_pool.submit(self._nll_calc.logsumexp, rows)
        self.nll_seconds += time.perf_counter() - t0
        return started

    def _own_nll(self, rows: Any, shared: int, sampled: list[tuple[_Sequence, int]]) -> Any:
        """The log-sum-exps of the rows from ``shared`` on, on this thread (its scratch rows follow
        the helper's), or None without metrics or tokens."""
        if self._nll_calc is None or not sampled or shared >= rows.shape[0]:
            return None
        t0 = time.perf_counter()
        sums = self._nll_calc.logsumexp(rows[shared:], first=shared)
        self.nll_seconds += time.perf_counter() - t0
        return sums

    def _nlls(
        self, lse: Future[Any] | None, own: Any, rows: Any, sampled: list[tuple[_Sequence, int]]
    ) -> list[float | None]:
        """Each sampled token's NLL under the logits it was sampled from (the answer surprisal),
        from the helper's log-sum-exps of the first rows and this thread's of the rest."""
        if self._nll_calc is None or not sampled:
            return [None] * len(sampled)
        import numpy as np

        t0 = time.perf_counter()
        parts = [p for p in (lse.result() if lse is not None else None, own) if p is not None]
        sums = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = [
            BatchNLL.nll(float(sums[seq.out_row]), float(rows[seq.out_row, token])) for seq, token in sampled
        ]
        self.nll_seconds += time.perf_counter() - t0
        self.nll_tokens += len(sampled)
        return out

    def _logprob(self, row: Any, token: int, k: int) -> TokenLogprob:
        """The sampled token's logprob and the ``k`` most likely tokens, from the logits it was sampled
        from (``row``, valid until the next ``llama_decode``)."""
        return token_logprob(row, token, k, lambda t: self._piece(t, special=False))

    def _deliver(self, seq: _Sequence, token: int, now: float, nll: float | None) -> None:
        """One sampled token reaches its request (the body of the one-instance engine's loop)."""
        if self._is_eog(self._vocab, token):
            if seq.params.logprobs is not None and seq.run.logprobs:
                seq.run.logprobs.pop()  # the end-of-generation token is not part of the answer
            self._finish(seq, "stop")
            return
        run = seq.run
        run.tokens += 1
        run.token_ids.append(token)
        if nll is not None:
            run.nlls.append(nll)
        if run.last is None:
            run.ttft = now - seq.started
        else:
            run.gaps.append(now - run.last)
        run.last = now
        run.text += seq.decoder.decode(self._piece(token, special=False))
        ready, stopped = stop_cut(run.text, run.sent, seq.params.stop)
        if ready:
            self._outbox.append((seq.emit, run.delta(ready)))
            run.sent += len(ready)
        if stopped:
            run.text = run.text[: run.sent]
            self._finish(seq, "stop", cut_by_stop=True)
            return
        fail_after = seq.fault.error_after_tokens if seq.fault is not None else 0
        if fail_after and run.tokens >= fail_after:
            self._fail(
                seq,
                InjectedFaultError(
                    500,
                    f"fault injected: generation failed after {run.tokens} token(s) "
                    f"(fault_stream_error_after_tokens={fail_after})",
                ),
            )
            return
        if run.tokens >= seq.limit:
            self._finish(seq, "length")
            return
        seq.next_token = token

    def _flush(self) -> None:
        if self._outbox:
            items, self._outbox = self._outbox, []
            emit_together(items)

    def _release_sequence(self, seq: _Sequence) -> None:
        import llama_cpp

        self._active.pop(seq.seq_id, None)
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        # the cells stay cached for the next prompt with this prefix (trimmed or dropped on reuse)
        self._cache[seq.seq_id] = seq.kv

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if isinstance(error, InjectedFaultError):
            logger.warning("%s", error.message)
        self._release_sequence(seq)
        seq.error = error
        self._flush()  # its text so far reaches the request before the error does
        seq.done.set()

    def _finish(self, seq: _Sequence, reason: FinishReason, *, cut_by_stop: bool = False) -> None:
        self._release_sequence(seq)
        try:
            self._finish_run(
                seq.run,
                reason,
                decoder=None if cut_by_stop else seq.decoder,
                emit=lambda item: self._outbox.append((seq.emit, item)),
                endpoint=seq.endpoint,
                logprobs=seq.params.logprobs is not None,
            )
        except Exception:  # the request's loop is gone (shutdown): nobody is left to tell
            logger.exception("finishing a generation failed")
        finally:
            self._flush()
            seq.done.set()


_LLAMA_LOG: list[Any] = []  # the installed ctypes callback (kept alive while llama.cpp may call it)
_llama_logger = logging.getLogger("ggufship.llama")


def plain_greedy(p: SamplingParams) -> bool:
    """Whether ``p``'s sampler chain (:meth:`BatchEngine._sampler`) is llama.cpp's greedy sampler
    alone: temperature 0, no grammar, no penalties. Such a token is the argmax of the raw logits,
    which numpy finds in a few microseconds, where ``llama_sampler_sample`` first copies all
    ``n_vocab`` logits into a candidate array (~0.7 ms per token for a 262k vocabulary). Both take
    the first of equal maxima (``llama_sampler_greedy_apply``, src/llama-sampler.cpp, keeps the
    first index whose logit is strictly larger; ``numpy.argmax`` returns the first occurrence), so
    the tokens are the same."""
    return p.temperature <= 0 and p.grammar is None and not _penalized(p)


def _penalized(p: SamplingParams) -> bool:
    """Whether ``p`` asks for any repetition, frequency or presence penalty."""
    return p.repeat_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def model_params(amx: bool) -> Any:
    """llama.cpp's default model parameters, except with AMX kernels in the build (``amx``, see
    :func:`ggufship.runtime.amx_active`): then the weights stay in plain CPU buffers, out of the
    extra buffer types (AMX tiles, repacked layouts), so the AMX matrix multiply that segfaults on
    K-quants (``runtime.AMX_ISSUE``) is never called; the load takes the ordinary CPU kernels."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    if amx:
        params.use_extra_bufts = False
    return params


def _route_llama_log() -> None:
    """Send llama.cpp's own log (model loader, context warnings) through :mod:`logging`, so that
    ``--log-format json`` keeps stderr JSON: errors as warnings, the rest at debug level."""
    if _LLAMA_LOG:
        return
    import llama_cpp

    def forward(level: int, text: bytes, _user: Any) -> None:
        message = (text or b"").decode("utf-8", "replace").rstrip()
        if message:
            _llama_logger.log(logging.WARNING if level == 3 else logging.DEBUG, "%s", message)

    callback = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _LLAMA_LOG.append(callback)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), max(0, limit))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _batch_add(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits

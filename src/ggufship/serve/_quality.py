"""Online quality signals of one answer: pure functions, shared by every serving engine.

* :func:`token_nll` — the negative log-likelihood (nats) of the sampled token under the
  model's own next-token distribution: ``logsumexp(logits) - logits[token]`` on the raw
  logits llama.cpp computed for that position (before temperature, top-k/p, penalties),
  so it does not depend on the request's sampling parameters.
* :func:`answer_surprisal` — the mean of those over an answer's tokens (nats per token).
  High surprisal means the model found its own answer unlikely: a cheap *proxy* for
  uncertainty (and so for a raised risk of hallucination), **not** a hallucination
  detector — a confident wrong answer has low surprisal, and sampling at a high
  temperature raises it for any model. Compare tracks under the same traffic, never
  absolute values across models.
* :func:`is_looping` — the answer ends in a repeated n-gram: see its docstring.
* :func:`bad_answer_reason` — ``empty`` / ``loop`` / ``length`` (cut off at max_tokens or
  the context), or None.

Engines call them per generated token / per finished answer and report through
:meth:`ggufship.serve._metrics.ServeMetrics.observe_generation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

#: :func:`is_looping`: the repeated tail must cover at least this many tokens …
LOOP_MIN_TOKENS = 24
#: … and repeat its block at least this many times …
LOOP_MIN_REPEATS = 3
#: … for blocks of 1 to this many tokens.
LOOP_MAX_PERIOD = 32
#: :class:`BatchNLL`: a row's sum of unshifted exponentials at least this large is used as it is
#: (its largest term is then above 1e-26, far from float32's underflow near 1e-38)
LSE_DIRECT_MIN = 1e-20


def token_nll(logits: npt.ArrayLike, token: int) -> float:
    """``-log softmax(logits)[token]`` in nats (≥ 0).

    ``logits``: the raw next-token logits of one position (shape ``(n_vocab,)``); ``-inf``
    entries (masked tokens) are fine, except for ``token``. The exponentials are computed in
    float32 (values in (0, 1] after subtracting the maximum; ~10x faster than float64 here, an
    error far below 1e-4 nats) and summed in float64. Raises ValueError for a token outside the
    vocabulary, an empty or non-1-D array, a NaN or ``+inf`` logit, or a non-finite logit of
    ``token``.
    """
    row = np.asarray(logits)
    if row.dtype not in (np.float32, np.float64):
        row = row.astype(np.float32)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"logits: expected a non-empty 1-D array, got shape {row.shape}")
    if not 0 <= token < row.size:
        raise ValueError(f"token {token} is outside the vocabulary (0..{row.size - 1})")
    top = float(row.max())  # NaN anywhere → NaN
    if not math.isfinite(top):
        raise ValueError(f"logits: not finite (largest {top})")
    chosen = float(row[token])
    if not math.isfinite(chosen):
        raise ValueError(f"logits: the logit of token {token} is not finite ({chosen})")
    return max(0.0, _shifted_logsumexp(row, top) - chosen)


def _shifted_logsumexp(
    row: npt.NDArray[np.floating], top: float, work: npt.NDArray[np.float32] | None = None
) -> float:
    """``log(sum(exp(row)))`` the textbook way, shifted by the row's finite maximum ``top``: the
    exponentials in float32 (into ``work`` when given), summed in float64."""
    if work is None:
        shifted = (row - row.dtype.type(top)).astype(np.float32, copy=False)
    else:
        shifted = np.subtract(row, row.dtype.type(top), out=work)
    np.exp(shifted, out=shifted)
    return top + math.log(float(shifted.sum(dtype=np.float64)))


def answer_surprisal(nlls: Sequence[float]) -> float | None:
    """Mean NLL per token of one answer (nats); None for an answer without tokens."""
    if not nlls:
        return None
    return math.fsum(nlls) / len(nlls)


def is_looping(
    tokens: Sequence[int],
    *,
    min_tokens: int = LOOP_MIN_TOKENS,
    min_repeats: int = LOOP_MIN_REPEATS,
    max_period: int = LOOP_MAX_PERIOD,
) -> bool:
    """Whether the answer *ends* in a loop: for some block length ``p`` (1 ≤ p ≤ ``max_period``)
    its last ``L`` tokens are the same ``p`` tokens over and over (``tokens[i] == tokens[i - p]``
    throughout the tail), with ``L ≥ min_tokens`` and ``L ≥ min_repeats · p``.

    Defaults: a tail of ≥ 24 tokens made of ≥ 3 copies of a block of 1-32 tokens (e.g. the
    same token 24 times, a 5-token phrase 5 times, a 16-token sentence 3 times). A partial
    last copy counts (generation was cut mid-block). Repetition earlier in the answer that
    the model then left is not a loop.
    """
    n = len(tokens)
    for p in range(1, min(max_period, n // 2) + 1):
        run = 0  # tail positions i with tokens[i] == tokens[i - p]
        i = n - 1
        while i - p >= 0 and tokens[i] == tokens[i - p]:
            run += 1
            i -= 1
        tail = run + p
        if tail >= min_tokens and tail >= min_repeats * p:
            return True
    return False


def bad_answer_reason(text: str, tokens: Sequence[int], finish_reason: str) -> str | None:
    """Why a finished answer is bad, or None. One reason per answer, the first that applies:
    ``empty`` (no visible text: nothing, or only whitespace), ``loop`` (:func:`is_looping`
    on its tokens), ``length`` (cut off by max_tokens or the context window: ``finish_reason``
    ``"length"``)."""
    if not text.strip():
        return "empty"
    if is_looping(tokens):
        return "loop"
    if finish_reason == "length":
        return "length"
    return None


class BatchNLL:
    """:func:`token_nll` for every sampled row of one decode step in a few numpy calls, into a
    preallocated buffer (no per-token allocation: a 262k-entry row is 1 MiB).

    The work splits in two: :meth:`logsumexp` needs only the logits (the batch engine runs it on a
    helper thread while llama.cpp samples the same rows, or inline when no row needs llama.cpp's
    sampler), :meth:`nll` then needs the sampled token (one subtraction). ``rows`` is
    ``(n, n_vocab)`` float32 (llama.cpp's output logits of one step, in batch order). A row whose
    maximum or chosen logit is not finite gives None (the token is left out of the surprisal, as
    :func:`token_nll`'s ValueError is).

    Two passes per row, not four: ``exp`` of the raw logits and their sum, without first finding
    and subtracting the maximum. That is exact enough whenever the sum lands in
    [:data:`LSE_DIRECT_MIN`, float32's largest finite value]: then no term overflowed, and the terms
    that underflowed to zero weigh less than 1e-12 of the sum. Any other row (a logit above ~88, all
    logits below ~-46, a NaN or infinity) is computed again the textbook way, shifted by its
    maximum. The exponentials are summed in float32 (numpy's pairwise summation along the
    contiguous row: a relative error ~1e-6, far below 1e-4 nats).
    """

    def __init__(self, n_vocab: int, max_rows: int) -> None:
        self.n_vocab = n_vocab
        self._scratch = np.empty((max(1, max_rows), n_vocab), dtype=np.float32)

    def logsumexp(self, rows: npt.NDArray[np.float32], *, first: int = 0) -> npt.NDArray[np.float64]:
        """``log(sum(exp(row)))`` of each row (NaN for a row whose maximum is not finite), in the
        scratch rows from ``first`` on (two threads may work on one step's rows at once, each in
        its own scratch rows)."""
        n = rows.shape[0]
        room = self._scratch.shape[0] - first
        if rows.ndim != 2 or rows.shape[1] != self.n_vocab or n > room or first < 0:
            raise ValueError(
                f"logits: expected at most {room} rows of {self.n_vocab}, got shape {rows.shape}"
            )
        if n == 0:
            return np.empty(0, dtype=np.float64)
        work = self._scratch[first : first + n]
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            np.exp(rows, out=work)
            sums = work.sum(axis=1)
            lse = np.log(sums.astype(np.float64))
        direct = np.isfinite(sums) & (sums >= LSE_DIRECT_MIN)
        if not direct.all():
            for i in np.flatnonzero(~direct):
                top = float(rows[i].max())
                lse[i] = _shifted_logsumexp(rows[i], top, work[i]) if math.isfinite(top) else math.nan
        return lse  # type: ignore[no-any-return]

    @staticmethod
    def nll(lse: float, chosen: float) -> float | None:
        """One token's NLL from its row's :meth:`logsumexp` and its own logit (None: not finite)."""
        if not (math.isfinite(lse) and math.isfinite(chosen)):
            return None
        return max(0.0, lse - chosen)

    def __call__(
        self, rows: npt.NDArray[np.float32], tokens: Sequence[int] | npt.NDArray[np.int_]
    ) -> list[float | None]:
        """Both steps at once: one NLL (or None) per row."""
        idx = [int(t) for t in tokens]
        if len(idx) != rows.shape[0] or any(not 0 <= t < self.n_vocab for t in idx):
            raise ValueError(f"tokens: expected {rows.shape[0]} ids in 0..{self.n_vocab - 1}, got {idx[:8]}")
        lse = self.logsumexp(rows)
        return [self.nll(float(lse[i]), float(rows[i, t])) for i, t in enumerate(idx)]

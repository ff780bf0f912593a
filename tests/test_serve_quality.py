"""Online quality signals (issue 16 part 2): the pure functions of serve/_quality.py on tables,
and a real server of the tiny model exporting answer surprisal, answers, refusals and bad
answers per track — the surprisal checked against a teacher-forced reference computed by
a second llama.cpp instance with ``logits_all``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ggufship import metrics as m
from ggufship.serve._quality import (
    LSE_DIRECT_MIN,
    BatchNLL,
    answer_surprisal,
    bad_answer_reason,
    is_looping,
    token_nll,
)
from tests.serve_fixtures import RunningServer, running_server

# ---------------------------------------------------------------- token_nll


def test_token_nll_uniform_is_log_vocab() -> None:
    assert token_nll(np.zeros(1000, dtype=np.float32), 7) == pytest.approx(math.log(1000))


def test_token_nll_matches_log_softmax_and_is_shift_invariant() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, 512).astype(np.float32)
    ref = -(logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum()))
    for tok in (0, 17, 511, int(np.argmax(logits))):
        assert token_nll(logits, tok) == pytest.approx(ref[tok], rel=1e-6, abs=1e-6)
        assert token_nll(logits.astype(np.float64) + 1000.0, tok) == pytest.approx(
            ref[tok], rel=1e-6, abs=1e-6
        )


def test_token_nll_extreme_logits_stay_finite() -> None:
    logits = np.array([1e4, -1e4, 0.0])
    assert token_nll(logits, 0) == pytest.approx(0.0, abs=1e-12)
    assert token_nll(logits, 1) == pytest.approx(2e4)


def test_token_nll_masked_tokens() -> None:
    assert token_nll(np.array([0.0, -np.inf, 0.0]), 0) == pytest.approx(math.log(2))
    assert token_nll(np.array([1, 1, 1, 1], dtype=np.int32), 2) == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    ("logits", "token", "match"),
    [
        (np.zeros(4), 4, "outside the vocabulary"),
        (np.zeros(4), -1, "outside the vocabulary"),
        (np.zeros((2, 2)), 0, "1-D"),
        (np.zeros(0), 0, "1-D"),
        (np.array([0.0, np.nan]), 0, "finite"),
        (np.array([0.0, np.inf]), 0, "finite"),
        (np.array([0.0, -np.inf]), 1, "token 1 is not finite"),
    ],
)
def test_token_nll_bad_input(logits: np.ndarray, token: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        token_nll(logits, token)


# ---------------------------------------------------------------- BatchNLL


def _rows() -> dict[str, np.ndarray]:
    """Rows of 4096 logits that take each of BatchNLL's paths: summed directly (typical logits, a
    masked token, logits around -40) or shifted by the maximum (an overflowing maximum, all logits
    so negative that their exponentials underflow, one +inf or NaN logit)."""
    rng = np.random.default_rng(7)
    typical = rng.normal(0, 4, 4096).astype(np.float32) + 12
    masked = typical.copy()
    masked[::3] = -np.inf
    low = typical - 52  # the largest exp ~e^-26: still summed directly (above LSE_DIRECT_MIN)
    overflow = typical.copy()
    overflow[5] = 95.0  # exp(95) is not a float32
    underflow = typical - 200
    plus_inf = typical.copy()
    plus_inf[9] = np.inf
    nan = typical.copy()
    nan[2] = np.nan
    return {
        "typical": typical,
        "masked": masked,
        "low": low,
        "overflow": overflow,
        "underflow": underflow,
        "plus-inf": plus_inf,
        "nan": nan,
    }


def test_batch_nll_matches_token_nll_on_every_path() -> None:
    rows = _rows()
    calc = BatchNLL(4096, max_rows=len(rows))
    names = list(rows)
    stacked = np.stack([rows[k] for k in names])
    assert stacked.dtype == np.float32
    with np.errstate(all="ignore"):
        direct = np.exp(stacked).sum(axis=1)
    paths = {k: bool(np.isfinite(d) and d >= LSE_DIRECT_MIN) for k, d in zip(names, direct, strict=True)}
    assert paths == {
        "typical": True,
        "masked": True,
        "low": True,
        "overflow": False,
        "underflow": False,
        "plus-inf": False,
        "nan": False,
    }
    tokens = [int(np.nanargmax(np.where(np.isinf(r), np.nan, r))) for r in stacked]  # a finite logit
    tokens[1] = 1  # masked keeps every third token: token 1 is finite, not the maximum
    got = calc(stacked, tokens)
    for name, row, tok, nll in zip(names, stacked, tokens, got, strict=True):
        if name in ("plus-inf", "nan"):
            assert nll is None, name  # left out of the surprisal, as token_nll's ValueError is
            continue
        assert nll == pytest.approx(token_nll(row, tok), rel=1e-5, abs=1e-5), name
    # reusing the scratch buffer changes nothing, and fewer rows than max_rows are fine
    again = calc(stacked[:2], tokens[:2])
    assert again == pytest.approx(got[:2])


def test_batch_nll_masked_token_and_bad_shapes() -> None:
    calc = BatchNLL(4, max_rows=2)
    row = np.array([[0.0, -np.inf, 0.0, 0.0]], dtype=np.float32)
    assert calc(row, [1]) == [None]  # the chosen token itself is masked
    assert calc(row, [0]) == [pytest.approx(math.log(3))]
    with pytest.raises(ValueError, match="at most 2 rows of 4"):
        calc.logsumexp(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="at most 2 rows of 4"):
        calc.logsumexp(np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="tokens"):
        calc(np.zeros((1, 4), dtype=np.float32), [4])
    # a second thread's share of a step works in the scratch rows after the first one's
    rows = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    assert calc.logsumexp(rows[1:], first=1) == pytest.approx(calc.logsumexp(rows)[1:])
    with pytest.raises(ValueError, match="at most 1 rows of 4"):
        calc.logsumexp(rows, first=1)


def test_answer_surprisal() -> None:
    assert answer_surprisal([]) is None
    assert answer_surprisal([1.0, 2.0, 6.0]) == pytest.approx(3.0)


# ---------------------------------------------------------------- loops and bad answers

LOOPS = [
    ("one token 24 times", [5] * 24, True),
    ("one token 23 times: too short", [5] * 23, False),
    ("a 5-token phrase 5 times", [1, 2, 3, 4, 5] * 5, True),
    ("a 5-token phrase 4 times + 4 tokens (partial last copy)", [1, 2, 3, 4, 5] * 4 + [1, 2, 3, 4], True),
    ("a 16-token block 3 times", list(range(16)) * 3, True),
    ("a 16-token block twice: too few repeats", list(range(100, 116)) * 2, False),
    ("a 33-token block 3 times: period too long", list(range(33)) * 3, False),
    ("a loop the model left", [7] * 40 + list(range(10, 40)), False),
    ("prose", list(range(200)), False),
    ("loop after prose", list(range(100, 130)) + [8, 9] * 12, True),
    ("empty", [], False),
]


@pytest.mark.parametrize(("name", "tokens", "expected"), LOOPS, ids=[row[0] for row in LOOPS])
def test_is_looping(name: str, tokens: list[int], expected: bool) -> None:
    assert is_looping(tokens) is expected


BAD = [
    ("empty text", "", [], "stop", "empty"),
    ("whitespace only, cut off", " \n\t", [3, 3], "length", "empty"),
    ("a loop that ran to max_tokens", "ab" * 12, [1, 2] * 12, "length", "loop"),
    ("cut off", "a normal answer", list(range(8)), "length", "length"),
    ("stopped", "a normal answer", list(range(8)), "stop", None),
]


@pytest.mark.parametrize(("name", "text", "tokens", "finish", "expected"), BAD, ids=[r[0] for r in BAD])
def test_bad_answer_reason(
    name: str, text: str, tokens: list[int], finish: str, expected: str | None
) -> None:
    assert bad_answer_reason(text, tokens, finish) == expected


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[RunningServer]:
    from ggufship.serve import ServeSettings

    settings = ServeSettings(
        model=str(tiny_export),
        n_threads=1,
        parallel=1,
        track="canary",
        default_max_tokens=12,
        refusal_patterns=(r"(?i)\A\s*i can(no|')t",),  # nothing the tiny model says
    )
    with running_server(settings) as srv:
        yield srv


def samples(text: str, name: str, **labels: str) -> list[float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s.value)
    return out


def test_server_exports_quality_signals_per_track(server: RunningServer, tiny_export: Path) -> None:
    import llama_cpp

    engine = server.state.engine
    prompt = "The capital of France is"
    before = httpx.get(f"{server.url}/metrics").text
    count0 = sum(samples(before, f"{m.ANSWER_SURPRISAL}_count", track="canary"))
    sum0 = sum(samples(before, f"{m.ANSWER_SURPRISAL}_sum", track="canary"))
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    n = usage["completion_tokens"]
    assert n >= 1
    after = httpx.get(f"{server.url}/metrics").text
    assert sum(samples(after, f"{m.ANSWER_SURPRISAL}_count", track="canary")) == count0 + 1
    online = sum(samples(after, f"{m.ANSWER_SURPRISAL}_sum", track="canary")) - sum0
    # greedy: every token is the argmax, so its probability is >= 1/V and its NLL <= ln V
    assert 0.0 < online <= math.log(engine.n_vocab()) + 1e-6
    assert m.surprisal_buckets()[0] <= online <= m.surprisal_buckets()[-1]  # inside the buckets

    # Reference: teacher forcing of the same greedy tokens in a second instance with logits_all.
    gguf = next(tiny_export.glob("*-Q4_K_M.gguf"), None) or next(tiny_export.glob("*.gguf"))
    assert Path(server.state.engine.model_path).name == gguf.name
    ref = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_threads=1, verbose=False)
    try:
        ptoks = engine.tokenize(prompt, add_bos=engine.add_bos(), special=False)
        assert len(ptoks) == usage["prompt_tokens"]
        toks: list[int] = []
        vocab = llama_cpp.llama_model_get_vocab(ref.model)
        for t in ref.generate(ptoks, temp=0.0, top_k=40, top_p=1.0, min_p=0.05, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, t) or len(toks) == n:
                break
            toks.append(t)
        assert len(toks) == n
        ref.reset()
        ref.eval(ptoks + toks)
        rows = ref.scores[len(ptoks) - 1 : len(ptoks) - 1 + n]
        expected = float(np.mean([token_nll(row, t) for row, t in zip(rows, toks, strict=True)]))
    finally:
        ref.close()
    assert online == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_answers_refusals_and_bad_answers_count_per_answer(server: RunningServer) -> None:
    url = f"{server.url}/v1/completions"
    text0 = httpx.get(f"{server.url}/metrics").text
    answers0 = sum(samples(text0, m.ANSWERS, track="canary"))
    for max_tokens in (1, 2, 3):
        r = httpx.post(
            url,
            json={"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert sum(samples(text, m.ANSWERS, track="canary")) == answers0 + 3
    # every reason series exists (at 0 when unused), and so does the refusal counter
    for reason in m.BAD_ANSWER_REASONS:
        assert samples(text, m.BAD_ANSWERS, track="canary", reason=reason, endpoint="/v1/completions")
    assert samples(text, m.REFUSALS, track="canary", endpoint="/v1/completions") == [0.0]
    bad = sum(samples(text, m.BAD_ANSWERS, track="canary"))
    answers = sum(samples(text, m.ANSWERS, track="canary"))
    assert 0 <= bad <= answers
    # max_tokens 1-3 on a tiny random model: cut off (or empty, when only whitespace came out)
    length_or_empty = sum(samples(text, m.BAD_ANSWERS, track="canary", reason="length")) + sum(
        samples(text, m.BAD_ANSWERS, track="canary", reason="empty")
    )
    assert length_or_empty >= 3

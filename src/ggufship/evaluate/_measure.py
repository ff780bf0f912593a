"""Measure both exports on the golden set (I/O: loads GGUFs through llama.cpp)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ggufship.evaluate._checks import judge
from ggufship.evaluate._llama import GgufModel, ModelIdentity, kl_and_top1, opened
from ggufship.evaluate._model import (
    Answer,
    ContextOverflowError,
    EvaluatePolicy,
    ExampleScore,
    GoldenSet,
    IncomparableExportsError,
    QuantDrift,
    TrackMeasurement,
)

logger = logging.getLogger(__name__)


def compare_identity(
    candidate: ModelIdentity, stable: ModelIdentity, cand_path: Path, stable_path: Path
) -> None:
    """Refuse two GGUFs whose NLLs are not comparable (another architecture or tokenizer)."""
    problems = []
    if candidate.architecture != stable.architecture:
        problems.append(f"architecture {candidate.architecture!r} vs {stable.architecture!r}")
    if candidate.tokenizer_model != stable.tokenizer_model:
        problems.append(f"tokenizer model {candidate.tokenizer_model!r} vs {stable.tokenizer_model!r}")
    if candidate.n_vocab != stable.n_vocab:
        problems.append(f"vocabulary size {candidate.n_vocab} vs {stable.n_vocab}")
    elif candidate.tokenizer_sha256 != stable.tokenizer_sha256:
        problems.append("the vocabularies differ (same size, other tokens)")
    if problems:
        raise IncomparableExportsError(
            f"candidate {cand_path} and stable {stable_path} are not comparable: "
            + "; ".join(problems)
            + " (per-token NLLs of different tokenizers or architectures cannot be compared)"
        )


def measure_track(
    model: GgufModel, golden: GoldenSet, policy: EvaluatePolicy, *, name: str, version: str
) -> TrackMeasurement:
    """NLL of every reference answer and a greedy answer to every example with checks."""
    scores: list[ExampleScore] = []
    answers: list[Answer] = []
    skipped: list[str] = []
    for example in golden.examples:
        seq = model.sequence(example)
        total = len(seq.prompt) + len(seq.answer)
        too_long = total > model.n_ctx or len(seq.prompt) >= model.n_ctx
        if too_long:
            where = f"{golden.path}:{example.line} (id {example.id!r})"
            if policy.too_long == "refuse":
                raise ContextOverflowError(
                    f"{where}: {total} tokens do not fit the context window of {model.n_ctx} "
                    f"({model.path.name}); shorten the example or raise n_ctx"
                )
            logger.warning("%s: %d tokens > n_ctx %d: skipped", where, total, model.n_ctx)
            skipped.append(example.id)
            continue
        if seq.answer:
            scores.append(ExampleScore(id=example.id, tokens=len(seq.answer), nll_sum=model.answer_nll(seq)))
        if example.checks:
            text, finish = model.generate(seq, example)
            answers.append(judge(example, text, finish))
    return TrackMeasurement(
        name=name,
        version=version,
        gguf=model.path.name,
        scores=tuple(scores),
        answers=tuple(answers),
        skipped=tuple(skipped),
    )


def measure_drift(
    reference: Path,
    quantized: list[tuple[str, Path]],
    golden: GoldenSet,
    policy: EvaluatePolicy,
    *,
    threads: int | None = None,
) -> list[QuantDrift]:
    """Mean KL(F16 ‖ quant) and top-1 agreement over every position of every golden sequence
    (prompt + reference) that fits the context."""
    results: list[QuantDrift] = []
    with opened(reference, policy.n_ctx, threads) as ref:
        seqs = []
        for example in golden.examples:
            seq = ref.sequence(example)
            tokens = seq.prompt + seq.answer
            if 1 < len(tokens) <= ref.n_ctx:
                seqs.append((example.id, tokens))
        for quant, path in quantized:
            kls: list[np.ndarray] = []
            same: list[np.ndarray] = []
            per_example: list[float] = []
            with opened(path, policy.n_ctx, threads) as test:
                for _id, tokens in seqs:
                    if len(tokens) > test.n_ctx:
                        continue
                    kl, top1 = kl_and_top1(ref.logprobs(tokens), test.logprobs(tokens))
                    kls.append(kl)
                    same.append(top1)
                    per_example.append(float(kl.mean()))
            all_kl = np.concatenate(kls) if kls else np.zeros(0)
            all_same = np.concatenate(same) if same else np.zeros(0, dtype=bool)
            results.append(
                QuantDrift(
                    quantization=quant,
                    reference=reference.name,
                    positions=int(all_kl.size),
                    mean_kl=float(all_kl.mean()) if all_kl.size else 0.0,
                    max_kl=float(all_kl.max()) if all_kl.size else 0.0,
                    top1_agreement=float(all_same.mean()) if all_same.size else 0.0,
                    kl_per_example=tuple(per_example),
                )
            )
            logger.info(
                "drift %s vs %s: mean KL %.5f, top-1 agreement %.3f over %d positions",
                quant,
                reference.name,
                results[-1].mean_kl,
                results[-1].top1_agreement,
                results[-1].positions,
            )
    return results

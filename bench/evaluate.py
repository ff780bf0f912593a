"""Benchmark of ``ggufship evaluate``'s decision: false-fail rate on A/A pairs and power against a
graded series of damages, on tiny real checkpoints exported to GGUF and measured with llama.cpp.

    .venv/bin/python bench/evaluate.py [--seeds 20] [--damage-seeds 3] [--lora-steps 10] [--work DIR]

The tiny seeded Llama of the tests is first trained once on the golden set's domain
(``demo_golden.train_golden_base``: every weight, 300 full-batch steps; cached under ``--work``).
A/A: N LoRA fine-tunes of that trained base with the same recipe and different seeds
(``demo_golden.train_golden_adapter``: the LoRA init differs), each exported to F16 and measured
once on the demo golden set; every ordered pair (candidate i, stable j ≠ i) is one A/A
comparison judged by the pure core (``evaluate.decide``) with the default policy. A re-export
of fine-tune 0 (the same inputs exported again) is judged against fine-tune 0. Damage: the
first ``--damage-seeds`` fine-tunes exported from the trained base with its output layer scaled
by 1.02 … 1.5 (``damage_checkpoint``: sharper next-token distributions, same shapes, same
speed), each compared with every other undamaged fine-tune. Quantization drift: F16 vs Q8_0,
Q4_K_M, Q3_K_M and Q2_K of fine-tune 0. Prints Markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from ggufship.demo_checkpoint import TinySpec, build_checkpoint
from ggufship.demo_golden import (
    damage_checkpoint,
    train_golden_adapter,
    train_golden_base,
    write_golden_set,
)
from ggufship.evaluate import EvaluatePolicy, Measurement, decide, load_golden_set
from ggufship.evaluate._llama import opened
from ggufship.evaluate._measure import measure_drift, measure_track
from ggufship.export import ExportRequest, export_checkpoint

log = logging.getLogger("bench.evaluate")
SCALES = (1.02, 1.05, 1.1, 1.15, 1.25, 1.5)
DRIFT_QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--lora-steps", type=int, default=10)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--damage-seeds", type=int, default=3)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "ggufship.export", "ggufship.evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    policy = EvaluatePolicy()
    t_start = time.perf_counter()
    random_base = work / "base"
    if not (random_base / "config.json").is_file():
        build_checkpoint(random_base, TinySpec())
    base = work / "base-trained"
    if not (base / "config.json").is_file():
        t0 = time.perf_counter()
        train_golden_base(random_base, base, steps=args.base_steps)
        log.info("trained the base in %.0f s", time.perf_counter() - t0)
    golden = load_golden_set(write_golden_set(work / "golden.jsonl"))

    def export(adapter: Path, tag: str, quants: tuple[str, ...] = ("F16",), ckpt: Path = base) -> Path:
        out = work / f"export-{tag}"
        if (out / "manifest.json").is_file():  # a re-run with the same --work reuses its exports
            return out
        export_checkpoint(
            ExportRequest(
                checkpoint=ckpt, out_dir=out, name="tiny", version=tag, adapter=adapter, quants=quants
            )
        )
        return out

    def measure(out: Path, tag: str):
        with opened(out / f"tiny-{tag}-F16.gguf", policy.n_ctx, 1) as model:
            return measure_track(model, golden, policy, name="tiny", version=tag)

    good = []
    t_measure = 0.0
    for seed in range(args.seeds):
        tag = f"aa{seed}"
        adapter = work / f"lora-{seed}"
        if not (adapter / "adapter_config.json").is_file():
            train_golden_adapter(base, adapter, seed=seed, steps=args.lora_steps)
        out = export(adapter, tag, DRIFT_QUANTS if seed == 0 else ("F16",))
        t0 = time.perf_counter()
        good.append(measure(out, tag))
        t_measure += time.perf_counter() - t0
        log.info("good %d measured", seed)
    again = measure(export(work / "lora-0", "aa0-again"), "aa0-again")
    reexport = decide(Measurement(candidate=again, stable=good[0], examples=len(golden.examples)), policy)
    damaged_tracks: dict[float, list[tuple[int, object]]] = {}
    for seed in range(min(args.damage_seeds, args.seeds)):
        for scale in SCALES:
            tag = f"d{seed}x{scale:g}"
            damaged_base = work / f"base-trained-x{scale:g}"
            if not damaged_base.exists():
                damage_checkpoint(base, damaged_base, scale=scale)
            cand = measure(export(work / f"lora-{seed}", tag, ckpt=damaged_base), tag)
            damaged_tracks.setdefault(scale, []).append((seed, cand))
            log.info("damage %s measured", tag)

    def judge(pol: EvaluatePolicy):
        """A/A outcomes, failing components, Δ-PPLs; damaged outcomes per scale (pure decisions)."""
        aa, components, ppl = Counter(), Counter(), []
        for i, cand in enumerate(good):
            for j, stable in enumerate(good):
                if i != j:
                    v = decide(Measurement(candidate=cand, stable=stable, examples=len(golden.examples)), pol)
                    aa[v.outcome] += 1
                    components.update(
                        f"{c.name}:{c.outcome}" for c in v.components if c.outcome in ("fail", "inconclusive")
                    )
                    ppl.append(v.component("nll").values.get("delta_ppl"))
        damaged: dict[float, Counter] = {}
        dmg_ppl: dict[float, list[float]] = {}
        for scale, tracks in damaged_tracks.items():
            for seed, cand in tracks:
                for j, stable in enumerate(good):
                    if j == seed:
                        continue  # compared with the other fine-tunes, not its own undamaged twin
                    v = decide(Measurement(candidate=cand, stable=stable, examples=len(golden.examples)), pol)
                    damaged.setdefault(scale, Counter())[v.outcome] += 1
                    dmg_ppl.setdefault(scale, []).append(v.component("nll").values.get("delta_ppl") or 0.0)
        return aa, components, ppl, damaged, dmg_ppl

    aa, aa_components, aa_ppl, damaged, dmg_ppl = judge(policy)
    first = work / "export-aa0"
    drift = measure_drift(
        first / "tiny-aa0-F16.gguf",
        [(q, first / f"tiny-aa0-{q}.gguf") for q in DRIFT_QUANTS[1:]],
        golden,
        policy,
        threads=1,
    )
    total = time.perf_counter() - t_start

    n_aa = sum(aa.values())
    rx = reexport.component("nll").values
    print(
        f"\nre-export of fine-tune 0 vs fine-tune 0: {reexport.outcome} (Δ-PPL {rx.get('delta_ppl')}, "
        f"bounds {rx.get('delta_ppl_lower')} … {rx.get('delta_ppl_upper')})"
    )
    print(f"\nA/A: {args.seeds} fine-tunes, {n_aa} ordered pairs, default policy")
    print("| outcome | pairs | rate |\n|---|---|---|")
    for k in ("pass", "inconclusive", "fail"):
        print(f"| {k} | {aa[k]} | {aa[k] / n_aa:.1%} |")
    finite = sorted(abs(x) for x in aa_ppl if x is not None)
    if finite:
        print(f"\n|Δ-PPL| on A/A pairs: median {finite[len(finite) // 2]:.2%}, max {finite[-1]:.2%}")
    print("\nPower (damaged fine-tune vs each other undamaged fine-tune)")
    print(
        "| output-layer scale | pairs | fail | inconclusive | pass | median Δ-PPL |\n"
        "|---|---|---|---|---|---|"
    )
    for scale in SCALES:
        c = damaged.get(scale, Counter())
        n = sum(c.values()) or 1
        med = sorted(dmg_ppl.get(scale, [0.0]))[len(dmg_ppl.get(scale, [0.0])) // 2]
        print(
            f"| ×{scale:g} | {sum(c.values())} | {c['fail'] / n:.0%} | {c['inconclusive'] / n:.0%} | "
            f"{c['pass'] / n:.0%} | {med:+.1%} |"
        )
    print(f"\nfailing / inconclusive components on A/A pairs (default policy): {dict(aa_components)}")
    print("\nSweep of the effect floors (max_ppl_increase / max_check_drop; other settings default)")
    print(
        "| Δ-PPL floor / check floor | A/A fail | A/A inconclusive | "
        + " | ".join(f"fail at ×{s:g}" for s in SCALES)
        + " |\n|---|---|---|"
        + "---|" * len(SCALES)
    )
    sweep = [(0.05, 0.1), (0.10, 0.1), (0.10, 0.3), (0.20, 0.3), (0.20, 0.5)]
    for floor, check_floor in sweep:
        a2, _, _, d2, _ = judge(
            policy.model_copy(update={"max_ppl_increase": floor, "max_check_drop": check_floor})
        )
        n2 = sum(a2.values())
        cells = " | ".join(f"{d2[s]['fail'] / (sum(d2[s].values()) or 1):.0%}" for s in SCALES)
        print(
            f"| {floor:.0%} / {check_floor:.0%} | {a2['fail'] / n2:.1%} | "
            f"{a2['inconclusive'] / n2:.1%} | {cells} |"
        )
    print("\nQuantization drift of fine-tune 0 vs its F16")
    print(
        "| quantization | positions | mean KL | max KL | top-1 agreement | flagged |\n"
        "|---|---|---|---|---|---|"
    )
    for d in drift:
        flagged = d.mean_kl > policy.max_mean_kl or d.top1_agreement < policy.min_top1_agreement
        print(
            f"| {d.quantization} | {d.positions} | {d.mean_kl:.5f} | {d.max_kl:.4f} | "
            f"{d.top1_agreement:.1%} | {'yes' if flagged else 'no'} |"
        )
    print(
        f"\nmeasure per export (NLL + greedy answers, 1 thread): {t_measure / len(good):.1f} s; "
        f"total {total:.0f} s; LoRA steps {args.lora_steps}, base steps {args.base_steps}"
    )


if __name__ == "__main__":
    main()

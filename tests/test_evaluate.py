"""``ggufship evaluate`` end to end on tiny real exports measured with llama.cpp: a re-export of
the stable passes and is recorded in the manifest and card (then signed: editing a measured
metric breaks ``verify``), a damaged fine-tune fails, Q2_K is flagged by the drift check, and
every bad input is a typed error naming the file, line or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ggufship.cli.main import main
from ggufship.demo_golden import damage_checkpoint, write_golden_set
from ggufship.errors import ReleaseSpecError
from ggufship.evaluate import (
    ContextOverflowError,
    EvaluateInputError,
    EvaluatePolicy,
    EvaluateRequest,
    GoldenSetError,
    IncomparableExportsError,
    evaluate,
    load_golden_set,
)
from ggufship.evaluate._llama import ModelIdentity
from ggufship.evaluate._measure import compare_identity
from ggufship.export import ExportRequest, export_checkpoint
from ggufship.integrity import verify_export
from ggufship.manifest import Manifest
from ggufship.release import dataset_fingerprint
from tests.fixtures import checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def spec(root: Path) -> Path:
    golden = write_golden_set(root / "spec" / "golden.jsonl")
    path = root / "spec" / "release.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "evaluations": [
                    {"task": "text-generation", "dataset": "acme/eval", "metrics": {"accuracy": 0.8}}
                ],
                "golden_set": {
                    "name": "acme/golden",
                    "path": "golden.jsonl",
                    "fingerprint": dataset_fingerprint(golden),
                },
            }
        )
    )
    return path


def _export(
    root: Path,
    ckpt: Path,
    adapter: Path | None,
    version: str,
    quants: tuple[str, ...],
    spec: Path | None = None,
) -> Path:
    out = root / f"tiny-{version}"
    export_checkpoint(
        ExportRequest(
            checkpoint=ckpt,
            out_dir=out,
            name="tiny",
            version=version,
            adapter=adapter,
            quants=quants,
            release=spec,
        )
    )
    return out


@pytest.fixture(scope="module")
def stable(root: Path, llama_ckpt: Path, llama_lora: Path) -> Path:
    return _export(root, llama_ckpt, llama_lora, "1.0.0", ("F16", "Q8_0"))


@pytest.fixture(scope="module")
def reexport(root: Path, llama_ckpt: Path, llama_lora: Path, spec: Path) -> Path:
    """The stable's inputs exported again as another version (with the release spec)."""
    return _export(root, llama_ckpt, llama_lora, "1.0.1", ("F16", "Q8_0"), spec)


@pytest.fixture(scope="module")
def damaged(root: Path, llama_ckpt: Path, llama_lora: Path) -> Path:
    """The same fine-tune with its output layer scaled ×8 (same shapes, same speed)."""
    ckpt = damage_checkpoint(llama_ckpt, root / "ckpt-lm-head-x8", scale=8.0)
    return _export(root, ckpt, llama_lora, "1.1.0", ("F16",))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --- the acceptance path ---------------------------------------------------------------------------


def test_reexport_of_stable_passes_and_is_recorded(
    reexport: Path, stable: Path, spec: Path, tmp_path: Path
) -> None:
    cand = _copy(reexport, tmp_path)
    result = evaluate(
        EvaluateRequest(candidate=cand, stable=stable, release=spec, report_dir=tmp_path / "report")
    )
    assert result.verdict.outcome == "pass", result.verdict.reason
    nll = result.verdict.component("nll")
    assert nll.values["delta_ppl"] == pytest.approx(0.0, abs=1e-6)
    assert nll.values["examples"] == 28
    assert result.verdict.component("drift").outcome == "pass"  # Q8_0 vs F16
    manifest = Manifest.load(cand / "manifest.json")
    ev = manifest.evaluation
    assert ev is not None and ev.outcome == "pass"
    assert ev.golden_set.fingerprint == dataset_fingerprint(spec.parent / "golden.jsonl")
    assert ev.golden_set.name == "acme/golden" and ev.golden_set.examples == 28
    assert ev.stable.version == "1.0.0" and ev.stable.gguf == "tiny-1.0.0-F16.gguf"
    assert {"ggufship", "llama-cpp-python", "scipy", "numpy"} <= set(ev.tools)
    assert "nll.delta_ppl" in ev.metrics and "drift.Q8_0.mean_kl" in ev.metrics
    assert manifest.metadata["evaluations"][0]["metrics"] == {"accuracy": 0.8}  # declared, kept
    verify_export(cand)  # the card's new digest is in the manifest
    from ggufship.publish._modelpack import model_annotations

    ann = model_annotations(manifest, "sha256:" + "0" * 64)
    assert ann["io.ggufship.evaluation.outcome"] == "pass"
    assert ann["io.ggufship.evaluation.golden_set"] == f"acme/golden={ev.golden_set.fingerprint}"
    assert json.loads(ann["io.ggufship.evaluation.metrics"])["nll.delta_ppl"] == pytest.approx(0.0, abs=1e-6)
    assert "io.ggufship.evaluations" in ann  # the declared ones stay
    card = (cand / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    results = front["model-index"][0]["results"]
    sources = [r["source"]["name"] for r in results]
    assert any("declared" in s for s in sources) and any("measured" in s for s in sources)
    assert "## Measured evaluation" in card
    for f in ("verdict.json", "report.md", "nll-ecdf.png", "nll-deltas.png", "drift-kl.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0
    # a second run replaces the measured parts instead of adding to them
    evaluate(EvaluateRequest(candidate=cand, stable=stable, release=spec))
    card2 = (cand / "README.md").read_text()
    assert card2.count("## Measured evaluation") == 1
    assert len(yaml.safe_load(card2.split("---\n")[1])["model-index"][0]["results"]) == len(results)


def test_damaged_finetune_fails_through_the_cli(
    damaged: Path, stable: Path, spec: Path, tmp_path: Path, capsys
) -> None:
    cand = _copy(damaged, tmp_path)
    code = main(["evaluate", str(cand), "--stable", str(stable), "--release", str(spec), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1, out["reason"]
    assert out["outcome"] == "fail" and out["components"]["nll"] == "fail"
    assert out["metrics"]["nll.delta_ppl"] > 0.05
    assert Manifest.load(cand / "manifest.json").evaluation.outcome == "fail"


def test_q2k_is_flagged_by_the_drift_check(
    root: Path, llama_ckpt: Path, llama_lora: Path, stable: Path, spec: Path
) -> None:
    q2 = _export(root, llama_ckpt, llama_lora, "1.0.2", ("F16", "Q8_0", "Q2_K"))
    result = evaluate(EvaluateRequest(candidate=q2, stable=stable, release=spec, record=False))
    drift = result.verdict.component("drift")
    assert drift.outcome == "fail" and "Q2_K" in drift.reason and "Q8_0" not in drift.reason
    assert result.verdict.component("nll").outcome == "pass"
    assert result.verdict.outcome == "fail"
    assert "evaluation" not in json.loads((q2 / "manifest.json").read_text())  # record=False


def test_editing_a_measured_metric_breaks_verify(
    reexport: Path, stable: Path, spec: Path, tmp_path: Path
) -> None:
    from ggufship.sign import (
        SigningRequest,
        VerificationPolicy,
        generate_keypair,
        sign_export,
        verify_signed_export,
    )

    cand = _copy(reexport, tmp_path)
    evaluate(EvaluateRequest(candidate=cand, stable=stable, release=spec, drift=False))
    priv, pub = generate_keypair(tmp_path / "keys")
    sign_export(cand, SigningRequest(private_key=priv))
    verify_signed_export(cand, VerificationPolicy(public_key=pub))
    assert main(["verify", str(cand), "--public-key", str(pub)]) == 0
    data = json.loads((cand / "manifest.json").read_text())
    data["evaluation"]["metrics"]["nll.delta_ppl"] = -0.5
    (cand / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert main(["verify", str(cand), "--public-key", str(pub)]) != 0
    # and evaluate refuses to record into a signed export
    with pytest.raises(EvaluateInputError, match="already signed"):
        evaluate(EvaluateRequest(candidate=cand, stable=stable, release=spec))


# --- bad inputs -------------------------------------------------------------------------------------


def _golden(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "g.jsonl"
    path.write_text(text)
    return path


OK_LINE = '{"id": "a", "prompt": "Hi", "reference": "Hello"}\n'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"g\.jsonl: golden set is empty"),
        ("\n\n", r"g\.jsonl: golden set is empty"),
        (OK_LINE + "{not json\n", r"g\.jsonl:2: not JSONL"),
        (OK_LINE + "[1, 2]\n", r"g\.jsonl:2: each line must be a JSON object"),
        (
            '{"id": "a", "prompt": "Hi", "checks": [{"type": "bleu"}]}\n',
            r"g\.jsonl:1: field 'checks\.0\.type': unknown check type 'bleu'",
        ),
        (
            '{"id": "a", "prompt": "Hi", "checks": [{"type": "regex"}]}\n',
            r"g\.jsonl:1: field 'checks\.0\.pattern'",
        ),
        (
            '{"id": "a", "prompt": "Hi", "checks": [{"type": "regex", "pattern": "("}]}\n',
            r"g\.jsonl:1: field 'checks\.0\.pattern': not a regex",
        ),
        (
            '{"id": "a", "prompt": "Hi", "checks": [{"type": "json_schema", "schema": {"type": 5}}]}\n',
            r"g\.jsonl:1: field 'checks\.0\.schema': invalid",
        ),
        (
            '{"id": "a", "prompt": "Hi", "reference": "x", "max_tokens": 0}\n',
            r"g\.jsonl:1: field 'max_tokens'",
        ),
        ('{"id": "a", "prompt": "Hi"}\n', r"g\.jsonl:1: an example needs a 'reference'"),
        ('{"id": "a", "prompt": "Hi", "messages": [], "reference": "x"}\n', r"g\.jsonl:1: exactly one of"),
        (
            '{"id": "a", "messages": [{"role": "robot", "content": "x"}], "reference": "x"}\n',
            r"g\.jsonl:1: field 'messages\.0\.role'",
        ),
        (OK_LINE + OK_LINE, r"g\.jsonl:2: field 'id': 'a' already used on line 1"),
        ('{"id": "a", "prompt": "Hi", "reference": "x", "colour": 1}\n', r"g\.jsonl:1: field 'colour'"),
    ],
)
def test_bad_golden_set_names_file_line_field(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(GoldenSetError, match=match):
        load_golden_set(_golden(tmp_path, text))


def test_golden_missing_not_utf8_and_fingerprint(tmp_path: Path) -> None:
    with pytest.raises(GoldenSetError, match=r"nope\.jsonl: golden set not found"):
        load_golden_set(tmp_path / "nope.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(GoldenSetError, match=r"b\.jsonl: not UTF-8"):
        load_golden_set(binary)
    with pytest.raises(GoldenSetError, match="not a directory"):
        load_golden_set(tmp_path)
    path = _golden(tmp_path, OK_LINE)
    with pytest.raises(GoldenSetError, match=r"fingerprint blake3:0+ != computed blake3:"):
        load_golden_set(path, fingerprint="blake3:" + "0" * 64)
    assert load_golden_set(path, fingerprint=dataset_fingerprint(path)).examples[0].id == "a"


def test_release_spec_golden_set_errors(tmp_path: Path) -> None:
    from ggufship.release import load_release_spec

    spec = tmp_path / "release.yaml"
    spec.write_text("golden_set: {name: g, path: missing.jsonl}\n")
    with pytest.raises(ReleaseSpecError, match=r"golden_set\.path: .*missing\.jsonl does not exist"):
        load_release_spec(spec)
    _golden(tmp_path, OK_LINE)
    spec.write_text(f"golden_set: {{name: g, path: g.jsonl, fingerprint: 'blake3:{'1' * 64}'}}\n")
    with pytest.raises(ReleaseSpecError, match=r"golden_set\.fingerprint: blake3:1+ != computed"):
        load_release_spec(spec)
    spec.write_text("evaluations: []\n")
    with pytest.raises(GoldenSetError, match=r"release\.yaml: golden_set: not declared"):
        evaluate(EvaluateRequest(candidate=tmp_path, stable=tmp_path, release=spec))


def test_identity_mismatch_is_refused() -> None:
    a = ModelIdentity("llama", "llama/default", 512, "0" * 64)
    compare_identity(a, a, Path("c"), Path("s"))
    for other, what in [
        (ModelIdentity("qwen2", "llama/default", 512, "0" * 64), "architecture"),
        (ModelIdentity("llama", "gpt2/qwen2", 512, "0" * 64), "tokenizer model"),
        (ModelIdentity("llama", "llama/default", 400, "1" * 64), "vocabulary size"),
        (ModelIdentity("llama", "llama/default", 512, "1" * 64), "vocabularies differ"),
    ]:
        with pytest.raises(IncomparableExportsError, match=what):
            compare_identity(a, other, Path("c"), Path("s"))


def test_stable_with_another_tokenizer_is_refused(root: Path, stable: Path, spec: Path) -> None:
    ckpt = checkpoints.llama(root / "other-vocab", vocab_size=400)
    other = _export(root, ckpt, None, "9.0.0", ("F16",))
    with pytest.raises(IncomparableExportsError, match="vocabular"):
        evaluate(EvaluateRequest(candidate=other, stable=stable, release=spec, record=False))


def test_examples_longer_than_the_context_are_skipped_or_refused(
    stable: Path, reexport: Path, tmp_path: Path
) -> None:
    long = "word " * 200
    lines = [json.dumps({"id": f"s{i}", "prompt": f"Say {i}", "reference": "ok"}) for i in range(20)]
    lines.append(json.dumps({"id": "long", "prompt": long, "reference": "ok"}))
    golden = _golden(tmp_path, "\n".join(lines) + "\n")
    policy = EvaluatePolicy(n_ctx=64)
    req = EvaluateRequest(
        candidate=reexport, stable=stable, golden=golden, policy=policy, record=False, drift=False
    )
    result = evaluate(req)
    nll = result.verdict.component("nll")
    assert nll.values["skipped_too_long"] == 1 and nll.values["examples"] == 20
    assert result.record.golden_set.skipped_too_long == 1
    refuse = EvaluateRequest(**{**req.__dict__, "policy": EvaluatePolicy(n_ctx=64, too_long="refuse")})
    with pytest.raises(
        ContextOverflowError,
        match=r"g\.jsonl:21 \(id 'long'\): \d+ tokens do not fit the context window of 64",
    ):
        evaluate(refuse)


def test_cli_errors_have_their_own_exit_codes(stable: Path, tmp_path: Path) -> None:
    golden = _golden(tmp_path, '{"id": "a", "prompt": "Hi", "checks": [{"type": "bleu"}]}\n')
    assert main(["evaluate", str(stable), "--stable", str(stable), "--golden", str(golden)]) == 91
    assert (
        main(["evaluate", str(stable), "--stable", str(stable), "--golden", str(golden), "--alpha", "2"])
        == 93
    )
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(stable), "--golden", str(golden)])  # --stable missing
    assert exc.value.code == 93
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "none"),
                "--stable",
                str(stable),
                "--golden",
                str(_golden(tmp_path, OK_LINE)),
            ]
        )
        == 93
    )


# --- the pipeline step (between export and sign) ----------------------------------------------------


def test_pipeline_step_stops_a_failed_evaluation(
    damaged: Path, stable: Path, spec: Path, tmp_path: Path
) -> None:
    from ggufship.pipeline.evaluation import EvaluationFailedError, evaluate_step

    with pytest.raises(EvaluationFailedError, match="the candidate failed: nll") as err:
        evaluate_step(
            export_dir=str(damaged),
            out_dir=str(tmp_path / "out"),
            report_dir=str(tmp_path / "report"),
            stable_export=str(stable),
            release=str(spec),
        )
    assert err.value.exit_code == 75
    assert (tmp_path / "report" / "report.md").read_text().count("Outcome: fail") == 1
    assert "evaluation" not in json.loads((damaged / "manifest.json").read_text())  # input untouched


def test_pipeline_step_passes_or_skips(reexport: Path, stable: Path, spec: Path, tmp_path: Path) -> None:
    from ggufship.errors import UsageError
    from ggufship.pipeline.evaluation import evaluate_step

    meta = evaluate_step(
        export_dir=str(reexport),
        out_dir=str(tmp_path / "out"),
        report_dir=str(tmp_path / "report"),
        stable_export=str(stable),
        release=str(spec),
    )
    assert meta["evaluation"] == "pass" and meta["evaluation.nll.delta_ppl"] == pytest.approx(0.0, abs=1e-6)
    assert Manifest.load(tmp_path / "out" / "manifest.json").evaluation.outcome == "pass"
    skipped = evaluate_step(
        export_dir=str(reexport), out_dir=str(tmp_path / "o2"), report_dir=str(tmp_path / "r2")
    )
    assert skipped["evaluation"] == "skipped"
    assert "evaluation" not in json.loads((tmp_path / "o2" / "manifest.json").read_text())
    with pytest.raises(UsageError, match="on_inconclusive"):
        evaluate_step(
            export_dir=str(reexport), out_dir=str(tmp_path / "o3"), report_dir="r", on_inconclusive="maybe"
        )

"""The demo behind ``ggufship demo``: the whole path on the embedded default.

1. build a tiny seeded Llama checkpoint and a LoRA adapter (or take the user's);
2. start the local services (S3, OCI registry, GitOps repo, Prometheus) under the
   demo's state dir and generate a signing key;
3. release ``1.0.0`` through the real KFP pipeline definition under ``kfp.local``
   (export → sign → publish to S3, OCI and GitOps; nothing to canary against yet);
4. release ``1.1.0`` through the same pipeline with ``deploy_mode=local``: the deploy
   step pulls both releases back from the registry (digests + signature checked) and
   runs the local canary rollout (stable 1.0.0, canary 1.1.0) — it promotes;
5. a second rollout whose canary is regressed (fault injection: +0.5 s on every
   request, the server's documented, default-off setting) — the gate fails it and the
   rollout aborts back to the stable;
6. a quality-regressed release ``1.2.0``: a fine-tune of the demo model that answers
   everything with a refusal (:func:`~ggufship.demo_golden.train_refusing_checkpoint`; same
   shapes, so the same speed). (a) The pipeline with ``evaluate_against`` the stable and a
   release spec that declares the demo golden set: ``evaluate`` fails it and the run stops
   before sign and publish. (b) Forced through with the evaluation off (its unsigned export
   rolled out directly): the canary's online quality signals (the refusal rate, with answer
   surprisal and bad answers, next to latency) abort it while its latency passes;
7. stop the services and print the reports' paths.

Every run starts clean: the services a previous run left (``--keep-services``, or one that
was killed) are stopped and the demo's state — S3 objects, the OCI registry, the GitOps
repository, Prometheus data, pulled models, rollout state, pipeline outputs — is wiped
before the services start again. The releases are re-published each run: the exports are
byte-identical, but a signature is not (ECDSA signs with a fresh random nonce), so the
signed release of a second run *is* other content for the same version, which publish
rightly refuses. Kept across runs: the generated checkpoint and LoRA adapter (seeded) and
the signing key pair.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from ggufship.demo_checkpoint import build_checkpoint, build_lora_adapter
from ggufship.demo_golden import train_refusing_checkpoint, write_golden_set
from ggufship.environment import environment
from ggufship.errors import GgufshipError
from ggufship.progress import Reporter

logger = logging.getLogger(__name__)

NAME = "tiny-llama-demo"

#: Rollout settings for the demo (environment of the pipeline's deploy step and of the
#: second rollout): the chart's steps, short analysis windows for a tiny model on a small
#: machine, paced load, one llama thread per API process (two processes share the cores),
#: a p99 threshold of 3 s instead of 1.2 s (a busy 2-core laptop queues requests), and
#: effect-size floors above the per-process CPU noise of such a machine (an injected
#: +0.5 s on a ~20 ms request is far above them).
ROLLOUT_ENV = {
    "GGUFSHIP_ROLLOUT_STEPS": "[5, 50, 100]",
    # The chart's plan (steps, limits), its times scaled to seconds. The window (capped at the
    # time since the weight change) grows while a pause's background measurements run.
    "GGUFSHIP_ROLLOUT_ANALYSIS_WINDOW_S": "120",
    "GGUFSHIP_ROLLOUT_ANALYSIS_DELAY_S": "25",
    "GGUFSHIP_ROLLOUT_ANALYSIS_INTERVAL_S": "3",
    "GGUFSHIP_ROLLOUT_ANALYSIS_COUNT": "1",
    "GGUFSHIP_ROLLOUT_PAUSE_TIMEOUT_S": "120",
    "GGUFSHIP_ROLLOUT_SETTLE_S": "2",
    "GGUFSHIP_ROLLOUT_LOAD_CONCURRENCY": "2",
    "GGUFSHIP_ROLLOUT_LOAD_RATE_PER_S": "30",
    "GGUFSHIP_SERVE_N_THREADS": "1",
    "GGUFSHIP_ROLLOUT_LOAD_MAX_TOKENS": "2",
    "GGUFSHIP_ROLLOUT_LOAD_MAX_SECONDS": "400",
    "GGUFSHIP_ROLLOUT_START_TIMEOUT_S": "120",
    "GGUFSHIP_ROLLOUT_GATE": json.dumps(
        {
            "min_samples": 8,
            "metrics": ["latency", "ttft"],
            "max_p99_s": 3.0,
            "min_ks_d": 0.3,
            "min_median_shift": 0.5,
        }
    ),
}
REGRESSION_ENV = {"GGUFSHIP_SERVE_FAULT_DELAY_SECONDS": "0.5", "GGUFSHIP_SERVE_FAULT_DELAY_FRACTION": "1"}
#: The quality rollout's gate: latency and TTFT (the same floors as above: they must pass) plus
#: the answers' quality signals — surprisal (KS) and the refusal and bad-answer rates (one-sided
#: Fisher tests, +2 points floor) — with answers long enough to hold a refusal.
QUALITY_GATE = {
    "min_samples": 8,
    "metrics": ["latency", "ttft", "surprisal"],
    "rates": ["refusal", "bad_answer"],
    "max_p99_s": 3.0,
    "min_ks_d": 0.3,
    "min_median_shift": 0.5,
}
QUALITY_LOAD_MAX_TOKENS = 12


class DemoError(GgufshipError):
    """A demo stage did not end the way the demo expects (the message says which)."""

    exit_code = 1


def _demo_release(workdir: Path) -> Path:
    data_dir = workdir / "dataset"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.jsonl").write_text(
        '{"prompt": "What is GGUF?", "completion": "A file format for llama.cpp."}\n', encoding="utf-8"
    )
    spec = {
        "base_model": "ggufship/tiny-llama-demo",
        "base_model_relation": "adapter",
        "license": "apache-2.0",
        "description": "A tiny Llama-architecture demo model with a LoRA adapter, built on this machine.",
        "tags": ["demo"],
        "hyperparameters": {"learning_rate": 0.01, "lora_r": 4, "lora_alpha": 8, "steps": 4},
        "datasets": [{"name": "ggufship/demo-instructions", "uri": "file://dataset", "path": "dataset"}],
        "evaluations": [
            {"task": "text-generation", "dataset": "ggufship/demo-eval", "metrics": {"loss": 6.2}}
        ],
    }
    path = workdir / "release.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _run_dir(pipeline_root: Path) -> Path:
    runs = sorted(p for p in pipeline_root.iterdir() if p.name.startswith("export-to-canary-"))
    if not runs:
        raise DemoError(f"no pipeline run under {pipeline_root}")
    return runs[-1]


def _task_output(run_dir: Path, task: str) -> dict[str, Any]:
    path = run_dir / task / "executor_output.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_demo(
    workdir: Path,
    *,
    checkpoint: Path | None = None,
    adapter: Path | None = None,
    reporter: Reporter | None = None,
    keep_services: bool = False,
) -> str:
    """Run the demo; return a short human summary (with the reports' paths)."""
    from ggufship.pipeline import embedded_targets, run_local
    from ggufship.services import ServicesSettings, down, up
    from ggufship.sign import generate_keypair

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = workdir / "checkpoints" / "base"
        adapter = workdir / "checkpoints" / "lora"
        if not (checkpoint / "config.json").exists():
            logger.info("building a tiny seeded checkpoint and LoRA adapter in %s", checkpoint.parent)
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
            build_checkpoint(checkpoint)
            build_lora_adapter(checkpoint, adapter)
    release = _demo_release(workdir)
    state_dir = workdir / "services"
    keys = workdir / "keys"
    private_key = keys / "ggufship.key"
    if not private_key.exists():
        shutil.rmtree(keys, ignore_errors=True)
        private_key, _ = generate_keypair(keys)
    pipeline_root = workdir / "kfp"
    shutil.rmtree(pipeline_root, ignore_errors=True)
    _start_clean(state_dir)

    lines: list[str] = []
    logger.info("starting the local services in %s", state_dir)
    up(ServicesSettings(state_dir=state_dir))
    try:
        targets, env = embedded_targets(state_dir, NAME)
        common: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "adapter": str(adapter) if adapter else "",
            "name": NAME,
            "release": str(release),
            "signing_method": "key",
            "signing_key": str(private_key),
            "environment": "demo",
            "state_dir": str(state_dir),
            **targets,
        }

        # 1.0.0: export → sign → publish; no stable to canary against yet.
        logger.info("release 1.0.0: KFP pipeline (kfp.local) export → sign → publish")
        root1 = pipeline_root / "1.0.0"
        run_local({**common, "version": "1.0.0", "deploy_mode": "none"}, pipeline_root=root1, env=env)
        run1 = _run_dir(root1)
        pub1 = _task_output(run1, "publish-model").get("parameterValues", {})
        lines.append("release 1.0.0 (pipeline: export → sign → publish)")
        lines += [f"  {k}: {v}" for k, v in pub1.items() if v]

        # 1.1.0: the same pipeline, deployed as a canary of 1.0.0 by the local rollout.
        logger.info("release 1.1.0: KFP pipeline with deploy_mode=local (canary of 1.0.0)")
        root2 = pipeline_root / "1.1.0"
        with environment(ROLLOUT_ENV):
            run_local(
                {**common, "version": "1.1.0", "deploy_mode": "local", "stable_model": pub1["model_uri"]},
                pipeline_root=root2,
                env=env,
            )
        run2 = _run_dir(root2)
        pub2 = _task_output(run2, "publish-model").get("parameterValues", {})
        report_good = run2 / "deploy-and-await" / "report"
        lines.append("release 1.1.0 (pipeline: export → sign → publish → local canary rollout)")
        lines += [f"  {k}: {v}" for k, v in pub2.items() if v]
        lines.append("  canary: promoted (gate passed)")
        lines.append(f"  report: {report_good}")

        # A regressed canary: the same release with +0.5 s injected on the canary.
        logger.info("regressed canary: +0.5 s injected latency on the canary; expecting an abort")
        bad = _regressed_rollout(state_dir, pulled_from=state_dir / "pulled")
        lines.append("regressed canary (fault injection +0.5 s per request)")
        lines.append(f"  rollout: {bad['phase']} — {bad['reason']}")
        lines += [f"  report: {r}" for r in bad["reports"]] or ["  report: (none written)"]
        lines.append(f"  status: {bad['status']}")

        # 1.2.0: a quality-regressed release at normal speed.
        lines += _quality_regressed_release(
            workdir, checkpoint, common, env, pipeline_root, state_dir, stable=state_dir / "pulled"
        )
    finally:
        if not keep_services:
            down(state_dir)
    return "\n".join(lines) + "\n"


def _start_clean(state_dir: Path) -> None:
    """Stop what a previous run left running under ``state_dir`` and remove all its state."""
    from ggufship.services import down

    if not state_dir.exists():
        return
    logger.info("removing the previous demo run's services and data in %s", state_dir)
    still_running = down(state_dir, purge=True)
    if still_running:
        logger.info("stopped leftover services of a previous run: %s", ", ".join(still_running))
    try:
        shutil.rmtree(state_dir)
    except OSError as exc:
        raise DemoError(f"cannot remove the previous demo run's state {state_dir}: {exc}") from exc


def _regressed_rollout(state_dir: Path, pulled_from: Path) -> dict[str, Any]:
    from ggufship.rollout import RolloutRequest, RolloutSettings, run_rollout

    pulled = sorted(p for p in pulled_from.iterdir() if p.is_dir()) if pulled_from.is_dir() else []
    if not pulled:
        raise DemoError(f"no pulled release under {pulled_from} to run the regressed canary with")
    model = pulled[-1]
    # The whole rollout under ROLLOUT_ENV, not only its settings: the API processes it starts read
    # GGUFSHIP_SERVE_N_THREADS from the environment (two 2-thread processes on 2 cores made the
    # tracks' latencies differ by ±50 % and the quality canary's latency check flaky).
    with environment(ROLLOUT_ENV):
        status = run_rollout(
            RolloutRequest(
                stable=model,
                canary=model,
                state_dir=state_dir,
                auto_promote=True,
                settings=RolloutSettings(analysis_reports=True),
                canary_env=dict(REGRESSION_ENV),
            )
        )
    if status.phase != "Degraded":
        raise DemoError(f"the regressed canary was not rolled back (phase {status.phase}): {status.message}")
    reports = [a.report for a in status.analyses if getattr(a, "report", None)]
    return {
        "phase": status.phase,
        "reason": status.abort_reason or status.message,
        "reports": reports,
        "status": str(state_dir / "rollout" / "status.json"),
    }


def _stable_export(pulled_from: Path) -> Path:
    pulled = sorted(p for p in pulled_from.iterdir() if p.is_dir()) if pulled_from.is_dir() else []
    if not pulled:
        raise DemoError(f"no pulled release under {pulled_from} to compare the quality-regressed one with")
    return pulled[-1]


def _quality_regressed_release(
    workdir: Path,
    checkpoint: Path,
    common: dict[str, Any],
    env: dict[str, str],
    pipeline_root: Path,
    state_dir: Path,
    *,
    stable: Path,
) -> list[str]:
    """Release 1.2.0, an over-refusing fine-tune: stopped by ``evaluate`` in the pipeline, then
    forced through as a canary whose online quality signals abort it."""
    from ggufship.pipeline import run_local
    from ggufship.pipeline.evaluation import EvaluationFailedError
    from ggufship.rollout import DEFAULT_PROMPTS, RolloutRequest, RolloutSettings, run_rollout

    stable_export = _stable_export(stable)
    bad_ckpt = workdir / "checkpoints" / "over-refusing"
    if not (bad_ckpt / "config.json").exists():
        logger.info("training the over-refusing fine-tune of the demo model in %s", bad_ckpt)
        train_refusing_checkpoint(checkpoint, bad_ckpt, prompts=DEFAULT_PROMPTS)
    golden = write_golden_set(workdir / "golden" / "demo-golden.jsonl")
    spec = yaml.safe_load((workdir / "release.yaml").read_text(encoding="utf-8"))
    spec["description"] = "The demo model fine-tuned to refuse everything: a quality regression."
    spec["golden_set"] = {"name": "ggufship/demo-golden", "path": str(golden)}
    release = workdir / "release-quality.yaml"
    release.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")

    lines = ["quality-regressed release 1.2.0 (a fine-tune that refuses everything, same shapes and speed)"]
    # (a) the pipeline evaluates it against the stable before signing: it must stop there.
    logger.info("release 1.2.0: KFP pipeline with evaluate_against the stable; expecting evaluate to stop it")
    root3 = pipeline_root / "1.2.0"
    args = {
        **common,
        "checkpoint": str(bad_ckpt),
        "adapter": "",
        "release": str(release),
        "version": "1.2.0",
        "deploy_mode": "none",
        "evaluate_against": str(stable_export),
    }
    try:
        run_local(args, pipeline_root=root3, env=env)
    except GgufshipError as exc:
        stopped = str(exc)
    else:
        raise DemoError("the quality-regressed release passed the pipeline: evaluate did not stop it")
    run3 = _run_dir(root3)
    if (run3 / "publish-model").exists() or (run3 / "sign-model").exists():
        raise DemoError(f"the quality-regressed release reached sign/publish ({run3})")
    reports = sorted(run3.glob("evaluate-model/**/report.md"))
    verdict = _evaluation_verdict(run3)
    if verdict.get("outcome") != "fail":
        raise DemoError(f"evaluate did not fail the quality-regressed release: {verdict or stopped}")
    lines.append(
        f"  evaluate: fail — pipeline stopped before sign and publish "
        f"(exit code {EvaluationFailedError.exit_code}, EvaluationFailedError)"
    )
    lines.append(f"  reason: {verdict.get('reason', '')}")
    lines += [f"  report: {r}" for r in reports]

    # (b) forced through with the evaluation off: its export goes straight to a canary.
    candidate = _export_output(run3)
    logger.info("quality-regressed canary (evaluation off): expecting the online quality signals to abort it")
    with environment(ROLLOUT_ENV):  # the API processes too (see _regressed_rollout)
        settings = RolloutSettings(
            analysis_reports=True, gate=QUALITY_GATE, load_max_tokens=QUALITY_LOAD_MAX_TOKENS
        )
        status = run_rollout(
            RolloutRequest(
                stable=stable_export,
                canary=candidate,
                state_dir=state_dir,
                auto_promote=True,
                settings=settings,
            )
        )
    if status.phase != "Degraded":
        raise DemoError(
            f"the quality-regressed canary was not rolled back (phase {status.phase}): {status.message}"
        )
    lines.append("quality-regressed canary, forced through with evaluation off (no injected delay)")
    lines.append(f"  rollout: {status.phase} — {status.abort_reason or status.message}")
    failed = [a for a in status.analyses if a.outcome == "fail"]
    checks = failed[-1].verdict.get("checks", []) if failed else []
    for check in checks:
        if check.get("kind") in ("ks", "proportion"):
            lines.append(f"  gate {check.get('name')}: {check.get('outcome')} — {check.get('reason', '')}")
    lines += [f"  report: {a.report}" for a in status.analyses if getattr(a, "report", None)]
    return lines


def _evaluation_verdict(run_dir: Path) -> dict[str, Any]:
    """The evaluate step's verdict: ``evaluation`` of the evaluated copy's manifest, else the
    outcome line of its report (``**Outcome: fail** — reason``)."""
    for manifest in sorted(run_dir.glob("evaluate-model/**/manifest.json")):
        data = json.loads(manifest.read_text(encoding="utf-8")).get("evaluation")
        if data:
            return dict(data)
    for report in sorted(run_dir.glob("evaluate-model/**/report.md")):
        for line in report.read_text(encoding="utf-8").splitlines():
            if line.startswith("**Outcome: "):
                outcome, _, reason = line.removeprefix("**Outcome: ").partition("** — ")
                return {"outcome": outcome, "reason": reason}
    return {}


def _export_output(run_dir: Path) -> Path:
    manifests = sorted(run_dir.glob("export-model/**/manifest.json"))
    if not manifests:
        raise DemoError(f"no export under {run_dir / 'export-model'}")
    return manifests[0].parent

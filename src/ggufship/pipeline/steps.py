"""The library calls behind each KFP component of the ``export-to-canary`` pipeline.

Each component in :mod:`ggufship.pipeline.components` is a typed signature plus one
call into this module. The functions take and return plain values (paths,
strings, dicts) because that is what crosses a KFP task boundary; they call the
stage libraries (export, sign, publish, rollout) and return the metadata the
component records on its output artifact.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ggufship.errors import GgufshipError, UsageError
from ggufship.retry import poll_results

logger = logging.getLogger(__name__)

DEPLOY_MODES = ("gitops", "patch", "local", "none")
SIGNING_METHODS = ("key", "sigstore", "none")


class PipelineStepError(GgufshipError):
    """A pipeline step could not complete (the message names the step and the cause)."""

    exit_code = 70


class RolloutAbortedError(PipelineStepError):
    """The canary was aborted (the gate failed or a person aborted it): the release did not ship."""

    exit_code = 71


class RolloutTimeoutError(PipelineStepError):
    """The rollout neither promoted nor aborted within the allowed time."""

    exit_code = 72


def _quiet_http_logs() -> None:
    """KFP's executor logs at INFO; a line per HTTP request (httpx) would drown the task's log."""
    for name in ("httpx", "httpcore", "urllib3", "git.remote"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def model_metadata(export_dir: Path) -> dict[str, Any]:
    """``sha256``, ``size`` and ``quantization`` of the export's primary GGUF (the first
    non-F16/F32 one, else the first), plus every file's digest, for ``Output[Model].metadata``."""
    from ggufship.manifest import MANIFEST_NAME, Manifest

    manifest = Manifest.load(export_dir / MANIFEST_NAME)
    ggufs = manifest.gguf_files()
    if not ggufs:
        raise PipelineStepError(f"export {export_dir}: manifest.json lists no GGUF file")
    primary = next(
        (f for f in ggufs if (f.quantization or "").upper() not in ("F16", "F32", "BF16")), ggufs[0]
    )
    from ggufship.publish._gitops import deployed_file

    deployed = deployed_file(manifest, None)
    return {
        "name": manifest.name,
        "version": manifest.version,
        # The GGUF the GitOps values deploy (its digest is what the Rollout's pod template carries).
        "deployed_sha256": deployed.sha256,
        "deployed_quantization": deployed.quantization or "",
        "sha256": primary.sha256,
        "size": primary.size,
        "quantization": primary.quantization or "",
        "path": primary.path,
        "files": {f.path: f.sha256 for f in manifest.files},
    }


def export(
    *,
    checkpoint: str,
    out_dir: str,
    name: str,
    version: str,
    adapter: str = "",
    quantizations: str = "F16,Q4_K_M",
    release: str = "",
    release_repo: str = "",
    release_revision: str = "",
) -> dict[str, Any]:
    """Export the checkpoint (merging the adapter when given) into ``out_dir``.

    ``checkpoint``/``adapter``: a local or mounted-volume path, or ``s3://bucket/prefix``;
    ``release``: the same, or, with ``release_repo``, a path in that Git repository at
    ``release_revision`` (:func:`ggufship.pipeline.inputs.resolve_release_input`)."""
    from ggufship.export import ExportRequest, export_checkpoint
    from ggufship.runtime import load_ggml_backends

    load_ggml_backends()  # the export loads the GGUF for tokenizer parity checks

    quants = _split(quantizations)
    if not quants:
        raise UsageError("quantizations: give at least one, comma-separated (e.g. 'F16,Q4_K_M')")
    import tempfile

    from ggufship.pipeline.inputs import resolve_dir_input, resolve_release_input

    # s3:// inputs are fetched (every object under the prefix, sizes checked) into a temp dir first.
    with tempfile.TemporaryDirectory(prefix="ggufship-inputs-") as tmp:
        work = Path(tmp)
        export_checkpoint(
            ExportRequest(
                checkpoint=resolve_dir_input(checkpoint, "checkpoint", work),
                out_dir=Path(out_dir),
                name=name,
                version=version,
                adapter=resolve_dir_input(adapter, "adapter", work) if adapter else None,
                release=(
                    resolve_release_input(release, work, repo=release_repo, revision=release_revision)
                    if release
                    else None
                ),
                quants=quants,
            )
        )
    return model_metadata(Path(out_dir))


def sign(
    *,
    export_dir: str,
    out_dir: str,
    method: str = "key",
    private_key: str = "",
    certificate: str = "",
    certificate_chain: str = "",
    trust_config: str = "",
) -> dict[str, Any]:
    """Copy the export to ``out_dir`` (KFP input artifacts are read-only) and sign the copy."""
    if method not in SIGNING_METHODS:
        raise UsageError(f"signing method {method!r}: use one of {', '.join(SIGNING_METHODS)}")
    src, dst = Path(export_dir), Path(out_dir)
    if dst.exists() and any(dst.iterdir()):
        raise PipelineStepError(f"sign: output {dst} is not empty")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        if method != "none":
            from ggufship.sign import SigningRequest, sign_export

            request = SigningRequest(
                private_key=Path(private_key) if private_key else None,
                certificate=Path(certificate) if certificate else None,
                certificate_chain=tuple(Path(p) for p in _split(certificate_chain)),
                sigstore=method == "sigstore",
                trust_config=Path(trust_config) if trust_config else None,
            )
            sign_export(tmp, request)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = model_metadata(dst)
    meta["signature"] = "model.sig" if method != "none" else ""
    meta["signing_method"] = method
    return meta


def publish(
    *,
    export_dir: str,
    s3: str = "",
    oci: str = "",
    gitops: str = "",
    environment: str = "staging",
    force: bool = False,
    create_bucket: bool = False,
) -> dict[str, str]:
    """Publish the export to each target given; returns the URIs/refs/commit (empty when skipped).

    Connection settings and credentials come from the environment only (``GGUFSHIP_S3_*``,
    ``GGUFSHIP_OCI_*``, else the Docker config's login; ``GGUFSHIP_GIT_TOKEN``): the local
    runner (:func:`ggufship.pipeline.embedded_targets`) puts the embedded services' there.
    """
    from ggufship.publish import GitOpsTarget, PublishRequest, S3Target
    from ggufship.publish import publish as publish_export
    from ggufship.publish._oci import oci_settings, parse_oci_uri

    if not (s3 or oci or gitops):
        raise UsageError("publish: give at least one target (s3, oci, gitops)")
    _quiet_http_logs()
    oci_target = None
    if oci:
        registry, repository, _ = parse_oci_uri(oci if oci.startswith("oci://") else f"oci://{oci}")
        oci_target = oci_settings().target(registry, repository)
    request = PublishRequest(
        s3=S3Target.from_uri(s3, create_bucket=create_bucket) if s3 else None,
        oci=oci_target,
        gitops=GitOpsTarget(url=gitops, environment=environment) if gitops else None,
        force=force,
    )
    result = publish_export(Path(export_dir), request)
    return {
        "s3_uri": result.s3.uri if result.s3 is not None else "",
        "oci_reference": str(getattr(result.oci, "reference", "")) if result.oci is not None else "",
        "gitops_commit": result.gitops.commit if result.gitops is not None else "",
        "manifest_sha256": result.manifest_sha256,
    }


def deploy_and_await(
    *,
    mode: str,
    model_uri: str,
    model_sha256: str,
    rollout_name: str = "",
    namespace: str = "default",
    stable_model: str = "",
    state_dir: str = "",
    timeout_s: float = 3600.0,
    poll_s: float = 10.0,
    report_path: str = "",
    raise_on_abort: bool = True,
) -> dict[str, Any]:
    """Deploy the published model and wait for the canary's outcome.

    ``mode``: ``gitops`` (the GitOps commit is the deploy; Argo CD syncs it) or
    ``patch`` (patch the Rollout's model URI) then watch the Argo Rollout until the
    revision carrying ``model_sha256`` is stable and Healthy (promoted) or Degraded
    (aborted) — see :mod:`ggufship.pipeline.rollout_state`; ``local`` runs the local
    rollout (``ggufship rollout``) of ``model_uri`` against ``stable_model`` on this
    machine; ``none`` deploys nothing. Raises :class:`RolloutAbortedError` when the
    canary was aborted, :class:`RolloutTimeoutError` when it was not final within
    ``timeout_s``. Returns the verdict (``outcome``, ``phase``, analyses) and writes a
    Markdown report to ``report_path``.
    """
    if mode not in DEPLOY_MODES:
        raise UsageError(f"deploy mode {mode!r}: use one of {', '.join(DEPLOY_MODES)}")
    _quiet_http_logs()
    if mode in ("local", "patch") and not model_uri:
        raise UsageError(
            f"deploy mode {mode!r} needs model_uri (publish to an s3 or oci target: the published "
            "model is what the canary serves)"
        )
    if mode == "none":
        verdict: dict[str, Any] = {"outcome": "skipped", "phase": "", "analyses": []}
    elif mode == "local":
        verdict = _local_rollout(model_uri, stable_model, state_dir)
    else:
        if not rollout_name:
            raise UsageError(f"deploy mode {mode!r} needs rollout_name (the Argo Rollout to watch)")
        if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
            raise UsageError(
                f"deploy mode {mode!r}: model_sha256 {model_sha256!r} is not a 64-digit lowercase hex "
                "SHA256 (the digest the Rollout's pod template must carry before the canary counts)"
            )
        if mode == "patch":
            _patch_rollout(rollout_name, namespace, model_uri, model_sha256)
        verdict = _await_rollout(rollout_name, namespace, model_sha256, timeout_s, poll_s)
    if report_path:
        Path(report_path).write_text(render_report(verdict, model_uri, model_sha256), encoding="utf-8")
    if raise_on_abort and verdict["outcome"] == "aborted":
        phase, message = verdict.get("phase") or "Degraded", verdict.get("message") or "gate failed"
        raise RolloutAbortedError(f"canary aborted ({phase}): {message}")
    if raise_on_abort and verdict["outcome"] == "timed-out":
        raise RolloutTimeoutError(
            f"rollout {namespace}/{rollout_name} not final after {timeout_s:.0f} s: {verdict.get('message')}"
        )
    return verdict


#: Attempts of the publish task for failures that may pass (endpoint unreachable), and the waits between.
PUBLISH_ATTEMPTS = 3
PUBLISH_BACKOFF_S: tuple[float, ...] = (5.0, 20.0)


def _may_pass(exc: Exception) -> bool:
    """An unreachable registry, or an S3 endpoint that did not answer (not one that refused access)."""
    import urllib3

    from ggufship.publish._oci import OciUnavailableError

    return isinstance(exc, OciUnavailableError) or isinstance(exc.__cause__, urllib3.exceptions.HTTPError)


def publish_outputs(
    *,
    export_dir: str,
    s3: str,
    oci: str,
    gitops: str,
    environment: str,
    force: bool,
    create_bucket: bool = False,
) -> tuple[str, str, str, str, str]:
    """:func:`publish` for the KFP component:
    ``(s3_uri, oci_reference, gitops_commit, model_uri, model_sha256)``; ``model_uri`` is what
    the deploy step serves (the OCI reference if published there, else S3, else empty) and
    ``model_sha256`` the digest of the GGUF the GitOps values deploy (what the Rollout's pod
    template carries), so the deploy step needs only these strings, not the export.

    The task has no KFP retry policy (KFP retries every failure alike, and a conflict — the
    version already published with other content — never resolves: it only cost minutes of
    backoff). Instead the failures that may pass, an unreachable S3 endpoint or registry,
    are retried here (:data:`PUBLISH_ATTEMPTS` attempts, :data:`PUBLISH_BACKOFF_S` apart);
    everything else — a conflict, a bad export, refused credentials — fails at once.
    Publishing is idempotent, so a retry after a partial publish is safe.
    """
    from ggufship.publish import S3AccessError
    from ggufship.publish._oci import OciUnavailableError
    from ggufship.retry import call_with_retries

    out = call_with_retries(
        lambda: publish(
            export_dir=export_dir,
            s3=s3,
            oci=oci,
            gitops=gitops,
            environment=environment,
            force=force,
            create_bucket=create_bucket,
        ),
        attempts=PUBLISH_ATTEMPTS,
        backoff_s=PUBLISH_BACKOFF_S,
        may_pass=lambda exc: isinstance(exc, (S3AccessError, OciUnavailableError)) and _may_pass(exc),
        logger=logger,
        what="publish",
    )
    s3_uri, oci_ref = out.get("s3_uri", ""), out.get("oci_reference", "")
    model_uri = f"oci://{oci_ref}" if oci_ref else s3_uri
    sha256 = str(model_metadata(Path(export_dir))["deployed_sha256"])
    return s3_uri, oci_ref, out.get("gitops_commit", ""), model_uri, sha256


def deploy_component(*, verdict: Any, report_path: str, **kwargs: Any) -> str:
    """:func:`deploy_and_await` for the KFP component: records the outcome on the ``Metrics``
    artifact and the report, then fails the task when the canary was aborted."""
    result = deploy_and_await(report_path=report_path, raise_on_abort=False, **kwargs)
    verdict.log_metric("promoted", 1.0 if result["outcome"] == "promoted" else 0.0)
    verdict.log_metric("analyses", float(len(result.get("analyses") or [])))
    verdict.metadata["outcome"] = result["outcome"]
    verdict.metadata["phase"] = result.get("phase", "")
    if result["outcome"] in ("not-promoted", "timed-out"):
        raise RolloutTimeoutError(f"canary not promoted ({result.get('phase')}): {result.get('message')}")
    if result["outcome"] == "aborted":
        raise RolloutAbortedError(
            f"canary aborted ({result.get('phase') or 'Degraded'}): {result.get('message') or 'gate failed'}"
        )
    return str(result["outcome"])


def rollback_on_failure(
    *,
    state: str,
    error_message: str,
    name: str,
    version: str,
    gitops: str,
    environment: str,
) -> str:
    """The exit handler of the pipeline: when the run did not succeed, write the rollback to Git.

    ``state`` is the pipeline's final state (``PipelineTaskFinalStatus.state``: SUCCEEDED,
    FAILED, CANCELED...). Returns ``skipped`` (succeeded, or no GitOps repository),
    ``rolled-back`` or ``nothing-to-roll-back`` (Git does not name this release: it was
    never deployed, or is already rolled back).
    """
    if state == "SUCCEEDED" or not gitops:
        logger.info("exit handler: pipeline %s; no rollback", state or "state unknown")
        return "skipped"
    from ggufship.rollback import RollbackRequest, rollback

    _quiet_http_logs()
    first_line = (error_message or "").strip().splitlines()[:1]
    verdict = f"pipeline {state}" + (f": {first_line[0][:300]}" if first_line else "")
    result = rollback(
        RollbackRequest(
            url=gitops, name=name, environment=environment, rejected_version=version, verdict=verdict
        )
    )
    return "rolled-back" if result.rolled_back else "nothing-to-roll-back"


def render_report(verdict: dict[str, Any], model_uri: str, model_sha256: str) -> str:
    lines = [
        "# ggufship release outcome",
        "",
        f"- model: `{model_uri}`",
        f"- sha256: `{model_sha256}`",
        f"- outcome: **{verdict['outcome']}**",
    ]
    if verdict.get("phase"):
        lines.append(f"- rollout phase: {verdict['phase']}")
    if verdict.get("message"):
        lines.append(f"- message: {verdict['message']}")
    if verdict.get("report"):
        lines.append(f"- gate report: `{verdict['report']}`")
    analyses = verdict.get("analyses") or []
    if analyses:
        lines += ["", "## Analyses", "", "```json", json.dumps(analyses, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def _local_model(uri: str, workdir: Path) -> Path:
    """A local export dir for ``uri``: pulled (digests checked) when it is ``s3://`` or ``oci://``."""
    if not uri.startswith(("s3://", "oci://")):
        return Path(uri)
    from ggufship.publish import pull

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri.split("://", 1)[1])[:120]
    dest = workdir / "pulled" / safe
    if dest.is_dir() and any(dest.iterdir()):
        shutil.rmtree(dest)
    return pull(uri, dest)


def _local_rollout(model_uri: str, stable_model: str, state_dir: str) -> dict[str, Any]:
    from ggufship.rollout import RolloutRequest, run_rollout
    from ggufship.services import resolve_state_dir

    if not stable_model:
        raise UsageError("deploy mode 'local' needs stable_model (the export currently serving)")
    state = resolve_state_dir(state_dir)
    status = run_rollout(
        RolloutRequest(
            stable=_local_model(stable_model, state),
            canary=_local_model(model_uri, state),
            auto_promote=True,
            state_dir=state,
        )
    )
    data = json.loads(status.model_dump_json(by_alias=True))
    phase = str(data.get("phase") or "")
    if data.get("promoted"):
        outcome = "promoted"
    elif data.get("aborted"):
        outcome = "aborted"
    else:  # e.g. paused on an inconclusive analysis until the pause timed out: not shipped
        outcome = "aborted" if phase == "Degraded" else "not-promoted"
    return {
        "outcome": outcome,
        "phase": phase,
        "message": data.get("abort_reason") or data.get("pause_reason") or data.get("message", ""),
        "analyses": data.get("analyses", []),
    }


def _kube_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def _patch_rollout(name: str, namespace: str, model_uri: str, model_sha256: str) -> None:
    api = _kube_api()
    body = {
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {
                        "ggufship.io/model-uri": model_uri,
                        "ggufship.io/model-sha256": model_sha256,
                    }
                }
            }
        }
    }
    api.patch_namespaced_custom_object("argoproj.io", "v1alpha1", namespace, "rollouts", name, body)
    logger.info("patched rollout %s/%s to %s", namespace, name, model_uri)


def _await_rollout(
    name: str,
    namespace: str,
    model_sha256: str,
    timeout_s: float,
    poll_s: float,
    *,
    get_rollout: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the Argo Rollout until :func:`~ggufship.pipeline.rollout_state.assess` gives a final state.

    Waits (logging each change of state) while Argo CD has not synced the release's digest
    into the pod template, the controller has not observed the new generation, the canary
    is progressing or paused for promotion. ``get_rollout`` (default: the Kubernetes API)
    returns the Rollout object; an API error is logged and retried until the deadline.
    """
    from ggufship.pipeline.rollout_state import RolloutAssessment, assess

    if get_rollout is None:
        api = _kube_api()

        def get_rollout() -> Any:
            return api.get_namespaced_custom_object("argoproj.io", "v1alpha1", namespace, "rollouts", name)

    deadline = clock() + timeout_s
    last = ""
    paused_seen = False
    started = clock()

    def read() -> RolloutAssessment:
        nonlocal last, paused_seen, started
        started = clock()
        try:
            obj: Any = get_rollout()
        except Exception as exc:  # the API server may be briefly unreachable: no data is "waiting"
            logger.warning("rollout %s/%s: cannot read it: %s", namespace, name, exc)
            obj = None
        reading = assess(obj, model_sha256, time_left_s=deadline - clock())
        line = reading.summary()
        if line != last:
            logger.info("rollout %s/%s: %s", namespace, name, line)
            last = line
        paused_seen = paused_seen or reading.state == "paused"
        return reading

    # A read begun at the deadline is final (assess: "timed-out"), so give_up only bounds the loop.
    reading = poll_results(
        read,
        done=lambda reading: reading.final,
        give_up=lambda _reading: started >= deadline,
        wait_s=lambda _reading: max(0.0, min(poll_s, deadline - clock())),
        sleep=sleep,
    )
    return {
        "outcome": reading.state,
        "phase": reading.phase,
        "message": reading.reason if not reading.message else f"{reading.reason} ({reading.message})",
        "revision": reading.current_pod_hash,
        "paused_for_promotion": paused_seen,
        "analyses": [],
    }

"""KFP v2 lightweight Python components of the ``export-to-canary`` pipeline.

They live in the package (with the pipeline, :mod:`ggufship.pipeline.definition`) so that
``ggufship pipeline compile`` works from an installed wheel. Each component is a typed
signature, a docstring and one call into ``ggufship.pipeline.steps``; the work lives in
the library, so the same code runs in a unit test, under ``kfp.local`` and on a cluster.
``base_image`` is the one ggufship image (``components/Dockerfile``), which already holds
ggufship and its dependencies, so nothing is pip-installed at run time
(``install_kfp_package=False``: kfp is in the image too).

The image is read from ``GGUFSHIP_IMAGE`` when this module is imported (i.e. at
compile time); the golden YAML uses the default below.
"""

import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("GGUFSHIP_IMAGE", "ghcr.io/acme/ggufship:0.1.0")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export_model(
    checkpoint: str,
    name: str,
    version: str,
    adapter: str,
    quantizations: str,
    release: str,
    release_repo: str,
    release_revision: str,
    model: Output[Model],
) -> None:
    """Export a Hugging Face checkpoint (LoRA adapter merged when given) to GGUF files with
    SHA256 digests, manifest.json and a model card. ``model.metadata`` gets ``sha256``,
    ``size`` and ``quantization`` of the primary GGUF plus every file's digest. ``checkpoint``,
    ``adapter`` and ``release`` are local/volume paths or ``s3://bucket/prefix`` URIs (fetched
    first; ``release`` then names the spec object, e.g. ``s3://b/p/release.yaml``). With
    ``release_repo``, ``release`` is a path in that Git repository at ``release_revision``."""
    from ggufship.pipeline import steps

    model.metadata.update(
        steps.export(
            checkpoint=checkpoint,
            out_dir=model.path,
            name=name,
            version=version,
            adapter=adapter,
            quantizations=quantizations,
            release=release,
            release_repo=release_repo,
            release_revision=release_revision,
        )
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    stable_export: str,
    release: str,
    release_repo: str,
    release_revision: str,
    on_inconclusive: str,
    evaluated_model: Output[Model],
    report: Output[Artifact],
) -> None:
    """Evaluate the export against the stable export on the release spec's golden set (Δ-PPL,
    checks, quantization drift) and record the result in the copy's manifest before signing;
    fails the run when the evaluation fails (or is inconclusive and ``on_inconclusive`` is
    ``stop``). ``report`` holds report.md, verdict.json and the PNGs. Empty ``stable_export``:
    skipped (metadata ``evaluation: skipped``)."""
    from ggufship.pipeline import evaluation

    evaluated_model.metadata.update(
        evaluation.evaluate_step(
            export_dir=model.path,
            out_dir=evaluated_model.path,
            report_dir=report.path,
            stable_export=stable_export,
            release=release,
            release_repo=release_repo,
            release_revision=release_revision,
            on_inconclusive=on_inconclusive,
        )
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sign_model(
    model: Input[Model],
    method: str,
    private_key: str,
    certificate: str,
    certificate_chain: str,
    trust_config: str,
    signed_model: Output[Model],
) -> None:
    """Sign the export with OpenSSF model signing (``method``: key | sigstore | none); the
    signed copy (with ``model.sig``) is the output artifact."""
    from ggufship.pipeline import steps

    signed_model.metadata.update(
        steps.sign(
            export_dir=model.path,
            out_dir=signed_model.path,
            method=method,
            private_key=private_key,
            certificate=certificate,
            certificate_chain=certificate_chain,
            trust_config=trust_config,
        )
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish_model(
    model: Input[Model],
    s3: str,
    oci: str,
    gitops: str,
    environment: str,
    force: bool,
    create_bucket: bool,
) -> NamedTuple(
    "PublishOutputs",
    [
        ("s3_uri", str),
        ("oci_reference", str),
        ("gitops_commit", str),
        ("model_uri", str),
        ("model_sha256", str),
    ],
):
    """Publish to S3 (MinIO), an OCI registry (ORAS, ModelPack layout, signature as referrer)
    and the GitOps repository; credentials come from the environment (Kubernetes Secrets).
    ``model_sha256`` is the digest of the GGUF the GitOps values deploy: the deploy step takes
    this string, not the signed Model (which would make KFP download the whole export)."""
    from ggufship.pipeline import steps

    return steps.publish_outputs(
        export_dir=model.path,
        s3=s3,
        oci=oci,
        gitops=gitops,
        environment=environment,
        force=force,
        create_bucket=create_bucket,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_and_await(
    mode: str,
    model_uri: str,
    model_sha256: str,
    rollout_name: str,
    namespace: str,
    stable_model: str,
    state_dir: str,
    timeout_s: float,
    verdict: Output[Metrics],
    report: Output[Markdown],
) -> str:
    """Deploy the published model (``mode``: gitops | patch | local | none) and wait until the
    Rollout carrying ``model_sha256`` is promoted; fails when the canary is aborted. The
    gate's verdict goes to ``verdict`` (metrics) and a Markdown report to ``report``;
    returns the outcome."""
    from ggufship.pipeline import steps

    return steps.deploy_component(
        verdict=verdict,
        report_path=report.path,
        mode=mode,
        model_uri=model_uri,
        model_sha256=model_sha256,
        rollout_name=rollout_name,
        namespace=namespace,
        stable_model=stable_model,
        state_dir=state_dir,
        timeout_s=timeout_s,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def rollback_release(
    name: str,
    version: str,
    gitops: str,
    environment: str,
    status: dsl.PipelineTaskFinalStatus,
) -> str:
    """Exit handler: when the run did not succeed (e.g. the canary was aborted) and the GitOps
    values still name this release, commit their rollback to the stable model
    (``ggufship rollback``). Returns skipped | rolled-back | nothing-to-roll-back."""
    from ggufship.pipeline import steps

    return steps.rollback_on_failure(
        state=status.state,
        error_message=status.error_message,
        name=name,
        version=version,
        gitops=gitops,
        environment=environment,
    )


__all__ = ["deploy_and_await", "export_model", "publish_model", "rollback_release", "sign_model"]

"""The KFP v2 pipeline ``export-to-canary``: export → evaluate → sign → publish → deploy → await the canary;
an exit handler writes the rollback to Git when the run did not succeed.

The definition is part of the package, so ``ggufship pipeline compile`` works from an
installed wheel; the repository keeps the compiled golden ``pipelines/export_to_canary.yaml``.
Run it on this machine against the embedded services with ``ggufship pipeline run --local``;
on a cluster with ``kfp run create -e <experiment> -r <run-name> -f
pipelines/export_to_canary.yaml -- checkpoint=… name=…``.

Inputs (see docs/pipeline.md): ``checkpoint``/``adapter``/``release`` are paths on the
inputs volume — the PersistentVolumeClaim ``volume_claim`` mounted at :data:`VOLUME_MOUNT`
in the export and evaluate tasks — or ``s3://`` URIs; with ``release_repo`` the release
spec is read from that Git repository at ``release_revision``.

Secrets come from Kubernetes Secrets via kfp-kubernetes (they are ignored by
``kfp.local``, where the same variables come from the caller's environment):

| Secret | keys → environment / mount |
|---|---|
| ``ggufship-s3`` | ``endpoint``, ``access-key``, ``secret-key`` → ``GGUFSHIP_S3_ENDPOINT``, |
| | ``GGUFSHIP_S3_ACCESS_KEY``, ``GGUFSHIP_S3_SECRET_KEY`` (publish, deploy; export and |
| | evaluate too: their ``checkpoint``/``adapter``/``release`` may be ``s3://bucket/prefix``) |
| ``ggufship-oci`` | ``username``, ``password`` → ``GGUFSHIP_OCI_USERNAME``, ``GGUFSHIP_OCI_PASSWORD`` |
| ``ggufship-git`` | ``token`` → ``GGUFSHIP_GIT_TOKEN`` (publish, rollback; export and evaluate: |
| | a private ``release_repo``) |
| ``ggufship-signing`` | mounted at ``/etc/ggufship/signing`` (``private.pem``) |
"""

from kfp import dsl, kubernetes

from ggufship.pipeline.components import (
    deploy_and_await,
    evaluate_model,
    export_model,
    publish_model,
    rollback_release,
    sign_model,
)

PIPELINE_NAME = "export-to-canary"
SIGNING_MOUNT = "/etc/ggufship/signing"
#: Where the inputs volume (``volume_claim``) is mounted: the Sensor's checkpoint paths are under it.
VOLUME_MOUNT = "/checkpoints"
DEFAULT_VOLUME_CLAIM = "ggufship-checkpoints"


def _with_secrets(task: dsl.PipelineTask, *, s3: bool = False, oci: bool = False, git: bool = False) -> None:
    if s3:
        kubernetes.use_secret_as_env(
            task,
            secret_name="ggufship-s3",
            secret_key_to_env={
                "endpoint": "GGUFSHIP_S3_ENDPOINT",
                "access-key": "GGUFSHIP_S3_ACCESS_KEY",
                "secret-key": "GGUFSHIP_S3_SECRET_KEY",
            },
            optional=True,
        )
    if oci:
        kubernetes.use_secret_as_env(
            task,
            secret_name="ggufship-oci",
            secret_key_to_env={"username": "GGUFSHIP_OCI_USERNAME", "password": "GGUFSHIP_OCI_PASSWORD"},
            optional=True,
        )
    if git:
        kubernetes.use_secret_as_env(
            task, secret_name="ggufship-git", secret_key_to_env={"token": "GGUFSHIP_GIT_TOKEN"}, optional=True
        )


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Fine-tuned checkpoint → GGUF (+SHA256, manifest, card) → signed → published to S3, OCI "
    "and GitOps → Argo Rollouts canary gated by thresholds and a KS test → promoted or aborted.",
)
def export_to_canary(
    checkpoint: str,
    name: str,
    version: str,
    adapter: str = "",
    quantizations: str = "F16,Q4_K_M",
    release: str = "",
    release_repo: str = "",
    release_revision: str = "",
    volume_claim: str = DEFAULT_VOLUME_CLAIM,
    signing_method: str = "key",
    signing_key: str = f"{SIGNING_MOUNT}/private.pem",
    certificate: str = "",
    certificate_chain: str = "",
    trust_config: str = "",
    s3: str = "",
    oci: str = "",
    gitops: str = "",
    environment: str = "staging",
    force: bool = False,
    create_bucket: bool = False,
    deploy_mode: str = "gitops",
    rollout_name: str = "",
    namespace: str = "default",
    stable_model: str = "",
    state_dir: str = "",
    rollout_timeout_s: float = 3600.0,
    evaluate_against: str = "",
    on_inconclusive: str = "stop",
) -> None:
    # Exit handler: whatever fails after the GitOps commit (an aborted canary above all), Git must
    # not keep naming this release; the rollback is a no-op when Git does not name it.
    rollback = rollback_release(
        name=name, version=version, gitops=gitops, environment=environment
    ).set_display_name("rollback-if-not-promoted")
    rollback.set_caching_options(False).set_retry(num_retries=2, backoff_duration="30s")
    _with_secrets(rollback, git=True)
    kubernetes.set_timeout(rollback, 900)

    with dsl.ExitHandler(rollback, name="release"):
        exported = export_model(
            checkpoint=checkpoint,
            name=name,
            version=version,
            adapter=adapter,
            quantizations=quantizations,
            release=release,
            release_repo=release_repo,
            release_revision=release_revision,
        ).set_display_name("export")
        # Same inputs give byte-identical outputs, so a cached export is a correct export.
        exported.set_caching_options(True)
        exported.set_cpu_request("2").set_memory_request("8G").set_retry(num_retries=1)
        # an s3:// checkpoint/adapter/release is fetched with these; a private release_repo with the token
        _with_secrets(exported, s3=True, git=True)
        kubernetes.mount_pvc(exported, pvc_name=volume_claim, mount_path=VOLUME_MOUNT)
        kubernetes.set_timeout(exported, 4 * 3600)

        # Quality before trust: the measured evaluation goes into the manifest that sign covers; a
        # failed (or, by default, inconclusive) evaluation stops the run before sign and publish.
        evaluated = evaluate_model(
            model=exported.outputs["model"],
            stable_export=evaluate_against,
            release=release,
            release_repo=release_repo,
            release_revision=release_revision,
            on_inconclusive=on_inconclusive,
        ).set_display_name("evaluate")
        evaluated.set_caching_options(False).set_cpu_request("2").set_memory_request("8G")
        _with_secrets(evaluated, s3=True, git=True)  # an s3:// release spec, a private release_repo
        kubernetes.mount_pvc(evaluated, pvc_name=volume_claim, mount_path=VOLUME_MOUNT)
        kubernetes.set_timeout(evaluated, 4 * 3600)

        signed = sign_model(
            model=evaluated.outputs["evaluated_model"],
            method=signing_method,
            private_key=signing_key,
            certificate=certificate,
            certificate_chain=certificate_chain,
            trust_config=trust_config,
        ).set_display_name("sign")
        signed.set_caching_options(False).set_retry(num_retries=2, backoff_duration="30s")
        kubernetes.use_secret_as_volume(
            signed, secret_name="ggufship-signing", mount_path=SIGNING_MOUNT, optional=True
        )
        kubernetes.set_timeout(signed, 1800)

        published = publish_model(
            model=signed.outputs["signed_model"],
            s3=s3,
            oci=oci,
            gitops=gitops,
            environment=environment,
            force=force,
            create_bucket=create_bucket,
        ).set_display_name("publish")
        # Publishing has side effects: never served from cache. No KFP retry: KFP retries every
        # failure alike, and a conflict (this version published with other content) never resolves —
        # it cost minutes of backoff. The step retries what may pass (S3/registry unreachable) itself.
        published.set_caching_options(False)
        _with_secrets(published, s3=True, oci=True, git=True)
        kubernetes.set_timeout(published, 3600)

        # Only strings cross to the deploy task (the digest, the URI): a Model input would make
        # KFP download the whole signed export just to read its digest.
        deployed = deploy_and_await(
            mode=deploy_mode,
            model_uri=published.outputs["model_uri"],
            model_sha256=published.outputs["model_sha256"],
            rollout_name=rollout_name,
            namespace=namespace,
            stable_model=stable_model,
            state_dir=state_dir,
            timeout_s=rollout_timeout_s,
        ).set_display_name("deploy-and-await-canary")
        deployed.set_caching_options(False)
        _with_secrets(deployed, s3=True, oci=True)
        kubernetes.set_timeout(deployed, 6 * 3600)

"""The release as an Argo WorkflowTemplate, authored with Hera.

export → evaluate → sign → publish (S3 + OCI) → approve (suspend; the intermediate parameter
``approve`` is YES/NO, set when resuming in the Argo UI) → deploy (GitOps commit of the
deploy values; Argo CD syncs the chart and the Rollout starts its canary) → wait for the
canary to start → wait for its outcome (Healthy: promoted; Degraded: aborted by the gate).
Both waits fail as soon as the Rollout is Degraded (an abort is seen at once, not after the
step's deadline).

On exit (``onExit``), a workflow that did not succeed runs ``ggufship rollback``: if the
GitOps values still name this release, they go back to the stable model in a commit that
names the rejected digest and the workflow's status (a no-op when the release was never
deployed, or was already rolled back).

The Argo Events Sensor (``manifests/argo-events/sensor.yaml``) submits it on a push of
``releases/<name>-<version>.yaml`` with the spec's path, the commit, name and version.

Regenerate the checked-in YAML (``release-workflow.yaml`` beside this file) explicitly:

    python pipelines/argo/release_workflow.py            # write
    python pipelines/argo/release_workflow.py --check    # exit 1 if the file is stale

The old ``argo-workflows`` Python SDK was removed upstream in favour of Hera.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from hera.workflows import (
    Container,
    Env,
    ExistingVolume,
    Parameter,
    Resource,
    RetryStrategy,
    SecretEnv,
    SecretVolume,
    Steps,
    Suspend,
    WorkflowTemplate,
)
from hera.workflows import (
    models as m,
)

GOLDEN = Path(__file__).with_name("release-workflow.yaml")
IMAGE = "ghcr.io/acme/ggufship:0.1.0"
NAMESPACE = "argo-events"

#: Workflow parameters: name → (default, description).
PARAMETERS: dict[str, tuple[str, str]] = {
    "release-path": ("", "release spec in the release repository, releases/<name>-<version>.yaml"),
    "commit": ("", "commit of the release repository the spec is taken from"),
    "name": ("", "model name (from the spec's file name)"),
    "version": ("", "model version (from the spec's file name)"),
    "release-repo": ("https://github.com/acme/ml-releases.git", "release repository (Git URL)"),
    "quantizations": ("F16 Q4_K_M", "llama.cpp types to export, space-separated"),
    "s3": ("s3://models", "S3 target (bucket/prefix) of `ggufship publish --s3`"),
    "oci": ("registry.example.com/models", "OCI repository of `ggufship publish --oci` (name appended)"),
    "gitops": ("https://github.com/acme/ml-gitops.git", "GitOps repository Argo CD watches"),
    "environment": ("production", "deploy/<environment>/<name>.values.yaml in the GitOps repository"),
    "rollout-namespace": ("ml", "namespace of the Rollout Argo CD deploys"),
    "stable-export": (
        "",
        "stable export directory to evaluate against (e.g. /checkpoints/<name>/stable-export); "
        "empty: evaluation skipped",
    ),
    "on-inconclusive": ("stop", "an inconclusive evaluation: stop (default) or continue"),
}


def _env() -> list[Any]:
    """Environment of every ggufship step: parameters as variables (never spliced into shell text)."""
    env: list[Any] = [Env(name="HOME", value="/tmp")]
    for name in PARAMETERS:
        env.append(Env(name=name.upper().replace("-", "_"), value=f"{{{{workflow.parameters.{name}}}}}"))
    return env


_S3_ENV = [
    Env(name="GGUFSHIP_S3_ENDPOINT", value="http://minio.minio:9000"),
    SecretEnv(name="GGUFSHIP_S3_ACCESS_KEY", secret_name="ggufship-s3", secret_key="access-key"),
    SecretEnv(name="GGUFSHIP_S3_SECRET_KEY", secret_name="ggufship-s3", secret_key="secret-key"),
]
_GIT_ENV = [
    # Used by git's credential helper below for the HTTPS remotes.
    SecretEnv(name="GIT_TOKEN", secret_name="ggufship-git", secret_key="token"),
    Env(name="GIT_CONFIG_COUNT", value="1"),
    Env(name="GIT_CONFIG_KEY_0", value="credential.helper"),
    Env(
        name="GIT_CONFIG_VALUE_0",
        value='!f() { echo username=x-access-token; echo "password=$GIT_TOKEN"; }; f',
    ),
]
_WORK = m.VolumeMount(name="work", mount_path="/work")
_TMP = m.VolumeMount(name="tmp", mount_path="/tmp")
_SECURITY = m.SecurityContext(
    allow_privilege_escalation=False,
    read_only_root_filesystem=True,
    capabilities=m.Capabilities(drop=["ALL"]),
)


def _step_container(name: str, script: str, *, env: list[Any] | None = None, **kwargs: Any) -> Container:
    return Container(
        name=name,
        image=IMAGE,
        command=["/bin/sh", "-euc"],
        args=[script],
        env=_env() + (env or []),
        volume_mounts=[_WORK, _TMP, *kwargs.pop("volume_mounts", [])],
        security_context=_SECURITY,
        retry_strategy=kwargs.pop("retry_strategy", None),
        active_deadline_seconds=kwargs.pop("active_deadline_seconds", 3600),
        resources=m.ResourceRequirements(
            requests={"cpu": "2", "memory": "8Gi"}
            if name in ("export", "evaluate")
            else {"cpu": "250m", "memory": "512Mi"},
            limits={"memory": "16Gi"} if name in ("export", "evaluate") else {"memory": "2Gi"},
        ),
        **kwargs,
    )


def _rollout_wait(name: str, success: str, failure: str | None, timeout_s: int) -> Resource:
    return Resource(
        name=name,
        action="get",
        manifest=(
            "apiVersion: argoproj.io/v1alpha1\n"
            "kind: Rollout\n"
            "metadata:\n"
            "  name: '{{workflow.parameters.name}}-ggufship-api'\n"
            "  namespace: '{{workflow.parameters.rollout-namespace}}'\n"
        ),
        success_condition=success,
        failure_condition=failure,
        active_deadline_seconds=timeout_s,
        retry_strategy=RetryStrategy(limit="10", retry_policy="OnError"),
    )


def build() -> WorkflowTemplate:
    """The WorkflowTemplate ``ggufship-release``."""
    with WorkflowTemplate(
        name="ggufship-release",
        namespace=NAMESPACE,
        labels={"app.kubernetes.io/part-of": "ggufship"},
        annotations={
            "workflows.argoproj.io/description": "Release a fine-tuned checkpoint: export, sign, publish, "
            "approve, deploy (GitOps + Argo CD), await the canary's outcome.",
        },
        entrypoint="release",
        on_exit="exit-handler",
        service_account_name="ggufship-release",
        arguments=[Parameter(name=k, value=v, description=d) for k, (v, d) in PARAMETERS.items()],
        volume_claim_templates=[
            m.PersistentVolumeClaim(
                metadata=m.ObjectMeta(name="work"),
                spec=m.PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"],
                    resources=m.VolumeResourceRequirements(requests={"storage": m.Quantity("50Gi")}),
                ),
            )
        ],
        volumes=[
            m.Volume(name="tmp", empty_dir=m.EmptyDirVolumeSource(size_limit="4Gi")),
            ExistingVolume(name="checkpoints", claim_name="ggufship-checkpoints", read_only=True),
            SecretVolume(name="signing-key", secret_name="ggufship-signing-key", default_mode=0o400),
            SecretVolume(
                name="registry-auth",
                secret_name="ggufship-registry",
                items=[m.KeyToPath(key=".dockerconfigjson", path="config.json")],
            ),
        ],
        security_context=m.PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001
        ),
        pod_gc=m.PodGC(strategy="OnWorkflowSuccess"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=86400, seconds_after_failure=604800),
        active_deadline_seconds=6 * 3600,
    ) as wt:
        checkout = _step_container(
            "checkout",
            'git clone --quiet --no-checkout "$RELEASE_REPO" /work/src\n'
            'git -C /work/src -c advice.detachedHead=false checkout --quiet "$COMMIT"\n'
            'test -f "/work/src/$RELEASE_PATH" || '
            '{ echo "no release spec $RELEASE_PATH at $COMMIT" >&2; exit 1; }',
            env=_GIT_ENV,
            retry_strategy=RetryStrategy(limit="3", retry_policy="OnError"),
            active_deadline_seconds=600,
        )
        export = _step_container(
            "export",
            # Checkpoints live on the ggufship-checkpoints volume: <name>/<version>/checkpoint
            # and, for a LoRA fine-tune, <name>/<version>/adapter.
            'ckpt="/checkpoints/$NAME/$VERSION"\n'
            'set -- --name "$NAME" --version "$VERSION" --release "/work/src/$RELEASE_PATH"\n'
            'if [ -d "$ckpt/adapter" ]; then set -- "$@" --adapter "$ckpt/adapter"; fi\n'
            'for q in $QUANTIZATIONS; do set -- "$@" --quant "$q"; done\n'
            "rm -rf /work/out\n"
            'exec ggufship export "$ckpt/checkpoint" -o /work/out "$@"',
            volume_mounts=[m.VolumeMount(name="checkpoints", mount_path="/checkpoints", read_only=True)],
            active_deadline_seconds=3 * 3600,
        )
        # Between export and sign: the measured evaluation is recorded in /work/out/manifest.json
        # (so the signature covers it); exit 1 (fail) stops the release, 2 (inconclusive) too
        # unless on-inconclusive is continue. The report goes to /work/evaluation.
        evaluate = _step_container(
            "evaluate",
            'if [ -z "$STABLE_EXPORT" ]; then echo "no stable-export: evaluation skipped" >&2; exit 0; fi\n'
            "rc=0\n"
            'ggufship evaluate /work/out --stable "$STABLE_EXPORT" --release "/work/src/$RELEASE_PATH" '
            "--out /work/evaluation || rc=$?\n"
            'if [ "$rc" -eq 2 ] && [ "$ON_INCONCLUSIVE" = continue ]; then exit 0; fi\n'
            'exit "$rc"',
            volume_mounts=[m.VolumeMount(name="checkpoints", mount_path="/checkpoints", read_only=True)],
            active_deadline_seconds=3 * 3600,
        )
        sign = _step_container(
            "sign",
            "exec ggufship sign /work/out --private-key /etc/ggufship/signing/private.pem",
            volume_mounts=[
                m.VolumeMount(name="signing-key", mount_path="/etc/ggufship/signing", read_only=True)
            ],
            active_deadline_seconds=600,
        )
        publish = _step_container(
            "publish",
            'exec ggufship publish /work/out --s3 "$S3" --oci "$OCI/$NAME"',
            env=[*_S3_ENV, Env(name="DOCKER_CONFIG", value="/etc/ggufship/docker")],
            volume_mounts=[
                m.VolumeMount(name="registry-auth", mount_path="/etc/ggufship/docker", read_only=True)
            ],
            retry_strategy=RetryStrategy(limit="3", retry_policy="OnError"),
            active_deadline_seconds=3600,
        )
        approve = Suspend(
            name="approve",
            intermediate_parameters=[
                Parameter(
                    name="approve",
                    enum=["YES", "NO"],
                    default="NO",
                    description="Deploy this release as a canary? Set YES or NO, then Resume.",
                )
            ],
        )
        deploy = _step_container(
            "deploy",
            # Published already (S3/OCI are idempotent); this commits the deploy values.
            'exec ggufship publish /work/out --s3 "$S3" --oci "$OCI/$NAME" '
            '--gitops "$GITOPS" --gitops-env "$ENVIRONMENT"',
            env=[*_S3_ENV, *_GIT_ENV, Env(name="DOCKER_CONFIG", value="/etc/ggufship/docker")],
            volume_mounts=[
                m.VolumeMount(name="registry-auth", mount_path="/etc/ggufship/docker", read_only=True)
            ],
            retry_strategy=RetryStrategy(limit="3", retry_policy="OnError"),
            active_deadline_seconds=900,
        )
        rejected = _step_container(
            "rejected",
            'echo "release $NAME $VERSION was not approved" >&2; exit 1',
            active_deadline_seconds=60,
        )
        # Argo CD syncs the new values: the Rollout leaves Healthy (canary running or paused).
        # Degraded fails the step at once: a canary aborted before this step saw it progress
        # (Argo Workflows polls the resource; workflow/executor/resource.go, WaitResource).
        canary_started = _rollout_wait(
            "await-canary-start", "status.phase in (Progressing,Paused)", "status.phase == Degraded", 1800
        )
        # Promoted (Healthy) or aborted by the analysis (Degraded: the workflow fails).
        canary_outcome = _rollout_wait(
            "await-canary-outcome", "status.phase == Healthy", "status.phase == Degraded", 4 * 3600
        )

        rollback = _step_container(
            "rollback",
            # Only when the GitOps values still name this release (else a no-op, exit 0).
            'exec ggufship rollback --gitops "$GITOPS" --gitops-env "$ENVIRONMENT" '
            '--name "$NAME" --version "$VERSION" '
            '--verdict "release workflow $WORKFLOW_NAME ended $WORKFLOW_STATUS: canary not promoted"',
            env=[
                *_GIT_ENV,
                Env(name="WORKFLOW_NAME", value="{{workflow.name}}"),
                Env(name="WORKFLOW_STATUS", value="{{workflow.status}}"),
            ],
            retry_strategy=RetryStrategy(limit="3", retry_policy="OnError"),
            active_deadline_seconds=600,
        )
        with Steps(name="exit-handler"):
            rollback(when="{{workflow.status}} != Succeeded")

        with Steps(name="release"):
            checkout()
            export()
            evaluate()
            sign()
            publish()
            approve()
            approved = "{{steps.approve.outputs.parameters.approve}} == YES"
            deploy(when=approved)
            rejected(when="{{steps.approve.outputs.parameters.approve}} != YES")
            canary_started(when=approved)
            canary_outcome(when=approved)
    return wt


def render() -> str:
    """The WorkflowTemplate as YAML (deterministic: the golden file's exact text)."""
    data = build().to_dict()
    header = "# Generated by pipelines/argo/release_workflow.py (Hera) — do not edit; regenerate with\n"
    header += "#   python pipelines/argo/release_workflow.py\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the release WorkflowTemplate (Hera) to YAML.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in YAML is stale")
    parser.add_argument("-o", "--out", type=Path, default=GOLDEN, help=f"output file (default {GOLDEN.name})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.out} is stale; run: python pipelines/argo/release_workflow.py\n")
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

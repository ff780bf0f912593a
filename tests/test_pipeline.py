"""The KFP pipeline: golden YAML is current, its shape, and a real local run (kfp.local)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ggufship.cli.main import main
from ggufship.errors import UsageError
from ggufship.pipeline import compile_pipeline, golden_path

pytest_plugins = ["tests.services_fixtures"]

ROOT = Path(__file__).resolve().parents[1]


def test_golden_yaml_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "p.yaml", root=ROOT)
    golden = golden_path(ROOT)
    assert golden.read_text() == fresh.read_text(), "run `ggufship pipeline compile` and commit the YAML"
    assert main(["pipeline", "compile", "--check", "--root", str(ROOT)]) == 0


def test_golden_does_not_depend_on_hera(tmp_path: Path) -> None:
    """Hera registers a global YAML str representer; the compiled pipeline must not change."""
    import hera.workflows  # noqa: F401

    fresh = compile_pipeline(tmp_path / "p.yaml", root=ROOT)
    assert golden_path(ROOT).read_text() == fresh.read_text()


def test_check_detects_stale_golden(tmp_path: Path) -> None:
    stale = tmp_path / "stale.yaml"
    stale.write_text("pipelineInfo: {name: old}\n")
    assert main(["pipeline", "compile", "--check", "--root", str(ROOT), "-o", str(stale)]) == 1


def test_compiled_pipeline_shape() -> None:
    docs = list(yaml.safe_load_all(golden_path(ROOT).read_text()))
    spec = docs[0]
    # Every task runs inside the exit handler; the rollback runs after it whatever happened
    # (kfp dsl.ExitHandler compiles to triggerPolicy ALL_UPSTREAM_TASKS_COMPLETED).
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "rollback-release"}
    assert root["rollback-release"]["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert root["rollback-release"]["dependentTasks"] == ["exit-handler-1"]
    assert root["rollback-release"]["cachingOptions"] == {}
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(tasks) == {"export-model", "evaluate-model", "sign-model", "publish-model", "deploy-and-await"}
    # sign takes the evaluated copy: the measured evaluation is in the manifest it signs
    sign_in = tasks["sign-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert sign_in == {"outputArtifactKey": "evaluated_model", "producerTask": "evaluate-model"}
    assert tasks["evaluate-model"]["cachingOptions"] == {}
    assert tasks["publish-model"]["cachingOptions"] == {}  # caching off
    assert tasks["deploy-and-await"]["cachingOptions"] == {}
    assert tasks["export-model"]["cachingOptions"] == {"enableCache": True}
    # no task-level retry of publish: a conflict fails at once (steps.publish_outputs retries what may pass)
    assert "retryPolicy" not in tasks["publish-model"]
    executors = spec["deploymentSpec"]["executors"]
    for executor in executors.values():
        container = executor["container"]
        assert container["image"].startswith("ghcr.io/acme/ggufship:")
        assert "pip install" not in json.dumps(container)  # everything is in the image
    outputs = spec["components"]["comp-export-model"]["outputDefinitions"]["artifacts"]
    assert outputs["model"]["artifactType"]["schemaTitle"] == "system.Model"
    deploy_out = spec["components"]["comp-deploy-and-await"]["outputDefinitions"]["artifacts"]
    assert deploy_out["verdict"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert deploy_out["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    publish_secrets = {s["secretName"] for s in k8s["exec-publish-model"]["secretAsEnv"]}
    assert publish_secrets == {"ggufship-s3", "ggufship-oci", "ggufship-git"}
    assert k8s["exec-sign-model"]["secretAsVolume"][0]["secretName"] == "ggufship-signing"
    assert {s["secretName"] for s in k8s["exec-rollback-release"]["secretAsEnv"]} == {"ggufship-git"}
    # s3:// checkpoint/adapter/release: export and evaluate get the S3 credentials too, and the
    # Git token for a private release_repo
    for task in ("exec-export-model", "exec-evaluate-model"):
        assert {s["secretName"] for s in k8s[task]["secretAsEnv"]} == {"ggufship-s3", "ggufship-git"}
    assert int(k8s["exec-export-model"]["activeDeadlineSeconds"]) == 4 * 3600


def test_deploy_takes_the_digest_not_the_model() -> None:
    """The deploy task has no artifact input (KFP would download the whole signed export for it):
    it gets the GitOps-deployed GGUF's digest and the model URI as strings from publish."""
    spec = next(yaml.safe_load_all(golden_path(ROOT).read_text()))
    deploy = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["deploy-and-await"]
    assert "artifacts" not in deploy["inputs"]
    params = deploy["inputs"]["parameters"]
    for name in ("model_sha256", "model_uri"):
        assert params[name]["taskOutputParameter"] == {
            "outputParameterKey": name,
            "producerTask": "publish-model",
        }
    assert "artifacts" not in spec["components"]["comp-deploy-and-await"]["inputDefinitions"]
    outputs = spec["components"]["comp-publish-model"]["outputDefinitions"]["parameters"]
    assert outputs["model_sha256"] == {"parameterType": "STRING"}


def test_inputs_volume_is_mounted() -> None:
    """export and evaluate (the tasks reading checkpoint/adapter/release paths) mount the PVC named by
    the volume_claim parameter at /checkpoints, where the Sensor's checkpoint paths point; no other task
    mounts it. (kfp-kubernetes kfp/kubernetes/volume.py mount_pvc writes pvcMount with pvcNameParameter.)"""
    from ggufship.pipeline.definition import DEFAULT_VOLUME_CLAIM, VOLUME_MOUNT

    docs = list(yaml.safe_load_all(golden_path(ROOT).read_text()))
    declared = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert declared["volume_claim"]["defaultValue"] == DEFAULT_VOLUME_CLAIM
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name for name, cfg in k8s.items() if cfg.get("pvcMount")}
    assert mounted == {"exec-export-model", "exec-evaluate-model"}
    for name in mounted:
        (mount,) = k8s[name]["pvcMount"]
        assert mount["mountPath"] == VOLUME_MOUNT == "/checkpoints"
        assert mount["pvcNameParameter"] == {"componentInputParameter": "pipelinechannel--volume_claim"}


def test_bad_params() -> None:
    from ggufship.cli.pipeline import parse_params

    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_params(["checkpoint"])
    with pytest.raises(UsageError, match="rollout_timeout_s"):
        parse_params(["rollout_timeout_s=soon"])
    assert main(["pipeline", "run", "--local", "-p", "name=x"]) == 2


def test_embedded_targets_leave_the_users_settings(services_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front fills targets and credentials from `ggufship up`, but never over the caller's own
    S3 endpoint or OCI login (the embedded keys must not go to an endpoint the user named)."""
    from ggufship.pipeline import embedded_targets

    state_dir, _ = services_factory(services=("s3", "git"))
    for var in ("GGUFSHIP_S3_ENDPOINT", "GGUFSHIP_OCI_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    targets, env = embedded_targets(state_dir, "tiny")
    assert targets["s3"] == "s3://ggufship-models" and env["GGUFSHIP_S3_ENDPOINT"].startswith(
        "http://127.0.0.1:"
    )
    monkeypatch.setenv("GGUFSHIP_S3_ENDPOINT", "https://s3.example.com")
    targets, env = embedded_targets(state_dir, "tiny")
    assert "s3" not in targets and not any(k.startswith("GGUFSHIP_S3_") for k in env)
    assert targets["gitops"].startswith("file://")  # the other services are still filled


def test_local_run_full_pipeline(
    tmp_path: Path, services_factory, llama_ckpt: Path, llama_lora: Path
) -> None:
    """export → sign → publish (S3, OCI, GitOps on real local servers) → deploy step, under kfp.local."""
    from ggufship.pipeline import embedded_targets, run_local
    from ggufship.sign import generate_keypair

    state_dir, _ = services_factory(services=("s3", "registry", "git"))
    private, _public = generate_keypair(tmp_path / "keys")
    targets, env = embedded_targets(state_dir, "tiny")
    assert set(targets) == {"s3", "oci", "gitops", "create_bucket"}
    params = {
        "checkpoint": str(llama_ckpt),
        "adapter": str(llama_lora),
        "name": "tiny",
        "version": "2.0.0",
        "quantizations": "Q8_0",
        "signing_method": "key",
        "signing_key": str(private),
        "deploy_mode": "none",
        **targets,
    }
    result = run_local(params, pipeline_root=tmp_path / "kfp", root=ROOT, env=env)
    root = result.pipeline_root
    models = sorted(root.rglob("manifest.json"))
    assert len(models) == 3, models  # the export, its evaluated copy (skipped: no stable) and the signed copy
    signed = next(p.parent for p in models if (p.parent / "model.sig").exists())
    manifest = json.loads((signed / "manifest.json").read_text())
    assert manifest["version"] == "2.0.0"
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("export-to-canary-")]
    published = json.loads((run_dir / "publish-model" / "executor_output.json").read_text())[
        "parameterValues"
    ]
    assert published["s3_uri"] == "s3://ggufship-models/models/tiny/2.0.0/"
    assert published["oci_reference"].split("@")[0].endswith("/models/tiny")
    assert len(published["gitops_commit"]) == 40
    assert published["model_uri"] == "oci://" + published["oci_reference"]
    deployed = json.loads((run_dir / "deploy-and-await" / "executor_output.json").read_text())
    assert deployed["parameterValues"]["Output"] == "skipped"
    verdict = deployed["artifacts"]["verdict"]["artifacts"][0]["metadata"]
    assert verdict["outcome"] == "skipped" and verdict["promoted"] == 0.0
    assert "outcome: **skipped**" in (run_dir / "deploy-and-await" / "report").read_text()
    export_meta = json.loads((run_dir / "export-model" / "executor_output.json").read_text())
    model_meta = export_meta["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert model_meta["quantization"] == "Q8_0" and len(model_meta["sha256"]) == 64 and model_meta["size"] > 0
    # The digest the GitOps values deploy (what the Rollout's pod template will carry).
    values = yaml.safe_load(
        subprocess.run(
            ["git", f"--git-dir={targets['gitops'].removeprefix('file://')}", "show",
             "main:deploy/staging/tiny.values.yaml"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert model_meta["deployed_sha256"] == values["model"]["sha256"]
    # The exit handler ran after the successful run and left Git alone.
    exit_out = json.loads((run_dir / "rollback-release" / "executor_output.json").read_text())
    assert exit_out["parameterValues"]["Output"] == "skipped"

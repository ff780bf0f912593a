"""The ggufship-api Helm chart: helm lint + helm template on every value variant, every rendered
object validated strictly (CRDs with additionalProperties: false; core kinds with
kubernetes-validate), and the rollout semantics the issue asks for."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_fixtures import ROOT, load_objects, run_tool, tools_or_skip, validate

CHART = ROOT / "charts" / "ggufship-api"
VARIANTS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
SHA = "3f786850e387550fdab836ed7e6dc881de23001b3f786850e387550fdab836ed"


def render(helm: Path, *values: str | Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`helm template`; a str value file is a ci/ variant, a Path any file."""
    args: list[str | Path] = [helm, "template", "rel", CHART, "--namespace", "ml"]
    for v in values:
        args += ["-f", CHART / "ci" / v if isinstance(v, str) else v]
    for s in sets:
        args += ["--set", s]
    return load_objects(run_tool(args).stdout)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


@pytest.fixture(scope="module")
def helm() -> Path:
    return tools_or_skip()["helm"]


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    out = {"default": render(helm)}
    for variant in VARIANTS:
        out[variant] = render(helm, variant)
    return out


def test_variants_exist() -> None:
    assert {"none-values.yaml", "nginx-values.yaml", "istio-values.yaml", "web-gate-values.yaml"} <= set(
        VARIANTS
    )


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_helm_lint_strict(helm: Path, variant: str | None) -> None:
    args: list[str | Path] = [helm, "lint", "--strict", CHART]
    if variant:
        args += ["-f", CHART / "ci" / variant]
    proc = run_tool(args)
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_rendered_objects_validate_strictly(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objs = rendered[variant]
    assert objs
    for obj in objs:
        validate(obj, f"helm template -f {variant}")
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects in {variant}: {names}"


def test_strict_schema_catches_typos(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rollout = one(rendered["default"], "Rollout")
    typo = copy.deepcopy(rollout)
    steps = typo["spec"]["strategy"]["canary"]["steps"]
    steps[0]["setWeigth"] = steps[0].pop("setWeight")
    with pytest.raises(AssertionError, match="setWeigth"):
        validate(typo, "typo test")
    template = copy.deepcopy(one(rendered["default"], "AnalysisTemplate", "rel-ggufship-api-thresholds"))
    template["spec"]["metrics"][0]["failureLimt"] = 1
    with pytest.raises(AssertionError, match="failureLimt"):
        validate(template, "typo test")
    svc = copy.deepcopy(one(rendered["default"], "Service", "rel-ggufship-api"))
    svc["spec"]["prots"] = []
    with pytest.raises(AssertionError, match="prots"):
        validate(svc, "typo test")


def test_api_is_a_rollout_not_a_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objs in rendered.items():
        assert len(by_kind(objs, "Rollout")) == 1, variant
        deployments = by_kind(objs, "Deployment")
        # Only the gate server (web provider) is a Deployment.
        assert all(d["metadata"]["name"].endswith("-gate") for d in deployments), variant


def _steps(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return one(objs, "Rollout")["spec"]["strategy"]["canary"]["steps"]


ARGS = [
    {"name": "model", "value": "support-bot"},
    {"name": "namespace", "value": "ml"},
    {"name": "stable-hash", "valueFrom": {"podTemplateHashValue": "Stable"}},
    {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}},
]


@pytest.mark.parametrize("variant", ["none-values.yaml", "nginx-values.yaml"])
def test_canary_steps(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    steps = _steps(rendered[variant])
    kinds = [next(iter(s)) for s in steps]
    assert kinds == [
        "setWeight", "analysis", "analysis", "pause", "setWeight", "analysis", "analysis", "setWeight",
    ]  # fmt: skip
    assert [s["setWeight"] for s in steps if "setWeight" in s] == [5, 50, 100]
    assert steps[3] == {"pause": {}}  # indefinite: manual promotion
    for traffic, gate in ((steps[1], steps[2]), (steps[5], steps[6])):
        assert [t["templateName"] for t in traffic["analysis"]["templates"]] == ["rel-ggufship-api-traffic"]
        names = [t["templateName"] for t in gate["analysis"]["templates"]]
        assert names == ["rel-ggufship-api-thresholds", "rel-ggufship-api-ks-gate"]
        assert traffic["analysis"]["args"] == gate["analysis"]["args"] == ARGS


def test_background_analysis_and_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["none-values.yaml"]
    canary = one(objs, "Rollout")["spec"]["strategy"]["canary"]
    assert canary["analysis"]["templates"] == [{"templateName": "rel-ggufship-api-thresholds-background"}]
    assert canary["analysis"]["startingStep"] == 1
    assert canary["analysis"]["args"] == ARGS
    background = one(objs, "AnalysisTemplate", "rel-ggufship-api-thresholds-background")
    assert all("count" not in m for m in background["spec"]["metrics"])  # runs until the rollout ends
    step = one(objs, "AnalysisTemplate", "rel-ggufship-api-thresholds")
    assert all(m["count"] == 3 for m in step["spec"]["metrics"])
    services = {s["metadata"]["name"] for s in by_kind(objs, "Service")}
    assert {canary["stableService"], canary["canaryService"], "rel-ggufship-api"} <= services
    assert "trafficRouting" not in canary  # replica-based split
    assert "scaleDownDelaySeconds" not in canary  # only valid with traffic routing
    assert canary["canaryMetadata"]["labels"] == {"ggufship.io/track": "canary"}
    assert canary["stableMetadata"]["labels"] == {"ggufship.io/track": "stable"}


def test_pod_fetches_and_verifies_before_serving(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template = one(rendered["none-values.yaml"], "Rollout")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["ggufship.io/model-uri"] == "s3://models/models/support-bot/1.4.0"
    assert annotations["ggufship.io/model-sha256"] == SHA
    pod = template["spec"]
    (init,) = pod["initContainers"]
    assert init["args"][:4] == ["pull", "$(GGUFSHIP_MODEL_URI)", "-o", "/models/export"]
    assert init["args"][4:] == ["--quant", "Q4_K_M", "--public-key", "/etc/ggufship/keys/public.pem"]
    env = {e["name"]: e for e in init["env"]}
    assert env["GGUFSHIP_S3_ENDPOINT"]["value"].startswith("http")
    assert env["GGUFSHIP_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "ggufship-s3",
        "key": "secret-key",
    }
    (api,) = pod["containers"]
    args = api["args"]
    assert args[:2] == ["serve", "/models/export"]
    assert args[args.index("--expect-sha256") + 1] == "$(GGUFSHIP_MODEL_SHA256)"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    api_env = {e["name"]: e for e in api["env"]}
    # The model comes from the pod's annotations (downward API): patching them starts a canary.
    for container_env in (env, api_env):
        assert container_env["GGUFSHIP_MODEL_URI"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['ggufship.io/model-uri']"
        )
        assert container_env["GGUFSHIP_MODEL_SHA256"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['ggufship.io/model-sha256']"
        )
    assert api_env["GGUFSHIP_GGML_BACKEND_DIR"]["value"] == "/opt/ggufship/ggml-backends"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert api["securityContext"]["readOnlyRootFilesystem"] is True


def test_oci_source_uses_registry_auth_not_s3(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template = one(rendered["web-gate-values.yaml"], "Rollout")["spec"]["template"]
    assert template["metadata"]["annotations"]["ggufship.io/model-uri"].startswith("oci://")
    pod = template["spec"]
    init = pod["initContainers"][0]
    names = {e["name"] for e in init["env"]}
    assert "GGUFSHIP_S3_ACCESS_KEY" not in names
    assert "DOCKER_CONFIG" in names
    vol = next(v for v in pod["volumes"] if v["name"] == "registry-auth")
    assert vol["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]


@pytest.mark.parametrize("source", ["configMap", "secret"])
def test_oci_private_ca_bundle_is_mounted_and_named_for_pull(
    helm: Path, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oci.caBundle: the PEM bundle mounted read-only into the fetch-model init container only,
    and GGUFSHIP_OCI_CA_BUNDLE naming it, which is what `ggufship pull` reads (OciSettings)."""
    from ggufship.publish._oci import oci_settings

    objs = render(
        helm, "web-gate-values.yaml", sets=(f"oci.caBundle.{source}=registry-ca", "oci.caBundle.key=ca.pem")
    )
    for obj in objs:
        validate(obj, f"helm template --set oci.caBundle.{source}")
    pod = one(objs, "Rollout")["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["GGUFSHIP_OCI_CA_BUNDLE"] == "/etc/ggufship/registry-ca/ca.pem"
    mount = next(m for m in init["volumeMounts"] if m["name"] == "registry-ca")
    assert mount == {"name": "registry-ca", "mountPath": "/etc/ggufship/registry-ca", "readOnly": True}
    (api,) = pod["containers"]
    assert all(m["name"] != "registry-ca" for m in api["volumeMounts"])
    volume = next(v for v in pod["volumes"] if v["name"] == "registry-ca")
    items = [{"key": "ca.pem", "path": "ca.pem"}]
    if source == "configMap":
        assert volume["configMap"] == {"name": "registry-ca", "items": items}
    else:
        assert volume["secret"] == {"secretName": "registry-ca", "items": items}
    # The variable the chart sets is the one the code reads.
    monkeypatch.setenv("GGUFSHIP_OCI_CA_BUNDLE", env["GGUFSHIP_OCI_CA_BUNDLE"])
    assert oci_settings().ca_bundle == Path("/etc/ggufship/registry-ca/ca.pem")


def test_no_ca_bundle_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered["web-gate-values.yaml"], "Rollout")["spec"]["template"]["spec"]
    assert all(v["name"] != "registry-ca" for v in pod["volumes"])
    assert "GGUFSHIP_OCI_CA_BUNDLE" not in {e["name"] for e in pod["initContainers"][0]["env"]}


def test_threshold_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Issue 14 item 3: TTFT and inter-token latency by default; the seed's whole-request p99 is an
    option (off), the 5xx ratio pauses (seed: "pause the rollout and alert"), it does not abort."""
    template = one(rendered["default"], "AnalysisTemplate", "rel-ggufship-api-thresholds")
    metrics = {m["name"]: m for m in template["spec"]["metrics"]}
    assert set(metrics) == {"canary-ttft", "canary-inter-token-latency", "canary-5xx-ratio"}
    ttft = metrics["canary-ttft"]
    assert ttft["successCondition"] == "len(result) == 1 && result[0] <= 5"
    assert ttft["failureCondition"] == "len(result) == 1 && result[0] > 5"
    query = ttft["provider"]["prometheus"]["query"]
    assert query.startswith(
        "histogram_quantile(0.95, sum by (le) (rate(ggufship_time_to_first_token_seconds_bucket{"
    )
    itl = metrics["canary-inter-token-latency"]
    assert "ggufship_inter_token_latency_seconds_bucket{" in itl["provider"]["prometheus"]["query"]
    assert itl["failureCondition"] == "len(result) == 1 && result[0] > 0.5"
    ratio = metrics["canary-5xx-ratio"]
    assert ratio["failureCondition"] == "false"  # a breach is Inconclusive: pause, not abort
    assert ratio["successCondition"] == "len(result) == 1 && result[0] <= 0.005"
    assert "or sum(rate(ggufship_requests_total" in ratio["provider"]["prometheus"]["query"]
    # The seed's thresholds, as the job-gate variant sets them: p99 > 1.2 s aborts.
    seed = {
        m["name"]: m
        for m in one(rendered["job-gate-values.yaml"], "AnalysisTemplate", "rel-ggufship-api-thresholds")[
            "spec"
        ]["metrics"]
    }
    assert seed["canary-p99-latency"]["failureCondition"] == "len(result) == 1 && result[0] > 1.2"
    assert "histogram_quantile(0.99" in seed["canary-p99-latency"]["provider"]["prometheus"]["query"]
    assert seed["canary-5xx-ratio"]["failureCondition"] == "false"


def _ks_args(objs: list[dict[str, Any]]) -> list[str]:
    metric = one(objs, "AnalysisTemplate", "rel-ggufship-api-ks-gate")["spec"]["metrics"][0]
    if "job" in metric["provider"]:
        return metric["provider"]["job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    return one(objs, "Deployment", "rel-ggufship-api-gate")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]


def test_thresholds_are_values(helm: Path) -> None:
    objs = render(
        helm,
        sets=(
            "analysis.thresholds.ttft.maxSeconds=2.5",
            "analysis.thresholds.errorRatio.max=0.01",
            "analysis.thresholds.errorRatio.action=abort",
            "analysis.window=10m",
            "analysis.initialDelay=12m",
        ),
    )
    metrics = {
        m["name"]: m for m in one(objs, "AnalysisTemplate", "rel-ggufship-api-thresholds")["spec"]["metrics"]
    }
    assert metrics["canary-ttft"]["failureCondition"].endswith("> 2.5")
    assert metrics["canary-5xx-ratio"]["failureCondition"].endswith("> 0.01")
    assert "[10m]" in metrics["canary-5xx-ratio"]["provider"]["prometheus"]["query"]
    assert metrics["canary-ttft"]["initialDelay"] == "12m"
    alerts = {r["alert"]: r for r in one(objs, "PrometheusRule")["spec"]["groups"][1]["rules"]}
    assert alerts["GgufshipTimeToFirstTokenHigh"]["expr"].endswith("> 2.5")
    assert alerts["GgufshipErrorRatioHigh"]["expr"].endswith("> 0.01")
    args = _ks_args(objs)
    assert args[args.index("--max-error-ratio") + 1] == "0.01"  # abort: the KS gate enforces it too
    assert args[args.index("--max-p99") + 1] == "3600"  # p99 off
    assert args[args.index("--window") + 1] == "10m"


def test_pause_thresholds_never_abort_through_the_gate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A `pause` threshold is not handed to `ggufship gate` (which fails on a breach → abort)."""
    for variant in ("default", "job-gate-values.yaml"):
        args = _ks_args(rendered[variant])
        assert args[args.index("--max-error-ratio") + 1] == "1", variant
    args = _ks_args(rendered["job-gate-values.yaml"])
    assert args[args.index("--max-p99") + 1] == "1.2"  # the seed's p99, action abort


def test_ks_gate_job_provider(rendered: dict[str, list[dict[str, Any]]]) -> None:
    metric = one(rendered["job-gate-values.yaml"], "AnalysisTemplate", "rel-ggufship-api-ks-gate")["spec"][
        "metrics"
    ][0]
    job = metric["provider"]["job"]["spec"]
    assert job["backoffLimit"] == 0
    container = job["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "gate"
    assert "--json" in args
    assert args[args.index("--model") + 1] == "{{args.model}}"
    assert args[args.index("--analyses") + 1] == "2"  # alpha split over 2 analyses
    assert args[args.index("--track-label") + 1] == "rollouts_pod_template_hash"
    assert args[args.index("--stable-track") + 1] == "{{args.stable-hash}}"
    assert args[args.index("--canary-track") + 1] == "{{args.canary-hash}}"
    assert args[args.index("--namespace") + 1] == "ml"
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ks-gate"


def test_ks_gate_web_provider_pauses_on_inconclusive(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("default", "web-gate-values.yaml"):
        objs = rendered[variant]
        metric = one(objs, "AnalysisTemplate", "rel-ggufship-api-ks-gate")["spec"]["metrics"][0]
        web = metric["provider"]["web"]
        assert web["url"] == (
            "http://rel-ggufship-api-gate.ml.svc:8080/gate?model={{args.model}}"
            "&stable_track={{args.stable-hash}}&canary_track={{args.canary-hash}}"
        )
        assert web["jsonPath"] == "{$.outcome}"
        assert metric["successCondition"] == 'result == "pass"'
        assert metric["failureCondition"] == 'result == "fail"'
        # argo-rollouts analysis/analysis.go assessMetricFailureInconclusiveOrError: Inconclusive only
        # when inconclusive > inconclusiveLimit; so the limit must stay below the count.
        assert metric["inconclusiveLimit"] < metric["count"]
        gate = one(objs, "Deployment", "rel-ggufship-api-gate")
        args = gate["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:6] == ["gate", "serve", "--host", "0.0.0.0", "--port", "8080"]
        assert args[args.index("--track-label") + 1] == "rollouts_pod_template_hash"
        assert args[args.index("--namespace") + 1] == "ml"
        service = one(objs, "Service", "rel-ggufship-api-gate")
        assert service["spec"]["selector"] == gate["spec"]["selector"]["matchLabels"]


def test_nginx_routing(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["nginx-values.yaml"]
    canary = one(objs, "Rollout")["spec"]["strategy"]["canary"]
    nginx = canary["trafficRouting"]["nginx"]
    ingress = one(objs, "Ingress")
    assert nginx["stableIngress"] == ingress["metadata"]["name"]
    assert nginx["additionalIngressAnnotations"] == {
        "canary-by-header": "x-canary",
        "canary-by-header-value": "always",
    }
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == canary["stableService"]


def test_istio_routing(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["istio-values.yaml"]
    canary = one(objs, "Rollout")["spec"]["strategy"]["canary"]
    istio = canary["trafficRouting"]["istio"]
    vs = one(objs, "VirtualService")
    dr = one(objs, "DestinationRule")
    assert istio["virtualService"]["name"] == vs["metadata"]["name"]
    assert istio["virtualService"]["routes"] == [vs["spec"]["http"][0]["name"]]
    assert {s["name"] for s in dr["spec"]["subsets"]} == {
        istio["destinationRule"]["stableSubsetName"],
        istio["destinationRule"]["canarySubsetName"],
    }
    assert canary["trafficRouting"]["managedRoutes"] == [{"name": "canary-header"}]
    steps = canary["steps"]
    assert steps[0]["setHeaderRoute"]["name"] == "canary-header"
    assert steps[0]["setHeaderRoute"]["match"] == [
        {"headerName": "x-canary", "headerValue": {"exact": "always"}}
    ]
    assert steps[1] == {"setWeight": 5}
    assert canary["analysis"]["startingStep"] == 2


def test_monitoring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["default"]
    monitor = one(objs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in by_kind(objs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["rel-ggufship-api"]  # each pod scraped once
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    alerts = [
        r["alert"] for g in one(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r
    ]
    assert alerts == [
        "GgufshipTimeToFirstTokenHigh",
        "GgufshipInterTokenLatencyHigh",
        "GgufshipErrorRatioHigh",
    ]


def test_minimal_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["minimal-values.yaml"]
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "Deployment", "PodDisruptionBudget"}
    steps = _steps(objs)
    assert [s["setWeight"] for s in steps if "setWeight" in s] == [10, 25, 50, 100]
    assert [s["pause"] for s in steps if "pause" in s] == [{"duration": "10m"}]
    pod = one(objs, "Rollout")["spec"]["template"]["spec"]
    assert "--public-key" not in pod["initContainers"][0]["args"]


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("rollout.trafficRouting=linkerd", "rollout.trafficRouting"),
        ("analysis.ks.provider=metric", "analysis.ks.provider"),
        ("model.sha256=abc", "model.sha256"),
        ("model.uri=https://example.com/model", "model.uri"),
        ("rollout.canary.steps[0].weight=100", "weight"),
        ("rollout.canary.steps[0].pause=forever", "pause"),
        ("analysis.initialDelay=1m", "analysis.initialDelay"),
        ("analysis.inconclusiveLimit=3", "analysis.inconclusiveLimit"),
        ("analysis.failureLimit=5", "analysis.failureLimit"),
        ("analysis.count=1", "count"),
        ("analysis.window=five", "analysis.window"),
        ("rollout.trafficRoutng=nginx", "trafficRoutng"),  # typo: values.schema.json forbids unknown keys
        ("model.sah256=" + SHA, "sah256"),
        ("oci.caBundle.key=", "oci.caBundle.key"),
        ("oci.caBundle.configMap=ca,oci.caBundle.secret=ca", "oci.caBundle"),
        ("oci.caBundle.file=ca.crt", "file"),
    ],
)
def test_bad_values_fail_naming_the_field(helm: Path, setting: str, field: str) -> None:
    proc = run_tool([helm, "template", "rel", CHART, "--set", setting], check=False)
    assert proc.returncode != 0
    assert field in proc.stderr or field.replace(".", "/") in proc.stderr, proc.stderr


def test_falling_canary_weights_fail_naming_the_step(helm: Path) -> None:
    steps = '[{"weight": 50}, {"weight": 5}]'
    proc = run_tool(
        [helm, "template", "rel", CHART, "--set-json", f"rollout.canary.steps={steps}"], check=False
    )
    assert proc.returncode != 0
    assert "rollout.canary.steps[1].weight: 5 must be above the previous step's 50" in proc.stderr


def test_gitops_deploy_values_are_accepted(helm: Path, tmp_path: Path) -> None:
    """The model block as `ggufship publish --gitops` writes it (extra keys file/record/oci/signature)."""
    values = tmp_path / "support-bot.values.yaml"
    values.write_text(
        "model:\n"
        "  name: support-bot\n"
        "  version: 1.5.0\n"
        "  uri: s3://models/prod/models/support-bot/1.5.0/\n"
        "  file: support-bot-1.5.0-Q4_K_M.gguf\n"
        f"  sha256: {SHA}\n"
        "  quantization: Q4_K_M\n"
        "  record: models/support-bot/1.5.0.yaml\n"
        "  oci: registry.example.com/models/support-bot:1.5.0\n"
        "  signature: model.sig\n"
    )
    objs = render(helm, values)
    annotations = one(objs, "Rollout")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["ggufship.io/model-uri"] == "s3://models/prod/models/support-bot/1.5.0/"
    assert annotations["ggufship.io/model-sha256"] == SHA


def test_time_and_storage(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Issue 14 item 5: a progress deadline that fits a model pull + load (and aborts, as a value);
    only the served quantization pulled; the model volume and the ephemeral-storage request sized
    from the served file when its size is known; preStop + a grace period for running streams;
    a PodDisruptionBudget over the API pods only."""
    rollout = one(rendered["default"], "Rollout")
    assert rollout["spec"]["progressDeadlineSeconds"] >= 600
    assert rollout["spec"]["progressDeadlineAbort"] is True
    pod = rollout["spec"]["template"]["spec"]
    init_args = pod["initContainers"][0]["args"]
    assert init_args[init_args.index("--quant") + 1] == "Q4_K_M"
    (api,) = pod["containers"]
    assert api["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    # preStop + the server's drain bound (serve --shutdown-timeout-seconds, its default here)
    from ggufship.serve.settings import ServeSettings

    drain = ServeSettings.model_fields["shutdown_timeout_seconds"].default
    env = {e["name"]: e.get("value") for e in api.get("env", [])}
    drain = int(env.get("GGUFSHIP_SERVE_SHUTDOWN_TIMEOUT_SECONDS") or drain)
    assert pod["terminationGracePeriodSeconds"] >= 10 + drain
    assert api["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    assert api["resources"]["limits"]["cpu"] == api["resources"]["requests"]["cpu"]  # n_threads = limit
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["emptyDir"]["sizeLimit"] == "20Gi"
    # job-gate-values.yaml sets model.sizeBytes 4920734208: × 1.10 + 64 MiB
    sized = one(rendered["job-gate-values.yaml"], "Rollout")["spec"]["template"]["spec"]
    expected = str(4920734208 * 110 // 100 + 64 * 1024 * 1024)
    assert next(v for v in sized["volumes"] if v["name"] == "models")["emptyDir"]["sizeLimit"] == expected
    assert sized["containers"][0]["resources"]["requests"]["ephemeral-storage"] == expected
    pdb = one(rendered["default"], "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == rollout["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"


def test_pull_everything_is_a_value(helm: Path) -> None:
    objs = render(helm, sets=("model.pullServedOnly=false",))
    init = one(objs, "Rollout")["spec"]["template"]["spec"]["initContainers"][0]
    assert "--quant" not in init["args"]

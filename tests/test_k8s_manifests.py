"""manifests/ and the Hera WorkflowTemplate: strict validation, the golden YAML is current, and the
Sensor's Go templates (rendered by helm's Go text/template + sprig, the engine Argo Events uses)
pick the release spec's path, name and version out of a real push payload."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.k8s_fixtures import ROOT, load_objects, run_tool, tools_or_skip, validate, which_or_skip

MANIFESTS = ROOT / "manifests"
WORKFLOW_SOURCE = ROOT / "pipelines" / "argo" / "release_workflow.py"
WORKFLOW_GOLDEN = ROOT / "pipelines" / "argo" / "release-workflow.yaml"
MANIFEST_FILES = sorted(p for p in MANIFESTS.rglob("*.yaml") if not p.name.endswith(".test.yaml"))


def objects(path: Path) -> list[dict[str, Any]]:
    return load_objects(path.read_text())


def find(kind: str, name: str) -> dict[str, Any]:
    for path in [*MANIFEST_FILES, WORKFLOW_GOLDEN]:
        for obj in objects(path):
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
    raise AssertionError(f"no {kind} {name} in manifests/")


def workflow_module() -> ModuleType:
    pytest.importorskip("hera")
    spec = importlib.util.spec_from_file_location("release_workflow", WORKFLOW_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_workflow"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [*MANIFEST_FILES, WORKFLOW_GOLDEN], ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_strictly(path: Path) -> None:
    objs = objects(path)
    assert objs, f"{path}: no objects"
    for obj in objs:
        validate(obj, str(path.relative_to(ROOT)))


def test_every_kind_is_covered() -> None:
    kinds = {o["kind"] for p in MANIFEST_FILES for o in objects(p)}
    assert {
        "EventSource",
        "Sensor",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Secret",
        "Application",
        "EventBus",
    } <= kinds


def test_golden_workflow_template_is_current() -> None:
    module = workflow_module()
    assert module.render() == WORKFLOW_GOLDEN.read_text(), (
        "pipelines/argo/release-workflow.yaml is stale; run: python pipelines/argo/release_workflow.py"
    )
    assert module.main(["--check"]) == 0


def test_golden_check_detects_staleness(tmp_path: Path) -> None:
    module = workflow_module()
    stale = tmp_path / "release-workflow.yaml"
    stale.write_text(WORKFLOW_GOLDEN.read_text().replace("approve", "aprove"))
    assert module.main(["--check", "-o", str(stale)]) == 1
    assert module.main(["-o", str(stale)]) == 0
    assert stale.read_text() == WORKFLOW_GOLDEN.read_text()


def test_workflow_steps_and_approval() -> None:
    wt = find("WorkflowTemplate", "ggufship-release")
    templates = {t["name"]: t for t in wt["spec"]["templates"]}
    steps = [group[0] for group in templates["release"]["steps"]]
    assert [s["name"] for s in steps] == [
        "checkout", "export", "evaluate", "sign", "publish", "approve", "deploy", "rejected",
        "await-canary-start", "await-canary-outcome",
    ]  # fmt: skip
    approve = templates["approve"]
    assert approve["suspend"] == {}
    (param,) = approve["inputs"]["parameters"]
    assert param["name"] == "approve"
    assert param["enum"] == ["YES", "NO"]
    assert param["default"] == "NO"
    assert approve["outputs"]["parameters"][0]["valueFrom"] == {"supplied": {}}
    when = {s["name"]: s.get("when") for s in steps}
    assert when["deploy"] == "{{steps.approve.outputs.parameters.approve}} == YES"
    assert when["rejected"] == "{{steps.approve.outputs.parameters.approve}} != YES"
    outcome = templates["await-canary-outcome"]["resource"]
    assert outcome["action"] == "get"
    assert outcome["successCondition"] == "status.phase == Healthy"
    assert outcome["failureCondition"] == "status.phase == Degraded"
    # Parameters reach the shell as environment variables, never spliced into the script.
    for name in ("checkout", "export", "evaluate", "sign", "publish", "deploy"):
        script = templates[name]["container"]["args"][0]
        assert "{{" not in script, name


def test_sensor_submits_the_workflow_template_with_its_parameters() -> None:
    wt = find("WorkflowTemplate", "ggufship-release")
    declared = [p["name"] for p in wt["spec"]["arguments"]["parameters"]]
    sensor = find("Sensor", "ggufship-release")
    assert sensor["spec"]["template"]["serviceAccountName"] == "ggufship-sensor"
    for trigger in sensor["spec"]["triggers"]:
        wf = trigger["template"]["argoWorkflow"]
        assert wf["operation"] == "submit"
        resource = wf["source"]["resource"]
        validate(resource, "Workflow submitted by the Sensor")  # strict, against the Workflow CRD
        assert resource["spec"]["workflowTemplateRef"]["name"] == wt["metadata"]["name"]
        params = resource["spec"]["arguments"]["parameters"]
        assert [p["name"] for p in params] == ["release-path", "commit", "name", "version"]
        assert set(p["name"] for p in params) <= set(declared)
        dests = [p["dest"] for p in wf["parameters"]]
        assert dests == [f"spec.arguments.parameters.{i}.value" for i in range(4)]
    deps = {d["name"]: d for d in sensor["spec"]["dependencies"]}
    source = find("EventSource", "ggufship-releases")
    assert deps["github-push"]["eventName"] in source["spec"]["github"]
    assert deps["git-push"]["eventName"] in source["spec"]["webhook"]
    assert "refs/heads/main" in deps["github-push"]["filters"]["script"]


def test_sensor_rbac_allows_submitting_workflows() -> None:
    role = find("Role", "ggufship-sensor")
    binding = find("RoleBinding", "ggufship-sensor")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ggufship-sensor", "namespace": "argo-events"}
    ]
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert "create" in rules[("argoproj.io", "workflows")]
    assert "get" in rules[("argoproj.io", "workflowtemplates")]
    release = find("Role", "ggufship-release")
    assert any("workflowtaskresults" in r["resources"] for r in release["rules"])


def test_webhook_is_hmac_authenticated() -> None:
    source = find("EventSource", "ggufship-releases")
    github = source["spec"]["github"]["releases"]
    secret = find("Secret", "ggufship-webhook")
    assert github["webhookSecret"]["name"] == secret["metadata"]["name"]
    assert github["webhookSecret"]["key"] in secret["stringData"]
    assert github["events"] == ["push"]
    generic = source["spec"]["webhook"]["git-push"]
    assert generic["authSecret"]["key"] in secret["stringData"]


def test_kfp_sensor_posts_a_v2beta1_run(tmp_path: Path) -> None:
    sensor = find("Sensor", "ggufship-release-kfp")
    for trigger in sensor["spec"]["triggers"]:
        http = trigger["template"]["http"]
        assert http["url"].endswith("/apis/v2beta1/runs")
        assert http["method"] == "POST"
        dests = {p["dest"] for p in http["payload"]}
        assert {
            "display_name",
            "pipeline_version_reference.pipeline_id",
            "runtime_config.parameters.name",
            "runtime_config.parameters.version",
            "runtime_config.parameters.release",
            "runtime_config.parameters.checkpoint",
            "experiment_id",  # multi-user KFP rejects a run without one
        } <= dests
    # Every pipeline parameter without a default, and every one the default would get wrong for a
    # cluster release (targets, where the canary runs), is sent.
    from ggufship.pipeline import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", root=ROOT).read_text()))
    declared = spec["root"]["inputDefinitions"]["parameters"]
    required = {n for n, d in declared.items() if not d.get("isOptional")}
    needed = required | {"s3", "oci", "gitops", "environment", "deploy_mode", "rollout_name", "namespace"}
    needed |= {"release_repo", "release_revision"}  # the spec is read from Git in the pod
    for trigger in sensor["spec"]["triggers"]:
        sent = {
            p["dest"].removeprefix("runtime_config.parameters.")
            for p in trigger["template"]["http"]["payload"]
            if p["dest"].startswith("runtime_config.parameters.")
        }
        assert needed <= sent, needed - sent
        assert sent <= set(declared), sent - set(declared)  # KFP rejects an unknown parameter


def test_argocd_application_renders_this_chart() -> None:
    app = find("Application", "support-bot-production")
    chart, gitops = app["spec"]["sources"]
    assert (ROOT / chart["path"] / "Chart.yaml").is_file()
    assert chart["helm"]["valueFiles"] == [f"${gitops['ref']}/deploy/production/support-bot.values.yaml"]
    assert app["spec"]["syncPolicy"]["automated"]["selfHeal"] is True


PUSH = {
    "ref": "refs/heads/main",
    "after": "9f1c2d3e4b5a69788796a5b4c3d2e1f009f1c2d3",
    "commits": [
        {"added": ["docs/notes.md"], "modified": []},
        {"added": ["releases/support-bot-1.4.0-rc.1.yaml"], "modified": ["README.md"]},
    ],
}


def _render_go_template(helm: Path, template: str, payload: dict[str, Any], tmp_path: Path) -> str:
    """Render an Argo Events dataTemplate with Go text/template + sprig (through helm)."""
    chart = tmp_path / "tpl"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tpl\nversion: 0.0.1\n")
    body = template.replace(".Input.", ".Values.Input.")
    (chart / "templates" / "_under_test.tpl").write_text('{{- define "under-test" -}}' + body + "{{- end -}}")
    (chart / "templates" / "out.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: out}\n"
        'data:\n  out: {{ include "under-test" . | quote }}\n'
    )
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"Input": {"body": payload}}))
    out = run_tool([helm, "template", "t", chart, "-f", values]).stdout
    (config_map,) = load_objects(out)
    return str(config_map["data"]["out"])


@pytest.mark.parametrize("sensor_name", ["ggufship-release", "ggufship-release-kfp"])
def test_sensor_templates_extract_release(sensor_name: str, tmp_path: Path) -> None:
    helm = tools_or_skip()["helm"]
    sensor = find("Sensor", sensor_name)
    trigger = sensor["spec"]["triggers"][0]["template"]
    params = (
        trigger["argoWorkflow"]["parameters"] if "argoWorkflow" in trigger else trigger["http"]["payload"]
    )
    got: dict[str, str] = {}
    for i, param in enumerate(params):
        src = param["src"]
        if "dataTemplate" in src:
            got[param["dest"]] = _render_go_template(helm, src["dataTemplate"], PUSH, tmp_path / str(i))
        else:
            got[param["dest"]] = PUSH[src["dataKey"].removeprefix("body.")]  # type: ignore[assignment]
    if sensor_name == "ggufship-release":
        assert [got[f"spec.arguments.parameters.{i}.value"] for i in range(4)] == [
            "releases/support-bot-1.4.0-rc.1.yaml",
            PUSH["after"],
            "support-bot",
            "1.4.0-rc.1",
        ]
    else:
        assert got["runtime_config.parameters.name"] == "support-bot"
        assert got["runtime_config.parameters.version"] == "1.4.0-rc.1"
        assert got["runtime_config.parameters.release"] == "releases/support-bot-1.4.0-rc.1.yaml"
        assert got["runtime_config.parameters.checkpoint"] == "/checkpoints/support-bot/1.4.0-rc.1/checkpoint"
        # the chart's Rollout for helm releaseName <name> (see test_workflow_argocd_and_chart_agree_on_names)
        assert got["runtime_config.parameters.rollout_name"] == "support-bot-ggufship-api"
        assert got["runtime_config.parameters.oci"] == "registry.example.com/models/support-bot"
        assert got["runtime_config.parameters.deploy_mode"] == "gitops"
        # the spec is cloned from the release repository (the EventSource's acme/ml-releases) at the push
        assert got["runtime_config.parameters.release_repo"] == "https://github.com/acme/ml-releases.git"
        assert got["runtime_config.parameters.release_revision"] == PUSH["after"]
        assert (
            got["display_name"] == f"ggufship release releases/support-bot-1.4.0-rc.1.yaml @ {PUSH['after']}"
        )


def test_manifests_are_plain_yaml_documents() -> None:
    for path in MANIFEST_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is None or {"apiVersion", "kind", "metadata"} <= doc.keys(), path


def test_workflow_argocd_and_chart_agree_on_names() -> None:
    """The workflow waits on the Rollout Argo CD deploys: `<release>-ggufship-api` with the release
    named after the model, values from deploy/<environment>/<name>.values.yaml."""
    wt = find("WorkflowTemplate", "ggufship-release")
    params = {p["name"]: p.get("value") for p in wt["spec"]["arguments"]["parameters"]}
    templates = {t["name"]: t for t in wt["spec"]["templates"]}
    rollout = yaml.safe_load(templates["await-canary-outcome"]["resource"]["manifest"])
    assert rollout["kind"] == "Rollout"
    assert rollout["metadata"]["name"] == "{{workflow.parameters.name}}-ggufship-api"
    app = find("Application", "support-bot-production")
    chart = app["spec"]["sources"][0]
    assert chart["helm"]["releaseName"] + "-ggufship-api" == rollout["metadata"]["name"].replace(
        "{{workflow.parameters.name}}", "support-bot"
    )
    assert chart["helm"]["valueFiles"][0].endswith(f"deploy/{params['environment']}/support-bot.values.yaml")
    assert app["spec"]["destination"]["namespace"] == params["rollout-namespace"]
    deploy = templates["deploy"]["container"]["args"][0]
    assert '--gitops-env "$ENVIRONMENT"' in deploy


# ---------------------------------------------------------------- issue 14 items 6 and 9

ROLLOUT_NAMESPACE = "ml"
CHART = ROOT / "charts" / "ggufship-api"


def _application() -> dict[str, Any]:
    return find("Application", "support-bot-production")


def _argocd_normalize(obj: dict[str, Any], ignore: list[dict[str, Any]], jq: str) -> dict[str, Any]:
    """What Argo CD compares (and, with RespectIgnoreDifferences, applies): every matching
    ignoreDifferences jqPathExpression deleted with ``del(expr)`` (argo-cd
    util/argo/normalizers/diff_normalizer.go, jqNormalizerPatch: gojq ``del(%s)``)."""
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    for rule in ignore:
        if rule.get("kind") != obj["kind"] or rule.get("group", "") != group:
            continue
        for expr in rule.get("jqPathExpressions", []):
            out = subprocess.run(
                [jq, "-c", f"del({expr})"], input=json.dumps(obj), capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, f"jq del({expr}): {out.stderr}"
            obj = json.loads(out.stdout)
    return obj


def _mid_canary(obj: dict[str, Any]) -> dict[str, Any]:
    """The live object while Argo Rollouts runs a canary at 5 % (istio/istio.go: weights of the
    named routes, the managed header route inserted first, pod-template hashes in the
    DestinationRule subsets; the Services' selectors get the hash too)."""
    live = json.loads(json.dumps(obj))
    spec = live["spec"]
    if live["kind"] == "VirtualService":
        route = spec["http"][0]["route"]
        route[0]["weight"], route[1]["weight"] = 95, 5
        header = {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "always"}}}]}
        spec["http"].insert(0, {**header, "route": [{"destination": route[1]["destination"], "weight": 100}]})
    elif live["kind"] == "DestinationRule":
        for subset, pod_hash in zip(spec["subsets"], ("5d4f8c7b9", "6c8d9f7a1"), strict=True):
            subset["labels"]["rollouts-pod-template-hash"] = pod_hash
    elif live["kind"] == "Service":
        spec["selector"]["rollouts-pod-template-hash"] = "6c8d9f7a1"
    return live


def test_argocd_ignores_and_respects_what_argo_rollouts_owns() -> None:
    """Issue 14 item 6. With the Application's ignoreDifferences, the live VirtualService,
    DestinationRule and Services in the middle of a canary equal what Git renders — so Argo CD
    neither reports OutOfSync nor (RespectIgnoreDifferences=true) writes Git's 100/0 weights back
    during a sync; without them, they differ."""
    jq = which_or_skip("jq")
    app = _application()
    options = app["spec"]["syncPolicy"]["syncOptions"]
    assert "RespectIgnoreDifferences=true" in options  # ignoreDifferences also during sync
    assert "ApplyOutOfSyncOnly=true" in options
    assert app["spec"]["syncPolicy"]["automated"]["selfHeal"] is True
    ignore = app["spec"]["ignoreDifferences"]
    helm = tools_or_skip()["helm"]
    objs = load_objects(
        run_tool(
            [
                helm,
                "template",
                "rel",
                CHART,
                "-n",
                ROLLOUT_NAMESPACE,
                "-f",
                CHART / "ci" / "istio-values.yaml",
            ]
        ).stdout
    )
    owned = [o for o in objs if o["kind"] in ("VirtualService", "DestinationRule")]
    owned += [
        o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith(("-stable", "-canary"))
    ]
    assert len(owned) == 4
    for desired in owned:
        live = _mid_canary(desired)
        assert live != desired
        assert _argocd_normalize(live, ignore, jq) == _argocd_normalize(desired, ignore, jq), desired["kind"]
        assert _argocd_normalize(live, [], jq) != _argocd_normalize(desired, [], jq)


def test_rbac_in_the_rollouts_namespace() -> None:
    """Issue 14 item 9: a Role only grants rights in its own namespace, so whatever reads the
    Rollout is bound in the Rollout's namespace (the Application's destination): the release
    Workflow's ServiceAccount and the KFP runner's."""
    destination = _application()["spec"]["destination"]["namespace"]
    roles = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for p in MANIFEST_FILES
        for o in objects(p)
        if o["kind"] == "Role"
    }
    bindings = [o for p in MANIFEST_FILES for o in objects(p) if o["kind"] == "RoleBinding"]

    def can(subject: tuple[str, str], verb: str, resource: str, namespace: str) -> bool:
        for binding in bindings:
            if binding["metadata"]["namespace"] != namespace:
                continue
            if not any((s["namespace"], s["name"]) == subject for s in binding["subjects"]):
                continue
            role = roles.get((namespace, binding["roleRef"]["name"]))
            if role and any(
                "argoproj.io" in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                for r in role["rules"]
            ):
                return True
        return False

    workflow = ("argo-events", find("WorkflowTemplate", "ggufship-release")["spec"]["serviceAccountName"])
    kfp_runner = ("kubeflow-user-example-com", "default-editor")
    for subject in (workflow, kfp_runner):
        for verb in ("get", "list", "watch"):
            assert can(subject, verb, "rollouts", destination), (subject, verb)
    assert can(kfp_runner, "patch", "rollouts", destination)
    assert not can(workflow, "patch", "rollouts", destination)
    # nothing grants Rollout access in a namespace where there is no Rollout
    assert not any(
        "rollouts" in r["resources"]
        for (ns, _), role in roles.items()
        if ns != destination
        for r in role["rules"]
    )
    # the workflow's await steps read the Rollout in the namespace its parameter names (default ml)
    params = {
        p["name"]: p for p in find("WorkflowTemplate", "ggufship-release")["spec"]["arguments"]["parameters"]
    }
    assert params["rollout-namespace"].get("value") == destination


def test_eventbus_for_the_sensors_and_eventsource() -> None:
    """Issue 14 item 9: EventSources and Sensors need an EventBus in their namespace, named
    `default` unless they name one (argo-events docs/eventbus/eventbus.md)."""
    bus = find("EventBus", "default")
    assert bus["metadata"]["namespace"] == "argo-events"
    assert bus["spec"]["jetstream"]["version"] != "latest"
    for kind, name in (
        ("EventSource", "ggufship-releases"),
        ("Sensor", "ggufship-release"),
        ("Sensor", "ggufship-release-kfp"),
    ):
        obj = find(kind, name)
        assert obj["metadata"]["namespace"] == bus["metadata"]["namespace"]
        assert obj["spec"].get("eventBusName", "default") == bus["metadata"]["name"]


def _images(node: Any) -> Iterator[str]:
    """Every string under an ``image`` key of a parsed YAML document (containers, scripts...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


def test_one_ggufship_image_everywhere() -> None:
    """KFP components (source default and golden YAML), the Hera workflow (source and YAML), the
    manifests and the chart's default values all name the same ggufship image."""
    import re

    found: dict[str, set[str]] = {}
    kfp_src = (ROOT / "src" / "ggufship" / "pipeline" / "components.py").read_text()
    found["src/ggufship/pipeline/components.py"] = set(re.findall(r'"GGUFSHIP_IMAGE", "([^"]+)"', kfp_src))
    hera_src = (ROOT / "pipelines" / "argo" / "release_workflow.py").read_text()
    found["pipelines/argo/release_workflow.py"] = set(re.findall(r'^IMAGE = "([^"]+)"', hera_src, re.M))
    pipelines = ROOT / "pipelines"
    yamls = [pipelines / "export_to_canary.yaml", pipelines / "argo" / "release-workflow.yaml"]
    for path in [*yamls, *MANIFEST_FILES]:
        images = {i for doc in yaml.safe_load_all(path.read_text()) for i in _images(doc) if "ggufship" in i}
        if images:
            found[str(path.relative_to(ROOT))] = images
    values = yaml.safe_load((ROOT / "charts" / "ggufship-api" / "values.yaml").read_text())
    found["charts/ggufship-api/values.yaml"] = {f"{values['image']['repository']}:{values['image']['tag']}"}
    for must in ("src/ggufship/pipeline/components.py", "pipelines/export_to_canary.yaml",
                 "pipelines/argo/release-workflow.yaml", "charts/ggufship-api/values.yaml"):  # fmt: skip
        assert found.get(must), f"no ggufship image found in {must}"
    distinct = set().union(*found.values())
    assert len(distinct) == 1, found

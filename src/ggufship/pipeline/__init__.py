"""The KFP pipeline ``export-to-canary``: compile it, run it locally, submit it.

The pipeline definition lives in the repository (``pipelines/export_to_canary.py``,
components in ``components/kfp_components.py``); each component calls one function of
:mod:`ggufship.pipeline.steps`. This front finds the definition, compiles it to the
golden YAML, runs it with ``kfp.local.SubprocessRunner(use_venv=False)`` against the
embedded services, or submits the compiled YAML to a KFP API server.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ggufship.environment import environment
from ggufship.errors import UsageError
from ggufship.pipeline.steps import PipelineStepError, RolloutAbortedError, RolloutTimeoutError

logger = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_FILE",
    "PipelineStepError",
    "RolloutAbortedError",
    "RolloutTimeoutError",
    "compile_pipeline",
    "embedded_targets",
    "find_pipeline",
    "load_pipeline_module",
    "run_local",
    "submit",
]

PIPELINE_FILE = Path("pipelines") / "export_to_canary.py"


class PipelineDefinitionError(PipelineStepError):
    """The pipeline definition could not be found or imported."""

    exit_code = 73


class PipelineSubmitError(PipelineStepError):
    """The KFP API server refused the run or could not be reached."""

    exit_code = 74


def find_pipeline(root: Path | None = None) -> Path:
    """``pipelines/export_to_canary.py`` under ``root``, the current directory or the source checkout."""
    candidates = [root] if root else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for base in candidates:
        path = Path(base) / PIPELINE_FILE
        if path.is_file():
            return path
    looked = ", ".join(str(Path(b) / PIPELINE_FILE) for b in candidates)
    raise PipelineDefinitionError(f"pipeline definition not found (looked at {looked}); use --root REPO")


def load_pipeline_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ggufship_export_to_canary", path)
    if spec is None or spec.loader is None:
        raise PipelineDefinitionError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PipelineDefinitionError(f"{path}: import failed: {exc}") from exc
    return module


@contextmanager
def _plain_yaml_strings() -> Iterator[None]:
    """PyYAML's own str representer for the duration of a compile.

    Importing Hera (the Argo WorkflowTemplate) registers a process-wide representer that
    dumps multi-line strings as ``|`` blocks; the compiled KFP YAML must not depend on
    whether Hera was imported first, or the golden file would flip between styles.
    """
    import yaml

    classes = (yaml.Dumper, yaml.SafeDumper, yaml.representer.Representer, yaml.representer.SafeRepresenter)
    saved = [
        (cls, cls.__dict__["yaml_representers"].get(str))
        for cls in classes
        if "yaml_representers" in cls.__dict__
    ]
    for cls, _ in saved:
        cls.yaml_representers[str] = yaml.representer.SafeRepresenter.represent_str
    try:
        yield
    finally:
        for cls, original in saved:
            if original is None:
                cls.yaml_representers.pop(str, None)
            else:
                cls.yaml_representers[str] = original


def compile_pipeline(output: Path | None = None, *, root: Path | None = None) -> Path:
    """Compile the pipeline to YAML (default: the golden ``pipelines/export_to_canary.yaml``)."""
    from kfp import compiler

    source = find_pipeline(root)
    module = load_pipeline_module(source)
    out = output or source.with_suffix(".yaml")
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    with _plain_yaml_strings():
        compiler.Compiler().compile(module.export_to_canary, str(tmp))
    tmp.replace(out)
    logger.info("compiled %s → %s", source, out)
    return out


@dataclass(frozen=True)
class LocalRunResult:
    outputs: dict[str, Any]
    pipeline_root: Path
    artifacts: dict[str, Path] = field(default_factory=dict)


def run_local(
    arguments: dict[str, Any],
    *,
    pipeline_root: Path,
    root: Path | None = None,
    env: dict[str, str] | None = None,
) -> LocalRunResult:
    """Run the whole pipeline on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Every task runs as a subprocess of this Python (so ggufship must be importable here);
    ``env`` is added to the environment the tasks inherit (S3/OCI/git credentials).
    Raises :class:`PipelineStepError` naming the failed task.
    """
    from kfp import local

    module = load_pipeline_module(find_pipeline(root))
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix="kfp-workspace-", dir=pipeline_root))
    # Tasks re-import ggufship in a subprocess: make sure they find this one.
    src_dir = str(Path(__file__).resolve().parents[2])
    python_path = (env or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH"))
    values = {**(env or {}), "PYTHONPATH": os.pathsep.join(p for p in (src_dir, python_path) if p)}
    with environment(values):
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(pipeline_root),
            workspace_root=str(workspace),
            raise_on_error=True,
        )
        with warnings.catch_warnings():
            # kfp warns that our base image name has no "python" in it: it is a Python image.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            try:
                task = module.export_to_canary(**arguments)
            except RuntimeError as exc:
                raise PipelineStepError(f"local pipeline run failed: {exc}") from exc
            except TypeError as exc:
                raise UsageError(f"pipeline arguments: {exc}") from exc
    outputs = dict(getattr(task, "outputs", {}) or {})
    return LocalRunResult(outputs=outputs, pipeline_root=pipeline_root)


def submit(
    host: str,
    arguments: dict[str, Any],
    *,
    package: Path | None = None,
    experiment: str = "ggufship",
    run_name: str | None = None,
    root: Path | None = None,
) -> str:
    """Create a run from the compiled YAML on a KFP API server (what ``kfp run create`` does);
    returns the run id."""
    import kfp

    package = package or find_pipeline(root).with_suffix(".yaml")
    if not package.is_file():
        raise PipelineDefinitionError(
            f"{package}: compiled pipeline not found (run `ggufship pipeline compile`)"
        )
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, experiment_name=experiment, run_name=run_name
        )
    except Exception as exc:
        raise PipelineSubmitError(f"KFP at {host}: {exc}") from exc
    return str(run.run_id)


def embedded_targets(state_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Targets (s3, oci, gitops) and credential environment from the embedded services, if running."""
    from ggufship.services import load_credentials, load_state

    params: dict[str, Any] = {}
    env: dict[str, str] = {}
    try:
        state = load_state(state_dir)
        creds = load_credentials(state_dir)
    except Exception as exc:
        logger.info("no embedded services in %s (%s); give s3/oci/gitops explicitly", state_dir, exc)
        return params, env
    for svc in state.services.values():
        if svc.name == "s3":
            params["s3"] = "s3://ggufship-models"
            params["create_bucket"] = True
            env["GGUFSHIP_S3_ENDPOINT"] = svc.endpoint
            env["GGUFSHIP_S3_ACCESS_KEY"] = creds.s3.access_key
            env["GGUFSHIP_S3_SECRET_KEY"] = creds.s3.secret_key.get_secret_value()
        elif svc.name == "registry":
            params["oci"] = f"{svc.endpoint.split('://', 1)[-1]}/models/{name}"
            env["GGUFSHIP_OCI_USERNAME"] = creds.registry.username
            env["GGUFSHIP_OCI_PASSWORD"] = creds.registry.password.get_secret_value()
        elif svc.name == "git":
            params["gitops"] = svc.endpoint
    return params, env

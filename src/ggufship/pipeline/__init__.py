"""The KFP pipeline ``export-to-canary``: compile it, run it locally, submit it.

The pipeline definition is part of the package (:mod:`ggufship.pipeline.definition`,
components in :mod:`ggufship.pipeline.components`), so it compiles from an installed
wheel; each component calls one function of :mod:`ggufship.pipeline.steps`. This front
compiles it to YAML (in a checkout: the golden ``pipelines/export_to_canary.yaml``), runs
it with ``kfp.local.SubprocessRunner(use_venv=False)`` against the embedded services, or
submits it to a KFP API server. Reading the embedded services' state (``ggufship up``) is
done here (:func:`embedded_targets`) and by the CLI only: the steps take endpoints and
credentials from their parameters and environment.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufship.environment import environment
from ggufship.errors import UsageError
from ggufship.pipeline.steps import PipelineStepError, RolloutAbortedError, RolloutTimeoutError

logger = logging.getLogger(__name__)

__all__ = [
    "GOLDEN_FILE",
    "PipelineStepError",
    "RolloutAbortedError",
    "RolloutTimeoutError",
    "compile_pipeline",
    "embedded_targets",
    "golden_path",
    "run_local",
    "submit",
]

#: The compiled pipeline a checkout keeps (relative to the repository root).
GOLDEN_FILE = Path("pipelines") / "export_to_canary.yaml"
#: Where ``compile`` writes outside a checkout.
PLAIN_FILE = Path("export_to_canary.yaml")


class PipelineDefinitionError(PipelineStepError):
    """The pipeline definition could not be found or imported."""

    exit_code = 73


class PipelineSubmitError(PipelineStepError):
    """The KFP API server refused the run or could not be reached."""

    exit_code = 74


def _checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install), if any."""
    base = Path(__file__).resolve().parents[3]
    return base if (base / "pyproject.toml").is_file() and (base / "pipelines").is_dir() else None


def golden_path(root: Path | None = None) -> Path:
    """Where the compiled YAML goes by default: ``ROOT/pipelines/export_to_canary.yaml`` for
    ``root``, else for the current directory or the source checkout when they hold
    ``pipelines/``, else ``./export_to_canary.yaml`` (an installed wheel outside a checkout)."""
    if root is not None:
        return Path(root) / GOLDEN_FILE
    for base in (Path.cwd(), _checkout_root()):
        if base is not None and (base / GOLDEN_FILE.parent).is_dir():
            return base / GOLDEN_FILE
    return Path.cwd() / PLAIN_FILE


def _pipeline() -> Any:
    """The ``@dsl.pipeline`` function (imports kfp)."""
    from ggufship.pipeline.definition import export_to_canary

    return export_to_canary


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
    """Compile the pipeline to YAML at ``output`` (default: :func:`golden_path` of ``root``);
    written to a temporary file beside it and renamed, so a failed compile leaves nothing."""
    from kfp import compiler

    out = Path(output) if output is not None else golden_path(root)
    if not out.parent.is_dir():
        raise PipelineDefinitionError(f"{out}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        with _plain_yaml_strings():
            compiler.Compiler().compile(_pipeline(), str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise PipelineDefinitionError(f"compiling the pipeline to {out} failed: {exc}") from exc
    tmp.replace(out)
    logger.info("compiled the pipeline → %s", out)
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
    ``env`` is added to the environment the tasks inherit (S3/OCI/git endpoints and
    credentials: :func:`embedded_targets` gives the embedded services'). ``root`` is not
    used (the definition is in the package; kept for callers). Kubernetes settings
    (Secrets, the inputs volume) are ignored by ``kfp.local``. Raises
    :class:`PipelineStepError` naming the failed task.
    """
    from kfp import local

    pipeline = _pipeline()
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
                task = pipeline(**arguments)
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
    returns the run id. ``package``: the compiled YAML to submit; default: this installed
    version's pipeline, compiled now (in a checkout identical to the golden YAML). ``root``
    is not used (kept for callers)."""
    with tempfile.TemporaryDirectory(prefix="ggufship-kfp-") as tmp:
        if package is None:
            package = compile_pipeline(Path(tmp) / PLAIN_FILE)
        elif not package.is_file():
            raise PipelineDefinitionError(f"{package}: compiled pipeline not found")
        return _create_run(host, package, arguments, experiment, run_name)


def _create_run(
    host: str, package: Path, arguments: dict[str, Any], experiment: str, run_name: str | None
) -> str:
    import kfp

    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, experiment_name=experiment, run_name=run_name
        )
    except Exception as exc:
        raise PipelineSubmitError(f"KFP at {host}: {exc}") from exc
    return str(run.run_id)


_USER_SETTING = {"s3": "GGUFSHIP_S3_ENDPOINT", "registry": "GGUFSHIP_OCI_USERNAME"}


def embedded_targets(state_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Targets (s3, oci, gitops) and the environment with their endpoint and credentials
    (``GGUFSHIP_S3_*``, ``GGUFSHIP_OCI_*``) from the embedded services of ``ggufship up``, if
    running: the local runner's front (the steps themselves never read the state dir).

    The caller's own settings win: with ``GGUFSHIP_S3_ENDPOINT`` in the environment the embedded
    S3 is left out, with ``GGUFSHIP_OCI_USERNAME`` the embedded registry, so the embedded keys
    never replace the user's nor go to an endpoint the user named."""
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
        if svc.name in ("s3", "registry") and os.environ.get(_USER_SETTING[svc.name]):
            logger.info("%s is set: the embedded %s is not used", _USER_SETTING[svc.name], svc.name)
        elif svc.name == "s3":
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

"""The release spec: hyperparameters, datasets and eval metrics of a fine-tune.

A YAML file kept in Git beside the training code (``--release release.yaml``).
Everything in it lands in ``manifest.json``, the model card and the GGUF.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import blake3
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ggufship.errors import ReleaseSpecError

logger = logging.getLogger(__name__)

Scalar = str | int | float | bool

_FINGERPRINT_CHUNK = 4 * 1024 * 1024


class Dataset(BaseModel):
    """A training or evaluation dataset.

    ``path`` (a file or a directory, relative to the spec file) is fingerprinted
    with BLAKE3 over the sorted relative paths and contents of its files.
    ``uri`` is where the dataset lives for others (``s3://``, ``hf://``, ...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Dataset id, e.g. an HF dataset id")
    uri: str | None = Field(default=None, description="Where the dataset is stored")
    path: Path | None = Field(default=None, description="Local copy to fingerprint")
    fingerprint: str | None = Field(
        default=None,
        pattern=r"^blake3:[0-9a-f]{64}$",
        description="Expected BLAKE3 fingerprint; checked when path is given",
    )
    split: str | None = None


class GoldenSetSpec(BaseModel):
    """The golden set ``ggufship evaluate`` measures every release on: a JSONL file (path relative
    to the spec file) fingerprinted with BLAKE3 like the datasets; a declared ``fingerprint``
    that does not match the file is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Golden set id")
    path: Path = Field(description="JSONL file, relative to the spec file")
    fingerprint: str | None = Field(
        default=None, pattern=r"^blake3:[0-9a-f]{64}$", description="Expected BLAKE3 fingerprint"
    )


class EvalResult(BaseModel):
    """Metrics of one evaluation run; becomes a ``model-index`` result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = Field(default="text-generation", min_length=1)
    dataset: str = Field(min_length=1, description="Name of the evaluation dataset")
    metrics: dict[str, float] = Field(min_length=1)


class ReleaseSpec(BaseModel):
    """Validated contents of ``release.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    base_model: str | None = None
    base_model_relation: Literal["adapter", "finetune", "merge", "quantized"] | None = None
    license: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    hyperparameters: dict[str, Scalar] = Field(default_factory=dict)
    datasets: tuple[Dataset, ...] = ()
    evaluations: tuple[EvalResult, ...] = ()
    golden_set: GoldenSetSpec | None = None

    @field_validator("hyperparameters")
    @classmethod
    def _keys_are_identifiers(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for key in value:
            if not key or not all(c.isalnum() or c in "_-." for c in key):
                raise ValueError(f"hyperparameter name {key!r} must be letters, digits, _ - .")
        return value


def dataset_fingerprint(path: Path) -> str:
    """BLAKE3 over a file or a directory tree: sorted relative paths + contents.

    Each file contributes its POSIX relative path, a NUL, its length as 8
    little-endian bytes, then its bytes, so that no two different trees can
    produce the same input stream.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
        root = path.parent
    elif path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        root = path
    else:
        raise ReleaseSpecError(f"dataset path {path} does not exist")
    hasher = blake3.blake3()
    for file in files:
        rel = file.relative_to(root).as_posix().encode()
        hasher.update(rel + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as fh:
            while chunk := fh.read(_FINGERPRINT_CHUNK):
                hasher.update(chunk)
    return "blake3:" + hasher.hexdigest()


def load_release_spec(path: Path) -> ReleaseSpec:
    """Read, validate and fingerprint a release spec.

    Dataset paths are resolved relative to the spec file. Every problem names
    the file and the field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReleaseSpecError(f"{path}: release spec not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReleaseSpecError(f"{path}: cannot read release spec: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ReleaseSpecError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ReleaseSpecError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        spec = ReleaseSpec.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ReleaseSpecError(f"{path}: invalid release spec: {details}") from exc
    datasets = []
    for i, ds in enumerate(spec.datasets):
        if ds.path is None:
            datasets.append(ds)
            continue
        resolved = ds.path if ds.path.is_absolute() else (path.parent / ds.path)
        if not resolved.exists():
            raise ReleaseSpecError(f"{path}: datasets.{i}.path: {resolved} does not exist")
        fingerprint = dataset_fingerprint(resolved)
        if ds.fingerprint is not None and ds.fingerprint != fingerprint:
            raise ReleaseSpecError(
                f"{path}: datasets.{i}.fingerprint: {ds.fingerprint} != computed {fingerprint}"
            )
        datasets.append(ds.model_copy(update={"fingerprint": fingerprint}))
    golden = spec.golden_set
    if golden is not None:
        resolved = golden.path if golden.path.is_absolute() else (path.parent / golden.path)
        if not resolved.is_file():
            raise ReleaseSpecError(f"{path}: golden_set.path: {resolved} does not exist or is not a file")
        fingerprint = dataset_fingerprint(resolved)
        if golden.fingerprint is not None and golden.fingerprint != fingerprint:
            raise ReleaseSpecError(
                f"{path}: golden_set.fingerprint: {golden.fingerprint} != computed {fingerprint}"
            )
        golden = golden.model_copy(update={"path": resolved, "fingerprint": fingerprint})
    return spec.model_copy(update={"datasets": tuple(datasets), "golden_set": golden})

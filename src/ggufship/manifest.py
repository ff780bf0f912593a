"""``manifest.json``: the typed record of one export, read by every later stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ggufship.errors import ManifestError
from ggufship.layout import MANIFEST_NAME, file_set_problems, path_problem
from ggufship.measured import MeasuredEvaluation

MANIFEST_SCHEMA = "ggufship.manifest/v1"

__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "Manifest", "ManifestFile", "SourceInfo"]


class ManifestFile(BaseModel):
    """One output file: its path relative to the export directory, digest and size.

    ``path`` is untrusted when the manifest comes from a bucket or a registry: it must
    be a relative, normalised POSIX path (see :mod:`ggufship.layout`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    kind: Literal["gguf", "model-card"]
    quantization: str | None = None

    @field_validator("path")
    @classmethod
    def _relative_normalised(cls, value: str) -> str:
        problem = path_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class TensorRemap(BaseModel):
    """A wrapper prefix stripped from tensor names before conversion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_prefix: str
    to_prefix: str
    tensors: int


class AdapterInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    peft_type: str
    base_model_name_or_path: str | None
    target_modules: tuple[str, ...]
    r: int | None = None
    lora_alpha: float | None = None


class SourceInfo(BaseModel):
    """Where the export came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint_sha256: str
    architecture: str
    weights_format: Literal["safetensors", "safetensors-sharded", "pytorch-bin"]
    tensor_remap: TensorRemap | None = None
    adapter: AdapterInfo | None = None


class Manifest(BaseModel):
    """Everything a later stage needs to know about an export, and nothing volatile.

    No timestamps: the same inputs give a byte-identical manifest.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: str = Field(default=MANIFEST_SCHEMA, alias="schema")
    name: str
    version: str
    base_model: str | None = None
    files: tuple[ManifestFile, ...]
    source: SourceInfo
    metadata: dict[str, Any] = Field(default_factory=dict)
    toolchain: dict[str, str] = Field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    #: Written by ``ggufship evaluate`` before signing; absent (not null) until then.
    evaluation: MeasuredEvaluation | None = None

    @field_validator("name", "version")
    @classmethod
    def _one_segment(cls, value: str) -> str:
        # name and version become S3 key segments and GitOps file names
        problem = path_problem(value)
        if problem is None and "/" in value:
            problem = "contains '/' (must be one path segment)"
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("files")
    @classmethod
    def _one_directory(cls, files: tuple[ManifestFile, ...]) -> tuple[ManifestFile, ...]:
        problems = file_set_problems(f.path for f in files)
        if problems:
            raise ValueError("; ".join(problems))
        return files

    def gguf_files(self) -> tuple[ManifestFile, ...]:
        return tuple(f for f in self.files if f.kind == "gguf")

    def to_json(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
        if data.get("evaluation") is None:
            data.pop("evaluation", None)  # manifests of unevaluated exports keep their bytes
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: Path) -> Manifest:
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ManifestError(f"{path}: no manifest (is this an export directory?)") from exc
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid manifest: {exc}") from exc

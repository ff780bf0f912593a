"""``manifest.json``: the typed record of one export, read by every later stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ggufship.errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "ggufship.manifest/v1"


class ManifestFile(BaseModel):
    """One output file: its path relative to the export directory, digest and size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    kind: Literal["gguf", "model-card"]
    quantization: str | None = None


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

    def gguf_files(self) -> tuple[ManifestFile, ...]:
        return tuple(f for f in self.files if f.kind == "gguf")

    def to_json(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
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

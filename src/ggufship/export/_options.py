"""The options of ``ggufship export``: one declaration each (flag, type, default, help)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.export import DEFAULT_QUANTS
from ggufship.options import option


class ExportOptions(BaseModel):
    """``ggufship export CHECKPOINT -o OUT --name N --version V [...]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Path | None = Field(
        default=None,
        description="checkpoint directory (config.json, weights, tokenizer)",
        json_schema_extra=option(positional=True),
    )
    out: Path | None = Field(
        default=None,
        description="output directory (must not exist or be empty)",
        json_schema_extra=option(short="-o", metavar="OUT"),
    )
    name: str | None = Field(default=None, description="model name: lowercase letters, digits, . _ -")
    model_version: str | None = Field(
        default=None, description="release version, e.g. 1.2.0", json_schema_extra=option("version")
    )
    adapter: Path | None = Field(default=None, description="PEFT LoRA adapter directory to merge first")
    quant: tuple[str, ...] = Field(
        default=DEFAULT_QUANTS,
        min_length=1,
        description="llama.cpp type (repeatable)",
        json_schema_extra=option(metavar="TYPE", repeat=True),
    )
    release: Path | None = Field(
        default=None, description="release spec YAML (hyperparameters, datasets, eval metrics)"
    )
    force: bool = Field(
        default=False,
        description="replace a non-empty output directory",
        json_schema_extra=option(action="store_true"),
    )
    no_tokenizer_check: bool = Field(
        default=False,
        description="skip the HF vs GGUF tokenization probes",
        json_schema_extra=option(action="store_true"),
    )
    json_output: bool = Field(
        default=False,
        description="print the manifest as JSON on stdout",
        json_schema_extra=option("json", action="store_true"),
    )
    list_architectures: bool = Field(
        default=False,
        description="list what the converter supports, exit",
        json_schema_extra=option(action="store_true"),
    )
    list_quants: bool = Field(
        default=False,
        description="list the quantization types, exit",
        json_schema_extra=option(action="store_true"),
    )

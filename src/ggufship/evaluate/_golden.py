"""Read and validate a golden set (JSONL): every problem names the file, the line and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ggufship.evaluate._model import CHECK_TYPES, GoldenExample, GoldenSet, GoldenSetError
from ggufship.release import dataset_fingerprint

_MAX_LINE = 1_000_000


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "value"


def _example(path: Path, lineno: int, raw: dict[str, Any]) -> GoldenExample:
    where = f"{path}:{lineno}"
    checks = raw.get("checks", [])
    if not isinstance(checks, list):
        raise GoldenSetError(f"{where}: field 'checks' must be a list, got {type(checks).__name__}")
    for i, check in enumerate(checks):
        if not isinstance(check, dict) or "type" not in check:
            raise GoldenSetError(f"{where}: field 'checks.{i}' must be an object with a 'type'")
        if check["type"] not in CHECK_TYPES:
            raise GoldenSetError(
                f"{where}: field 'checks.{i}.type': unknown check type {check['type']!r} "
                f"(known: {', '.join(CHECK_TYPES)})"
            )
    data = {
        "id": str(raw.get("id", f"line-{lineno}")),
        "line": lineno,
        **{k: v for k, v in raw.items() if k != "id"},
    }
    try:
        example = GoldenExample.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise GoldenSetError(f"{where}: field '{_field_path(err['loc'])}': {err['msg']}") from exc
    if (example.messages is None) == (example.prompt is None):
        raise GoldenSetError(f"{where}: exactly one of 'messages' or 'prompt' is required")
    if example.messages is not None and not example.messages:
        raise GoldenSetError(f"{where}: field 'messages': at least one message")
    if example.reference is None and not example.checks:
        raise GoldenSetError(f"{where}: an example needs a 'reference' answer, 'checks', or both")
    if example.reference is not None and not example.reference.strip():
        raise GoldenSetError(f"{where}: field 'reference': empty")
    for i, check in enumerate(example.checks):
        if check.type == "exact" and check.value is None:
            raise GoldenSetError(f"{where}: field 'checks.{i}.value': required by an exact check")
        if check.type == "regex":
            if check.pattern is None:
                raise GoldenSetError(f"{where}: field 'checks.{i}.pattern': required by a regex check")
            try:
                re.compile(check.pattern)
            except re.error as exc:
                raise GoldenSetError(f"{where}: field 'checks.{i}.pattern': not a regex: {exc}") from exc
        if check.type == "json_schema":
            if check.json_schema is None:
                raise GoldenSetError(f"{where}: field 'checks.{i}.schema': required by a json_schema check")
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(check.json_schema)
            except jsonschema.SchemaError as exc:
                raise GoldenSetError(f"{where}: field 'checks.{i}.schema': invalid: {exc.message}") from exc
    return example


def load_golden_set(path: Path, *, name: str | None = None, fingerprint: str | None = None) -> GoldenSet:
    """Read ``path`` (JSONL, one example per line; blank lines allowed), check it against
    ``fingerprint`` (BLAKE3, as for the release spec's datasets) when given."""
    path = Path(path)
    if not path.exists():
        raise GoldenSetError(f"{path}: golden set not found")
    if not path.is_file():
        raise GoldenSetError(f"{path}: golden set must be a JSONL file, not a directory")
    computed = dataset_fingerprint(path)
    if fingerprint is not None and fingerprint != computed:
        raise GoldenSetError(f"{path}: fingerprint {fingerprint} != computed {computed} (the file changed)")
    examples: list[GoldenExample] = []
    seen: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if len(line) > _MAX_LINE:
                    raise GoldenSetError(f"{path}:{lineno}: line longer than {_MAX_LINE} characters")
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GoldenSetError(
                        f"{path}:{lineno}: not JSONL: {exc.msg} (column {exc.colno})"
                    ) from exc
                if not isinstance(raw, dict):
                    raise GoldenSetError(f"{path}:{lineno}: each line must be a JSON object")
                example = _example(path, lineno, raw)
                if example.id in seen:
                    raise GoldenSetError(
                        f"{path}:{lineno}: field 'id': {example.id!r} already used on line {seen[example.id]}"
                    )
                seen[example.id] = lineno
                examples.append(example)
    except UnicodeDecodeError as exc:
        raise GoldenSetError(f"{path}: not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise GoldenSetError(f"{path}: cannot read golden set: {exc}") from exc
    if not examples:
        raise GoldenSetError(f"{path}: golden set is empty (no examples)")
    return GoldenSet(name=name or path.stem, path=path.name, fingerprint=computed, examples=tuple(examples))

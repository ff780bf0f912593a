"""The generated reference pages (exit codes, environment variables) are current."""

from __future__ import annotations

from pathlib import Path

from ggufship import reference
from ggufship.cli.main import main
from ggufship.errors import GgufshipError, IntegrityError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference"


def test_generated_reference_pages_are_current() -> None:
    assert reference.stale(DOCS) == [], "run: ggufship reference --write docs/reference"


def test_every_exception_class_has_a_row_and_every_code_is_an_int() -> None:
    rows = reference.exit_codes()
    names = {r.name for r in rows}
    assert {"GgufshipError", "IntegrityError", "ManifestError"} <= names
    assert any(r.code == IntegrityError.exit_code and r.name == "IntegrityError" for r in rows)
    assert all(isinstance(r.code, int) and 0 <= r.code < 256 for r in rows)
    assert all(r.summary for r in rows), [r.name for r in rows if not r.summary]
    assert GgufshipError.exit_code == 1


def test_settings_rows_carry_the_env_prefix() -> None:
    rows = reference.env_settings()
    serve = [r for r in rows if r.model.endswith("ServeSettings")]
    assert any(r.variable == "GGUFSHIP_SERVE_PORT" and r.default == "8000" for r in serve)
    assert all(r.variable == r.variable.upper() for r in rows)


def test_check_command_names_the_stale_page(tmp_path: Path) -> None:
    assert main(["reference", "--write", str(tmp_path)]) == 0
    assert main(["reference", "--check", str(tmp_path)]) == 0
    (tmp_path / reference.SETTINGS_FILE).write_text("edited\n")
    assert main(["reference", "--check", str(tmp_path)]) == 2

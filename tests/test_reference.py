"""The generated reference pages (exit codes, environment variables) are current."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufship import reference
from ggufship.cli.main import main
from ggufship.errors import GgufshipError, IntegrityError, UsageError

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


def _docs_tree(tmp_path: Path, page: str) -> Path:
    """A docs/ directory with one stage page and the generated pages written; returns docs/reference."""
    (tmp_path / "stage.md").write_text(page, encoding="utf-8")
    ref = tmp_path / "reference"
    reference.write(ref)
    return ref


def test_stage_page_blocks_are_filled_from_the_classes_and_checked(tmp_path: Path) -> None:
    page = (
        "# Stage\n\nprose stays\n\n<!-- generated: exit-codes ggufship.sign UsageError -->\n"
        "| code | hand-written |\n<!-- end generated -->\n\nafter\n"
    )
    ref = _docs_tree(tmp_path, page)
    text = (tmp_path / "stage.md").read_text(encoding="utf-8")
    assert "hand-written" not in text
    assert text.startswith("# Stage\n\nprose stays\n") and text.endswith("<!-- end generated -->\n\nafter\n")
    assert "| 2 | `UsageError` |" in text and "| 34 | `TamperedError` |" in text
    assert "IntegrityError`" not in text  # only what the words select (TamperedError is one too)
    assert reference.stale(ref) == []
    edited = text.replace("| 2 | `UsageError` |", "| 3 | `UsageError` |")
    (tmp_path / "stage.md").write_text(edited, encoding="utf-8")
    assert reference.stale(ref) == ["../stage.md"]
    assert main(["reference", "--check", str(ref)]) == 2
    assert main(["reference", "--write", str(ref)]) == 0
    assert (tmp_path / "stage.md").read_text(encoding="utf-8") == text


def test_settings_block_selects_one_model(tmp_path: Path) -> None:
    page = "<!-- generated: settings ggufship.sign.SignSettings -->\n<!-- end generated -->\n"
    ref = _docs_tree(tmp_path, page)
    text = (tmp_path / "stage.md").read_text(encoding="utf-8")
    assert "`GGUFSHIP_TRUST_CONFIG`" in text and "GGUFSHIP_SERVE_" not in text
    assert reference.stale(ref) == []


def test_a_block_word_that_selects_nothing_names_the_page(tmp_path: Path) -> None:
    (tmp_path / "stage.md").write_text(
        "<!-- generated: exit-codes ggufship.sign NoSuchError -->\n<!-- end generated -->\n", encoding="utf-8"
    )
    with pytest.raises(UsageError, match=r"stage\.md.*'NoSuchError'.*selects nothing"):
        reference.write(tmp_path / "reference")
    assert not (tmp_path / "reference" / reference.EXIT_CODES_FILE).exists()  # nothing half-written


def test_stage_pages_carry_no_hand_written_exit_code_tables() -> None:
    """Every exit-code table (``| code |``) and environment-variable table (``| variable |``) on a
    docs page sits in a generated block."""
    for page in sorted(DOCS.parent.glob("*.md")):
        inside = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("<!-- generated: "):
                inside = True
            elif line == reference.BLOCK_END:
                inside = False
            elif line.startswith(("| code |", "| exit |")) and not inside:
                raise AssertionError(f"{page.name}:{number}: a hand-written exit-code table")
            elif line.startswith("| variable |") and not inside:
                raise AssertionError(f"{page.name}:{number}: a hand-written environment-variable table")


def test_summaries_are_markdown_not_restructured_text() -> None:
    summaries = [r.summary for r in reference.exit_codes()]
    assert not [s for s in summaries if "``" in s or ":class:`" in s or ":func:`" in s]
    tampered = next(r for r in reference.exit_codes() if r.name == "PrometheusAnswerError")
    assert "A subclass of `PrometheusUnavailableError`" in tampered.summary

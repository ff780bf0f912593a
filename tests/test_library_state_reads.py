"""Library code never reads the local ``ggufship up`` state (``STATE_DIR/state.json``,
``credentials.json``): the stages and the pipeline steps take endpoints and credentials from their
arguments and the environment; only the fronts (the CLI, the local pipeline runner
``ggufship.pipeline.embedded_targets``) fill them from the embedded services.

An AST scan of the library sources: no import or call of ``ggufship.services.load_state`` /
``load_credentials``, and no import of the CLI (``ggufship.cli.*``, e.g. ``cli.embedded``) through
which they would be reached."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ggufship"
FORBIDDEN_NAMES = frozenset({"load_state", "load_credentials"})

#: The library parts that run in a pod (KFP steps) or behind a user's own settings.
LIBRARY = [
    "export",
    "sign",
    "publish",
    "serve",
    "gate",
    "evaluate",
    "pipeline/steps.py",
    "pipeline/inputs.py",
    "pipeline/evaluation.py",
    "pipeline/components.py",
    "pipeline/definition.py",
    "rollback.py",
]


def state_reads(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every forbidden import, name or attribute in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "ggufship.cli" or module.startswith("ggufship.cli."):
                found.append(f"{where}: imports the CLI ({module})")
            for alias in node.names:
                if alias.name in FORBIDDEN_NAMES:
                    found.append(f"{where}: imports {alias.name} from {module}")
                if module == "ggufship" and alias.name == "cli":
                    found.append(f"{where}: imports the CLI")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ggufship.cli" or alias.name.startswith("ggufship.cli."):
                    found.append(f"{where}: imports the CLI ({alias.name})")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_NAMES:
            found.append(f"{where}: uses .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append(f"{where}: uses {node.id}")
    return found


def _files(part: str) -> list[Path]:
    path = SRC / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("part", LIBRARY)
def test_library_reads_no_state(part: str) -> None:
    files = _files(part)
    assert files and all(f.is_file() for f in files), f"{part}: nothing to scan (moved?)"
    found = [hit for f in files for hit in state_reads(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert not found, "library code reads the `ggufship up` state; resolve it in the CLI:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source",
    [
        "from ggufship.services import load_state\n",
        "from ggufship.services import ServiceError, load_credentials as creds\n",
        "import ggufship.services as s\ns.load_state(d)\n",
        "def f():\n    from ggufship.cli.embedded import with_embedded_s3\n",
        "import ggufship.cli.publish\n",
    ],
)
def test_scan_catches(source: str) -> None:
    """The scan is not vacuous: each way of reaching the state is reported."""
    assert state_reads(source, "x.py")


def test_the_local_runner_front_reads_it() -> None:
    """The local pipeline runner is where the pipeline's resolution is (the scan above did not lose it)."""
    assert state_reads((SRC / "pipeline" / "__init__.py").read_text(), "pipeline/__init__.py")

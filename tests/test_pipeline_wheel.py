"""``ggufship pipeline compile`` from an installed wheel: the KFP pipeline definition is part of the
package, and compiling it imports nothing from the source checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from pathlib import Path
from ggufship.cli.main import main

rc = main(["pipeline", "compile"])
import ggufship
roots = tuple(r + "/" for r in sys.argv[1:])
outside = sorted(
    name for name, mod in list(sys.modules.items())
    if str(getattr(mod, "__file__", "") or "").startswith(roots)
)
print(json.dumps({"rc": rc, "ggufship": ggufship.__file__, "from_checkout": outside}))
"""


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (pip builds in-tree; the checkout stays clean)."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy2(ROOT / "pyproject.toml", tree)
    shutil.copy2(ROOT / "README.md", tree)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)])
    (whl,) = out.glob("ggufship-*.whl")
    return whl


def test_wheel_holds_the_pipeline(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("definition", "components", "steps", "inputs"):
        assert f"ggufship/pipeline/{module}.py" in names
    assert not any(n.startswith(("components/", "pipelines/")) for n in names), "only the package ships"


def test_compile_from_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel (--no-deps) into a throwaway venv, take the dependencies (kfp...) from this
    environment's site-packages through PYTHONPATH (its .pth files, so the editable checkout, are not
    read), and compile outside any checkout: the YAML equals the golden file."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"], "HOME": str(tmp_path)}
    sources = [str(ROOT / d) for d in ("src", "components", "pipelines", "tests")]
    done = _run([str(python), "-c", PROBE, *sources], cwd=cwd, env=env)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["rc"] == 0
    assert Path(probe["ggufship"]).is_relative_to(venv), probe  # the wheel's copy, not the checkout's
    assert probe["from_checkout"] == [], "compile imported modules from the source checkout"
    # Outside a checkout the default output is ./export_to_canary.yaml.
    compiled = cwd / "export_to_canary.yaml"
    assert compiled.read_text() == (ROOT / "pipelines" / "export_to_canary.yaml").read_text()

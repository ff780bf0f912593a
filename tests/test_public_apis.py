"""Library code uses only the public API of third-party packages (issue 12, part 2).

An AST scan of every module under ``src/ggufship``. A third-party private name is
any ``_name`` (not ``__dunder__``) that ggufship does not define itself, reached as

* an attribute, ``x._name``: on a name bound to a third-party import (always), or
  on anything else when no ggufship module defines ``_name`` (a method, function,
  class, module, or an attribute it assigns) — it can then only be someone else's,
  e.g. ``client._put_object`` on a minio client;
* a string given to ``getattr``/``setattr``/``hasattr``/``delattr``;
* an import: ``from pkg import _name``, ``import pkg._mod``, ``from pkg._mod import x``.

Standard-library modules are not third-party (``sys._getframe`` is allowed).
``ALLOWED`` lists the justified exceptions, each with its reason.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ggufship"

# (path under src/, private name) -> why it is allowed. Keep this short; every entry is debt.
ALLOWED: dict[tuple[str, str], str] = {
    # model_signing 1.1.1 verifies only through verifying.Config.verify, which hashes the files
    # through a (public, replaceable) hashing config; to compare the signed statement with the
    # digests pull computed while streaming (not hash every GGUF again) that config builds a
    # manifest, whose items need model_signing's Digest: it lives in a private module.
    ("ggufship/sign/_verifier.py", "_hashing"): "model_signing has no public Digest constructor",
    # llama-cpp-python installs its own log callback (llama_cpp._logger.llama_log_callback)
    # at import and has no public handle on it; quantize() captures llama.cpp's log with
    # its own callback and must hand logging back to that one afterwards.
    (
        "ggufship/export/_quantize.py",
        "llama_cpp._logger",
    ): "no public handle on llama-cpp-python's log callback",
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _third_party(module: str) -> bool:
    top = _top(module)
    return bool(top) and top != "ggufship" and top not in sys.stdlib_module_names and top != "__future__"


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(SRC).as_posix(), ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _own_names(modules: list[tuple[str, ast.Module]]) -> set[str]:
    """Every name ggufship itself defines: modules, functions, classes, assigned names and attributes."""
    names = {Path(rel).stem for rel, _ in modules} | {Path(rel).parent.name for rel, _ in modules}
    for _, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)  # self._x = ..., obj._x = ...
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    name: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _bindings(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound by imports in a module: (third-party, standard library)."""
    third: set[str] = set()
    stdlib: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if _third_party(alias.name):
                    third.add(bound)
                elif _top(alias.name) in sys.stdlib_module_names:
                    stdlib.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound = alias.asname or alias.name
                if _third_party(node.module):
                    third.add(bound)
                elif _top(node.module) in sys.stdlib_module_names:
                    stdlib.add(bound)
    return third, stdlib


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def scan(modules: list[tuple[str, ast.Module]]) -> list[Finding]:
    own = _own_names(modules)
    found: list[Finding] = []
    for rel, tree in modules:
        third, stdlib = _bindings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                root = _root(node.value)
                if root in third:
                    found.append(
                        Finding(rel, node.lineno, node.attr, f"{root}…{node.attr}: private to a third party")
                    )
                elif root not in stdlib and node.attr not in own:
                    found.append(
                        Finding(
                            rel,
                            node.lineno,
                            node.attr,
                            f".{node.attr}: not defined by ggufship (third-party?)",
                        )
                    )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _is_private(node.args[1].value)
            ):
                name = node.args[1].value
                root = _root(node.args[0])
                if root in third or (root not in stdlib and name not in own):
                    found.append(Finding(rel, node.lineno, name, f"{node.func.id}(…, {name!r})"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _third_party(alias.name) and any(_is_private(p) for p in alias.name.split(".")):
                        found.append(Finding(rel, node.lineno, alias.name, f"import {alias.name}"))
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and _third_party(node.module)
            ):
                parts = node.module.split(".") + [a.name for a in node.names]
                for part in parts:
                    if _is_private(part):
                        found.append(Finding(rel, node.lineno, part, f"from {node.module} import …{part}"))
    return found


def test_library_code_uses_no_private_third_party_names() -> None:
    findings = scan(_modules())
    unexpected = [f for f in findings if (f.path, f.name) not in ALLOWED]
    assert not unexpected, "private third-party names in library code:\n" + "\n".join(map(str, unexpected))
    stale = set(ALLOWED) - {(f.path, f.name) for f in findings}
    assert not stale, f"allow-list entries no longer needed (remove them): {sorted(stale)}"


def test_the_scan_catches_what_it_is_for() -> None:
    """The scan itself, on code written to break the rule (and on code that keeps it)."""
    bad = ast.parse(
        "import minio\n"
        "from minio import Minio\n"
        "from minio.api import _helper\n"
        "import oras._internal\n"
        "from pydantic._internal import x\n"
        "client = Minio('h')\n"
        "client._put_object('b', 'k', b'', {})\n"  # instance of a third-party class
        "minio._private_thing\n"  # module attribute
        "getattr(client, '_execute')\n"
    )
    good = ast.parse(
        "import sys\n"
        "from ggufship.publish import _s3\n"
        "class Own:\n"
        "    def __init__(self):\n"
        "        self._state = 1\n"
        "    def _helper(self):\n"
        "        return self._state, sys._getframe(0), _s3.base_key, self.__class__\n"
    )
    findings = scan([("ggufship/bad.py", bad), ("ggufship/good.py", good)])
    flagged = {(f.path, f.name) for f in findings}
    assert flagged == {
        ("ggufship/bad.py", "_helper"),
        ("ggufship/bad.py", "oras._internal"),
        ("ggufship/bad.py", "_internal"),
        ("ggufship/bad.py", "_put_object"),
        ("ggufship/bad.py", "_private_thing"),
        ("ggufship/bad.py", "_execute"),
    }, findings

"""components/Dockerfile without a Docker engine: hadolint, every COPY source exists and is in the
build context (.dockerignore), the runtime stage has no compilers and runs as a non-root user, the
portable llama.cpp build flags, and the lock file is complete, hashed and current."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shlex
import tomllib

from packaging.requirements import Requirement

from tests.k8s_fixtures import ROOT, run_tool, tools_or_skip

DOCKERFILE = ROOT / "components" / "Dockerfile"
LOCK = ROOT / "components" / "requirements.lock"
COMPILERS = ("build-essential", "gcc", "g++", "clang", "cmake", "ninja-build", "make")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current:
            result[current].append((word, rest))
    return result


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_hadolint_clean() -> None:
    hadolint = tools_or_skip()["hadolint"]
    proc = run_tool([hadolint, "--format", "json", DOCKERFILE], check=False)
    assert json.loads(proc.stdout or "[]") == [], proc.stdout
    assert proc.returncode == 0


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    ignore = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]

    def included(rel: str) -> bool:
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or (pat == "*"):
                keep = negate
        return keep

    sources = []
    for word, rest in instructions():
        if word == "COPY" and "--from=" not in rest:
            sources += shlex.split(rest)[:-1]
    assert sources, "no COPY from the build context"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"components/Dockerfile copies {src}, which does not exist"
        assert included(src), f"{src} is excluded by .dockerignore"
    for needed in ("src/ggufship/runtime.py", "src/ggufship/cli/main.py"):
        assert included(needed), f".dockerignore drops {needed}"
    assert not included("tests/conftest.py")
    assert not included(".venv/bin/python")


def test_builder_builds_llama_cpp_portable() -> None:
    env = " ".join(rest for word, rest in stages()["builder"] if word == "ENV")
    for flag in (
        "-DGGML_NATIVE=OFF",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_CPU_ALL_VARIANTS=ON",
        "-DLLAVA_BUILD=OFF",
    ):
        assert flag in env, flag
    runs = " ".join(rest for word, rest in stages()["builder"] if word == "RUN")
    assert "--require-hashes -r /build/requirements.lock" in runs
    assert "download.pytorch.org/whl/cpu" in runs
    assert "gguf-py" in runs and "convert_hf_to_gguf.py" in runs
    assert "libggml-cpu-*.so" in runs


def test_runtime_stage_is_slim_and_non_root() -> None:
    runtime = stages()["runtime"]
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    installed = re.findall(r"apt-get install [^&]*", runs)
    for compiler in COMPILERS:
        assert not any(re.search(rf"(^|\s){re.escape(compiler)}(\s|$)", i) for i in installed), compiler
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert [w for w, _ in runtime].index("USER") > max(i for i, (w, _) in enumerate(runtime) if w == "RUN")
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "GGUFSHIP_GGML_BACKEND_DIR=/opt/ggufship/ggml-backends" in env
    assert "GGUFSHIP_LLAMA_CPP_DIR=" in env
    assert ("ENTRYPOINT", '["ggufship"]') in runtime


def test_chart_and_workflow_use_the_backend_dir_of_the_image() -> None:
    values = (ROOT / "charts" / "ggufship-api" / "values.yaml").read_text()
    assert "ggmlBackendDir: /opt/ggufship/ggml-backends" in values


def test_lock_pins_every_dependency_with_hashes() -> None:
    pins = lock_pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        if name == "llama-cpp-python":
            assert name not in pins  # compiled in the builder stage
            continue
        assert name in pins, f"{name} (pyproject.toml) is not in components/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {dep}"
        )
    assert pins["torch"] == "2.13.0+cpu"
    assert "gguf" not in pins  # llama.cpp's own gguf-py, not PyPI's
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 6)[-1])
    for entry in entries:
        if "==" in entry.split("\n")[0]:
            assert "--hash=sha256:" in entry, entry.split("\n")[0]


def test_lock_input_digest_matches_pyproject() -> None:
    """Offline currency check: the lock records the digest of the dependency list it was
    resolved from (components/lock.sh); any change to pyproject's dependencies needs a re-lock."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    digest = hashlib.sha256(("\n".join(deps) + "\n").encode()).hexdigest()
    m = re.search(r"^# input-sha256: ([0-9a-f]{64})$", LOCK.read_text(), re.M)
    assert m, "components/requirements.lock has no input-sha256 line"
    assert m.group(1) == digest, "components/requirements.lock is stale; run: bash components/lock.sh"

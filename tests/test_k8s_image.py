"""components/Dockerfile without a Docker engine: hadolint, every COPY source exists and is in the
build context (.dockerignore), the runtime stage has no compilers and runs as a non-root user, the
portable llama.cpp build flags, and the lock file is complete, hashed and current."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
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


def test_llama_wheel_stage_builds_llama_cpp_portable_from_the_pinned_sdist() -> None:
    wheel = stages()["llama-wheel-build"]
    env = " ".join(rest for word, rest in wheel if word == "ENV")
    for flag in (
        "-DGGML_NATIVE=OFF",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_CPU_ALL_VARIANTS=ON",
        "-DLLAVA_BUILD=OFF",
    ):
        assert flag in env, flag
    args = dict(rest.split("=", 1) for word, rest in wheel if word == "ARG" and "=" in rest)
    pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("llama-cpp-python==")
    )
    assert args["LLAMA_CPP_PYTHON_VERSION"] == pin.split("==")[1].split()[0]
    assert re.fullmatch(r"[0-9a-f]{64}", args["LLAMA_CPP_PYTHON_SHA256"])
    runs = " ".join(" ".join(rest.split()) for word, rest in wheel if word == "RUN")
    assert "--hash=sha256:${LLAMA_CPP_PYTHON_SHA256}" in runs
    assert "--no-binary :all: --require-hashes -r /build/llama-sdist.txt" in runs
    # Fixed source and build paths: __FILE__ and the CMake tree land in the binaries.
    assert "--no-build-isolation" in runs and "--config-settings=build-dir=/build/cmake" in runs
    assert "gguf-py" in runs and "convert_hf_to_gguf.py" in runs
    builder = " ".join(" ".join(rest.split()) for word, rest in stages()["builder"] if word == "RUN")
    assert "--only-binary :all: --require-hashes -r /build/binary.txt" in builder
    assert "libggml-cpu-*.so" in builder
    # ...but not the AMX variant, whose matrix multiply segfaults on K-quants (llama.cpp#20824)
    assert "! -name 'libggml-cpu-sapphirerapids.so'" in builder


def test_every_wheel_build_uses_the_locked_build_tools() -> None:
    runs = [" ".join(rest.split()) for word, rest in instructions() if word == "RUN"]
    wheel_builds = [m.group(0) for r in runs for m in re.finditer(r"\S*pip wheel [^&]*", r)]
    # llama-cpp-python, the sdist-only locked packages, gguf-py, ggufship
    assert len(wheel_builds) == 4, wheel_builds
    for cmd in wheel_builds:
        assert cmd.startswith("/opt/build/bin/pip wheel --no-deps --no-build-isolation"), cmd
    tools = " ".join(" ".join(rest.split()) for word, rest in stages()["build-tools"] if word == "RUN")
    assert "--require-hashes -r /build/build-requirements.lock" in tools
    pure = " ".join(" ".join(rest.split()) for word, rest in stages()["ggufship-wheel"] if word == "RUN")
    assert "--require-hashes -r /build/pure-build-requirements.lock" in pure
    assert "--no-binary :all: --require-hashes -r /build/sdist-only.txt" in pure
    for run in runs:  # nothing resolved from an index without hashes
        for m in re.finditer(r"pip (install|download|wheel)([^&]*)", run):
            cmd = m.group(2)
            assert "--no-deps" in cmd, run
            assert " -r " not in cmd or "--require-hashes" in cmd, run
    sdist_only = {rest for word, rest in instructions() if word == "ARG" and rest.startswith("SDIST_ONLY=")}
    assert len(sdist_only) == 1, sdist_only  # the same list where it is built and where it is skipped
    pins = lock_pins()
    for name in next(iter(sdist_only)).split("=", 1)[1].strip('"').split():
        assert name in pins, f"SDIST_ONLY names {name}, which components/requirements.lock does not pin"


@pytest.mark.parametrize("name", ["build-requirements", "pure-build-requirements"])
def test_build_locks_are_hashed_and_match_their_input(name: str) -> None:
    lock = (ROOT / "components" / f"{name}.lock").read_text()
    source = (ROOT / "components" / f"{name}.in").read_bytes()
    m = re.search(r"^# input-sha256: ([0-9a-f]{64})$", lock, re.M)
    assert m and m.group(1) == hashlib.sha256(source).hexdigest(), (
        f"components/{name}.lock is stale; run: bash components/lock-build.sh"
    )
    pins = {n.lower(): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)}
    wanted = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", source.decode(), re.M))
    expected = (
        {"scikit-build-core", "cmake", "ninja", "setuptools", "wheel"}
        if name == "build-requirements"
        else {"poetry-core"}
    )
    assert expected <= set(wanted)
    for package, version in wanted.items():
        assert pins.get(package.lower()) == version, package
    for entry in re.split(r"\n(?=[A-Za-z0-9])", lock):
        if "==" in entry.split("\n")[0]:
            assert "--hash=sha256:" in entry, entry.split("\n")[0]


def test_apt_packages_are_pinned_and_the_base_is_an_argument() -> None:
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    installs = re.findall(r"apt-get install -y --no-install-recommends ([^&]*)", runs)
    assert installs
    for install in installs:
        for package in install.split():
            assert re.fullmatch(r"[a-z0-9][a-z0-9+.\-]*=[0-9][A-Za-z0-9.+:~\-]*", package), (
                f"apt package {package!r} is not pinned to a version"
            )
    froms = [rest for word, rest in instructions() if word == "FROM"]
    # The pip-index slots (empty unless build-image.sh binds a local index directory) come first.
    slots = [f for f in froms if f.startswith("scratch AS pip-index-")]
    assert froms[: len(slots)] == slots and slots
    froms = froms[len(slots) :]
    assert froms[0] == "${BASE_IMAGE} AS base"
    names = {f.split(" AS ")[1] for f in froms if " AS " in f}
    for f in froms[1:]:
        source = f.split(" AS ")[0]
        assert source == "scratch" or source in names, f"FROM {f}: only the base comes from outside"
    stage_args = {s: [r for w, r in body if w == "ARG"] for s, body in stages().items()}
    for stage, body in stages().items():
        if any(w == "RUN" for w, _ in body):
            assert any(a.startswith("SOURCE_DATE_EPOCH=") for a in stage_args[stage]), stage


def test_base_package_set_is_locked_and_checked() -> None:
    """components/apt-packages.lock lists every Debian package of the base stage (dependencies
    included); the builder stage fails on any difference, and the base stage's own pins agree."""
    lock = {}
    for line in (ROOT / "components" / "apt-packages.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("=")
            assert version, f"apt-packages.lock: {line!r} is not package=version"
            lock[name.split(":")[0]] = version  # Multi-Arch: same packages carry :<arch>
    assert len(lock) > 50
    base_runs = " ".join(rest for word, rest in stages()["base"] if word == "RUN")
    pins = re.findall(r"([a-z0-9][a-z0-9+.\-]*)=([0-9][A-Za-z0-9.+:~\-]*)", base_runs)
    assert pins
    for name, version in pins:
        assert lock.get(name) == version, (
            f"{name}={version} (Dockerfile) vs {lock.get(name)} (apt-packages.lock)"
        )
    check = " ".join(rest for word, rest in stages()["builder"] if word == "RUN")
    copies = [rest for word, rest in stages()["builder"] if word == "COPY"]
    assert "components/apt-packages.lock /build/apt-packages.lock" in copies
    assert "/build/apt-packages.lock" in check and "diff -u /tmp/apt-lock.txt" in check


def test_no_index_or_mirror_host_in_the_build() -> None:
    """The machine's package sources come in at build time (secret pip.conf, mmdebstrap's
    sources file), never written into the repository's build files."""
    for path in (DOCKERFILE, ROOT / "components" / "base.Dockerfile", ROOT / "components" / "build-image.sh"):
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        hosts = re.findall(r"\b[a-z][a-z0-9+.-]*://[^\s\"']+", "\n".join(code))
        assert hosts == [], f"{path.name}: {hosts}"


def test_wheel_cache_key_covers_the_wheel_stages() -> None:
    """build-image.sh keys its llama-cpp-python wheel cache on the Dockerfile up to the marker:
    every stage the wheel depends on must come before it, the stages after it must not."""
    script = (ROOT / "components" / "build-image.sh").read_text()
    marker = "# === end of the llama-wheel stages"
    assert marker in script
    head, _, tail = DOCKERFILE.read_text().partition(marker)
    assert tail, "components/Dockerfile lost the llama-wheel marker"
    for stage in ("AS base", "AS build-tools", "AS llama-wheel-build", "FROM scratch AS llama-wheel"):
        assert stage in head, stage
    for stage in ("AS ggufship-wheel", "AS builder", "AS runtime"):
        assert stage in tail, stage
    assert '--build-context "llama-wheel=$wheel_dir"' in script
    assert '--timestamp "$SDE"' in script


def test_local_pip_indexes_are_bound_into_pip_runs_only() -> None:
    """Reproducibility: the machine's local index directories reach the build as the build
    contexts pip-index-N, bind-mounted into the RUNs that read the secret pip.conf; buildah's
    --volume would leave its mount points as empty directories in the base layer."""
    script = (ROOT / "components" / "build-image.sh").read_text()
    code = "\n".join(ln for ln in script.splitlines() if not ln.lstrip().startswith("#"))
    assert "--volume" not in code
    assert '"--build-context", f"pip-index-{slot}={directory}"' in script
    slots = sorted(
        int(m) for m in re.findall(r"^FROM scratch AS pip-index-(\d+)$", DOCKERFILE.read_text(), re.M)
    )
    assert slots == list(range(1, len(slots) + 1)) and f"SLOTS = {len(slots)}" in script
    pip_runs = [rest for word, rest in instructions() if word == "RUN" and "PIP_CONFIG_FILE=" in rest]
    assert pip_runs
    for run in pip_runs:
        for n in slots:
            assert f"--mount=type=bind,from=pip-index-{n},target=/mnt/pip-index-{n}" in run, run[:120]
    # The slot lines do not change what is built: the wheel cache key leaves them out.
    assert "grep -v 'pip-index'" in script


def test_build_script_is_valid_bash() -> None:
    for name in ("build-image.sh", "lock-build.sh"):
        proc = run_tool(["bash", "-n", ROOT / "components" / name], check=False)
        assert proc.returncode == 0, proc.stderr


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


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.skipif(
    os.environ.get("GGUFSHIP_IMAGE_BUILD") != "1",
    reason="builds the image (20-60 min on 2 cores): set GGUFSHIP_IMAGE_BUILD=1",
)
def test_image_builds_and_passes_the_smoke_checks(tmp_path: Path) -> None:
    """The documented command, end to end: buildah build, then components/smoke_image.py
    inside the image (read-only root, uid 10001, serve + openai client, KFP components,
    push + pull by digest). Needs root, buildah and mmdebstrap (installed if missing)."""
    cache = Path.home() / ".cache" / "ggufship" / "image"
    report = cache / "last-smoke.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run(
        ["bash", str(ROOT / "components" / "build-image.sh")], capture_output=True, text=True, timeout=7000
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(report.read_text())
    assert result["ok"], [s for s in result["steps"] if not s["ok"]]
    steps = {s["step"] for s in result["steps"]}
    assert {"export", "sign", "verify", "serve + openai client", "push + pull by digest"} <= steps
    assert sum(s.startswith("kfp ") for s in steps) == 4

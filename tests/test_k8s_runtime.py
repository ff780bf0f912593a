"""ggufship.runtime: the image's ggml CPU-variant loading (no-op when unset), and the CPU budget
(llama.cpp threads) from the container's cgroup limit and affinity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ggufship.errors import GgufshipError
from ggufship.runtime import (
    AMX_ISSUE,
    ENV_VAR,
    GgmlBackendError,
    amx_active,
    amx_in_build,
    amx_message,
    cpu_budget,
    load_ggml_backends,
)


def test_noop_without_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_ggml_backends() == 0
    monkeypatch.setenv(ENV_VAR, "")
    assert load_ggml_backends() == 0


def test_missing_directory_names_variable_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(GgmlBackendError) as info:
        load_ggml_backends()
    assert ENV_VAR in str(info.value)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, GgufshipError)
    assert info.value.exit_code == 79
    assert not missing.exists()


def test_directory_without_backends(tmp_path: Path) -> None:
    (tmp_path / "libllama.so").write_bytes(b"")
    with pytest.raises(GgmlBackendError, match=r"no ggml backend modules \(libggml-\*\.so\)") as info:
        load_ggml_backends(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_loads_from_llama_cpp_lib_dir() -> None:
    """With the local (non-DL) build the CPU backend is built in; loading the library directory
    must still succeed, register at least one device, and be idempotent. In the image the
    directory holds the libggml-cpu-<arch>.so variants and this is what makes models load."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if not any(lib_dir.glob("libggml-*.so")):
        pytest.skip(f"no libggml-*.so in {lib_dir}")
    devices = load_ggml_backends(lib_dir)
    assert devices >= 1
    assert load_ggml_backends(lib_dir) == devices


# ---------------------------------------------------------------- cpu_budget (n_threads)


def _cgroup_tree(root: Path, files: dict[str, str], own: str = "") -> Path:
    """A fake /sys/fs/cgroup under ``root`` and a /proc/self/cgroup naming ``own``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::/{own}\n")
    return proc


@pytest.mark.parametrize(
    ("files", "own", "affinity", "expected"),
    [
        # cgroup v2, container with limits.cpu: 2 on a 64-CPU node → 2, not os.cpu_count().
        ({"cpu.max": "200000 100000\n"}, "", 64, 2),
        # no limit: the affinity (cpuset) decides.
        ({"cpu.max": "max 100000\n"}, "", 6, 6),
        # fractional quota rounds down (1.5 CPUs → 1 thread), never below 1.
        ({"cpu.max": "150000 100000\n"}, "", 8, 1),
        ({"cpu.max": "20000 100000\n"}, "", 8, 1),
        # a cpuset smaller than the quota wins.
        ({"cpu.max": "800000 100000\n"}, "", 3, 3),
        # the limit sits on a parent of the process's own cgroup (pod-level cgroup).
        (
            {"kubepods/pod1/cpu.max": "400000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n"},
            "kubepods/pod1/ctr",
            32,
            4,
        ),
        # the smaller of a parent's and the own limit.
        ({"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "500000 100000\n"}, "a/b", 32, 3),
        # garbage in cpu.max is ignored (logged), not a crash and not 0 threads.
        ({"cpu.max": "lots\n"}, "", 4, 4),
        # cgroup v1: cfs quota / period; -1 is no limit.
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 16, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 16, 16),
    ],
)
def test_cpu_budget_from_cgroup(
    tmp_path: Path, files: dict[str, str], own: str | None, affinity: int, expected: int
) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = _cgroup_tree(root, files, own or "")
    if own is None:  # cgroup v1: no 0:: line
        proc.write_text("4:cpu,cpuacct:/\n")
    assert cpu_budget(cgroup_root=root, proc_self_cgroup=proc, affinity=affinity) == expected


def test_cpu_budget_defaults_to_this_process(tmp_path: Path) -> None:
    """Without fakes: at most the CPUs this process may run on (sched_getaffinity), at least 1."""
    budget = cpu_budget()
    assert 1 <= budget <= len(os.sched_getaffinity(0))
    # no cgroup files at all: the affinity
    assert cpu_budget(cgroup_root=tmp_path, proc_self_cgroup=tmp_path / "missing", affinity=5) == 5


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ("CPU : SSE3 = 1 | AVX2 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 | ", True),
        ("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | OPENMP = 1 | REPACK = 1 | ", False),
        ("CPU : AMX_INT8 = 0 | ", False),
        ("", False),
    ],
)
def test_amx_in_build_reads_llama_cpp_system_info(info: str, expected: bool) -> None:
    assert amx_in_build(info) is expected


def test_the_local_llama_cpp_build_has_no_amx_kernels() -> None:
    """scripts/setup.sh compiles llama-cpp-python with -mno-amx-*: on a CPU with AMX, -march=native
    alone would build ggml's AMX kernels, which segfault on K-quant models (AMX_ISSUE); on a CPU
    without AMX the line never says AMX_INT8 = 1 either way."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert not amx_active(), info
    assert AMX_ISSUE in amx_message("serve")

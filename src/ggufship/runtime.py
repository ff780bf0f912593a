"""Process set-up for llama.cpp in the container image: loading the ggml CPU backends.

The image builds llama.cpp portable (``-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON
-DGGML_CPU_ALL_VARIANTS=ON``): the CPU code is not linked into ``libggml`` but built once
per x86 micro-architecture as a loadable module (``libggml-cpu-haswell.so``,
``libggml-cpu-skylakex.so``, ...). Nothing loads them by itself from llama-cpp-python, and
without them the first model load fails with "no backends are loaded".
:func:`load_ggml_backends` calls ggml's ``ggml_backend_load_all_from_path`` on their
directory, which scores every variant against the running CPU and registers the best one.

Call it before the first model load (the server and the export do) — it is a no-op unless
``GGUFSHIP_GGML_BACKEND_DIR`` is set (or a directory is given), so a local ``-march=native``
build is unaffected.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from pathlib import Path

from ggufship.errors import GgufshipError

logger = logging.getLogger(__name__)

ENV_VAR = "GGUFSHIP_GGML_BACKEND_DIR"

_lock = threading.Lock()
_loaded: dict[Path, int] = {}


class GgmlBackendError(GgufshipError):
    """The ggml backend directory is missing, holds no backend, or loading registered no device."""

    exit_code = 79


def _libggml() -> ctypes.CDLL:
    """The ``libggml`` llama-cpp-python itself uses (same process-wide handle)."""
    import llama_cpp

    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    lib_dir = Path(override) if override else Path(llama_cpp.__file__).parent / "lib"
    path = lib_dir / "libggml.so"
    if not path.is_file():
        raise GgmlBackendError(f"{path}: libggml not found next to llama-cpp-python")
    # A wheel holds libggml.so and libggml.so.0 as two copies (no symlinks in wheels);
    # libllama loaded the one its DT_NEEDED names (soname libggml.so.0). Opening the other
    # file would map a second ggml whose backend registry llama.cpp never sees ("no
    # backends are loaded"), so take the loaded one by soname first.
    try:
        lib = ctypes.CDLL("libggml.so.0", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        lib = ctypes.CDLL(str(path))
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    return lib


def load_ggml_backends(directory: str | os.PathLike[str] | None = None) -> int:
    """Load the ggml backends in ``directory`` (default: ``$GGUFSHIP_GGML_BACKEND_DIR``).

    Returns the number of ggml devices registered afterwards; 0 when there is nothing to
    do (no directory given and the variable unset or empty). Idempotent per directory and
    thread-safe. Raises :class:`GgmlBackendError` naming the directory when it does not
    exist, holds no ``libggml-*.so``, or no device is registered after loading.
    """
    raw = os.fspath(directory) if directory is not None else os.environ.get(ENV_VAR, "")
    if not raw:
        return 0
    where = f"{ENV_VAR}={raw}" if directory is None else raw
    path = Path(raw).resolve()
    if not path.is_dir():
        raise GgmlBackendError(f"{where}: not a directory")
    modules = sorted(p.name for p in path.glob("libggml-*.so"))
    if not modules:
        raise GgmlBackendError(f"{where}: no ggml backend modules (libggml-*.so) in {path}")
    with _lock:
        if path in _loaded:
            return _loaded[path]
        lib = _libggml()
        lib.ggml_backend_load_all_from_path(str(path).encode())
        devices = int(lib.ggml_backend_dev_count())
        if devices == 0:
            raise GgmlBackendError(
                f"{where}: no ggml device registered after loading {', '.join(modules)} "
                "(none fits this CPU, or they were built for another llama.cpp)"
            )
        _loaded[path] = devices
    logger.info(
        "ggml backends from %s: %d module(s) present, %d device(s) registered", path, len(modules), devices
    )
    return devices


# ---------------------------------------------------------------- AMX

#: llama.cpp's AMX matrix multiply (``ggml_backend_amx_mul_mat``) segfaults on K-quant models on
#: some Sapphire Rapids-class CPUs; reported upstream, no fix at the pinned llama.cpp.
AMX_ISSUE = "https://github.com/ggml-org/llama.cpp/issues/20824"
_AMX_FLAG = re.compile(r"\bAMX_INT8 = 1\b")


def amx_in_build(system_info: str) -> bool:
    """Whether llama.cpp's system-info line (``llama_print_system_info``) says its CPU backend runs
    AMX kernels (``AMX_INT8 = 1``: built with AMX, and the CPU and kernel let it use them)."""
    return bool(_AMX_FLAG.search(system_info))


def amx_active() -> bool:
    """:func:`amx_in_build` for the llama.cpp loaded in this process (after the backends are)."""
    import llama_cpp

    return amx_in_build(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def amx_message(what: str) -> str:
    """The warning when :func:`amx_active`: what happens, and what to do about it."""
    return (
        f"{what}: this llama.cpp runs AMX kernels (AMX_INT8 = 1), which crash the process on "
        f"K-quant models (Q4_K_M, ...) on some CPUs ({AMX_ISSUE}). scripts/setup.sh and the "
        "image build llama.cpp without them; rebuild llama-cpp-python with "
        'CFLAGS/CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"'
    )


# ---------------------------------------------------------------- CPU budget

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _cgroup_v2_dir(cgroup_root: Path, proc_self_cgroup: Path) -> Path | None:
    """This process's cgroup v2 directory (the ``0::/path`` line of /proc/self/cgroup)."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
            return (cgroup_root / rel) if rel else cgroup_root
    return None


def _quota_v2(path: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``); None: no limit."""
    try:
        text = path.read_text().split()
    except OSError:
        return None
    if len(text) != 2 or text[0] == "max":
        if len(text) != 2:
            logger.warning("%s: unexpected content %r; ignored", path, " ".join(text))
        return None
    try:
        quota, period = int(text[0]), int(text[1])
    except ValueError:
        logger.warning("%s: unexpected content %r; ignored", path, " ".join(text))
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(cpu_dir: Path) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no limit)."""
    try:
        quota = int((cpu_dir / "cpu.cfs_quota_us").read_text().strip())
        period = int((cpu_dir / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_budget(
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """How many CPUs this process can really use: the smaller of its CPU affinity
    (``os.sched_getaffinity``, cpusets) and its cgroup CPU quota — cgroup v2 ``cpu.max`` of its
    own cgroup and every parent up to ``cgroup_root``, else cgroup v1 ``cpu.cfs_quota_us`` —
    rounded down, at least 1. A container with ``limits.cpu: 2`` on a 64-core node gets 2, where
    ``os.cpu_count()`` says 64 (and 64 llama.cpp threads on 2 CPUs' quota are throttled)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    limits: list[float] = []
    own = _cgroup_v2_dir(cgroup_root, proc_self_cgroup)
    if own is not None:
        level = own
        root = cgroup_root.resolve()
        while True:
            quota = _quota_v2(level / "cpu.max")
            if quota is not None:
                limits.append(quota)
            if level.resolve() == root or level.parent == level:
                break
            level = level.parent
    if not limits:
        for cpu_dir in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
            quota = _quota_v1(cpu_dir)
            if quota is not None:
                limits.append(quota)
                break
    budget = min([float(affinity), *limits])
    return max(1, int(budget))

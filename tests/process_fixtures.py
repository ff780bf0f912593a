"""Helpers that look at processes the tests started (through psutil)."""

from __future__ import annotations

from pathlib import Path

import psutil


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    return {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }


def processes_under(path: Path) -> list[int]:
    """PIDs of running processes whose command line mentions ``path`` (a state dir of a test)."""
    needle = str(path.resolve())
    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(needle in arg for arg in cmdline):
            pids.append(proc.pid)
    return pids

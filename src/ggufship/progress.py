"""Progress reporting: rich bars on a terminal, quiet log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)


class Task(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        return None


class Reporter:
    """Hands out progress tasks. ``enabled=None`` means: only when stderr is a TTY."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None

    @contextmanager
    def session(self) -> Iterator[Reporter]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as progress:
            self._progress = progress
            _ = DownloadColumn
            try:
                yield self
            finally:
                self._progress = None

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        logger.info("%s ...", description)
        if self._progress is None:
            yield _NullTask()
            return
        progress = self._progress
        task_id = progress.add_task(description, total=total)

        class _RichTask:
            def advance(self, amount: float = 1) -> None:
                progress.advance(task_id, amount)

        try:
            yield _RichTask()
        finally:
            if total is not None:
                progress.update(task_id, completed=total)

"""Progress display for long site work: cases done / total, failures, elapsed and ETA (rich, on stderr)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class CaseProgress:
    """A one-line progress bar: ``extracting ━━━━  37/100 cases  failed 2  0:00:41 eta 0:01:10``."""

    def __init__(self, description: str, total: int, console: Console | None = None):
        self.failed = 0
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("cases  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(file=sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, failed=0)

    def start(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        self._progress.stop()

    def advance(self, failed: bool = False, n: int = 1) -> None:
        if failed:
            self.failed += n
        self._progress.update(self._task, advance=n, failed=self.failed)


def case_progress(description: str, total: int) -> CaseProgress:
    return CaseProgress(description, total)

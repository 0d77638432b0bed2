"""Progress bars with images/s and one-line messages (rich), silent when asked to be."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "– img/s", style="cyan")


class Reporter:
    """Where long-running stages report progress, notes and warnings."""

    def __init__(self, quiet: bool = False, console: Console | None = None, max_warnings: int = 20):
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.max_warnings, self._warned = max_warnings, 0

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self._warned += 1
        if self.quiet:
            return
        if self._warned <= self.max_warnings:
            self.console.print(f"[yellow]warning:[/] {message}", highlight=False)
        elif self._warned == self.max_warnings + 1:
            self.console.print("[yellow]warning:[/] more problems; all are listed in the manifest")

    def task(self, description: str, total: int) -> _Task:
        return _Task(self, description, total)


class _Task:
    def __init__(self, reporter: Reporter, description: str, total: int):
        self._progress = None
        if not reporter.quiet:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=reporter.console)
            self._progress.start()
            self._id = self._progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""Progress bars with images/s and one-line messages (rich), silent when asked to be."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
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
    """Images/s for image work, items/s (heads, steps) for the rest."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "img")
        return Text(f"{speed:.1f} {unit}/s" if speed else f"– {unit}/s", style="cyan")


def make_console(stderr: bool = False) -> Console:
    """A console for featcache's output. Piped or logged (not a terminal, not a notebook), it never wraps:
    a run folder's path stays on one line, whole, for a script or a person to copy."""
    console = Console(stderr=stderr)
    if console.is_terminal or console.is_jupyter:
        return console
    return Console(stderr=stderr, width=10_000, soft_wrap=True)


class Reporter:
    """Where long-running stages report progress, notes and warnings.

    Tasks opened while another is open join the same live display (a study's overall bar above the
    current stage's), since a terminal can show only one live display at a time. A warning is shown once:
    the same words again (the same shift, met by every head) are not repeated."""

    def __init__(self, quiet: bool = False, console: Console | None = None, max_warnings: int = 20):
        self.quiet = quiet
        self.console = console or make_console(stderr=True)
        self._out = make_console()
        self.max_warnings, self._warned = max_warnings, 0
        self._said: set[str] = set()
        self._live: Progress | None = None
        self._open = 0

    def result(self, message: str) -> None:
        """A final line (what a command made, where it is): on standard output, also when quiet."""
        self._out.print(escape(message), highlight=False, soft_wrap=True)

    def info(self, message: str, once: bool = False) -> None:
        """A note on standard error, unless quiet; ``once``: not again when the same words were said (what a
        source is, met by every stage that reads it)."""
        if once:
            if message in self._said:
                return
            self._said.add(message)
        if not self.quiet:
            self.console.print(escape(message), highlight=False)

    def warn(self, message: str) -> None:
        """A problem the user must see: shown also when quiet (quiet drops progress and notes, not warnings),
        once."""
        if message in self._said:
            return
        self._said.add(message)
        self._warned += 1
        if self._warned <= self.max_warnings:
            self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
        elif self._warned == self.max_warnings + 1:
            self.console.print("[yellow]warning:[/] more problems; all are listed in the manifest")

    def task(self, description: str, total: int, unit: str = "img") -> _Task:
        """A progress bar counting ``unit`` (``img`` for images, ``head``, ``step`` …)."""
        return _Task(self, description, total, unit)

    def _display(self) -> Progress:
        if self._live is None:
            self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._live.start()
        self._open += 1
        return self._live

    def _closed(self) -> None:
        self._open -= 1
        if self._open == 0 and self._live is not None:
            self._live.stop()
            self._live = None


class _Task:
    def __init__(self, reporter: Reporter, description: str, total: int, unit: str = "img"):
        self._reporter, self._progress = reporter, None
        if not reporter.quiet:
            self._progress = reporter._display()
            self._id = self._progress.add_task(description, total=total, unit=unit)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._id)
            self._progress = None
            self._reporter._closed()

"""Progress reporting: a rich bar on stderr for people, nothing for scripts and pipes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Any: ...  # context manager yielding a Task


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NullProgress:
    """No output: for --json, tests and non-terminal stderr."""

    active = False  # callers skip work done only for the bar (such as counting the total first)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()


class RichProgress:
    """A transient rich bar with counts and rate on stderr."""

    active = True

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed or 0:,.0f}/s")

        columns = [
            TextColumn("{task.description}", markup=False),  # descriptions hold batch ids and names from outside
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        from hipbatch.text import plain

        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task_id = bar.add_task(plain(description), total=total)

            class _Task:
                def advance(self, n: int = 1) -> None:
                    bar.advance(task_id, n)

            yield _Task()


def default_progress(quiet: bool = False) -> Progress:
    if quiet or not sys.stderr.isatty():
        return NullProgress()
    return RichProgress()

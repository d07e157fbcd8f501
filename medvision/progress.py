"""One progress-bar helper (rich) for every long loop, so all commands look and behave alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, status=None)``; renders nothing when ``enabled`` is False.

    Bars go to stderr: stdout stays for results (JSON summaries) that scripts pipe or parse.
    """
    if not enabled:
        yield lambda n=1, **_: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance

"""A rich progress bar that can be switched off (library calls are silent by default)."""

from __future__ import annotations


class progress_bar:
    """A rich progress bar, or nothing; ``advance(n)`` moves it."""

    def __init__(self, show: bool, total: int, what: str):
        self.show, self.total, self.what = show, total, what

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.p.__enter__()
        task = self.p.add_task(self.what, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.show:
            self.p.__exit__(*exc)
        return False

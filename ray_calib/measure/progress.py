"""The rich progress bar of a measurement: prompts/s, tokens/s and ETA, drawn on stderr."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ray_calib.measure.run import Progress as RunProgress


class RichProgress(RunProgress):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._task = None
        self._started = 0.0
        self._prompts = 0
        self._tokens = 0

    def stage(self, text: str) -> None:
        self.stop()  # a new stage ends the previous bar
        self.console.print(text)

    def start(self, total_prompts: int, done_prompts: int) -> None:
        self._bar = Progress(TextColumn("measure"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), console=self.console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task("measure", total=total_prompts, completed=done_prompts, rates="")
        self._started = time.perf_counter()
        if done_prompts:
            self._bar.console.print(f"resuming: {done_prompts} prompts already measured")

    def advance(self, prompts: int, tokens: int) -> None:
        self._prompts += prompts
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rates = f"{self._prompts / elapsed:.2f} prompts/s {self._tokens / elapsed:.0f} tok/s"
        self._bar.update(self._task, advance=prompts, rates=rates)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

"""The one output layer of the CLI: stages and progress on stderr, results on stdout, library logs in a file.

    result(text)          stdout: what a script may parse (paths written, figures, tables)
    table(...)            stdout: an aligned table (rich on a terminal, plain text in a pipe)
    stage(i, n, name)     stderr: "(i/n name) detail" for each step of a long command
    note / warn           stderr: side remarks; `warn` is shown even with -q
    progress(...)         stderr: a rich bar with rate and ETA on a terminal; elsewhere (nohup, CI, a pipe)
                          a plain line every few seconds, so a long run still shows it is alive
    on_interrupt(fn)      what Ctrl-C / SIGTERM would leave behind and how to go on, said when it happens
    library_logs(...)     vLLM, Ray and transformers log into <run dir>/logs/<command>.log (engine child
                          processes too, through the environment they inherit); errors name that file

Verbosity is set once by the `-v`/`-q` options of `ray-calib`: -1 quiet (results and warnings only),
0 our stages and results, 1 library logs also on stderr, 2 the same at debug level.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import logging.config
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # rich is imported when a bar is drawn on a terminal
    from rich.progress import Progress, TaskID

# Loggers of the libraries we run; their records go to the command's log file, not to our streams.
LIBRARY_LOGGERS = (
    "vllm",
    "ray",
    "transformers",
    "torch",
    "neural_compressor",
    "huggingface_hub",
    "urllib3",
    "py.warnings",
)
PROGRESS_INTERVAL_S = 5.0  # seconds between plain progress lines when stderr is not a terminal

_state: dict = {"verbosity": 0, "log_file": None, "env": {}, "argv": [], "on_interrupt": None}


def set_verbosity(verbosity: int) -> None:
    """-q -> -1, nothing -> 0, -v -> 1, -vv -> 2; our own `logging` records follow it too.

    Called once per CLI invocation, so it also ends the log routing of an earlier command in this process.
    """
    end_library_logs()
    _state["verbosity"] = max(-1, min(verbosity, 2))
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[_state["verbosity"]]
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # no-op when a handler exists
    logging.getLogger().setLevel(level)
    _library_levels()
    os.environ["TRANSFORMERS_VERBOSITY"] = {-1: "error", 0: "error", 1: "info", 2: "debug"}[_state["verbosity"]]


def _library_levels() -> None:
    """Without -v the libraries' records stay out of our streams (they go to the log file when one is set)."""
    quiet = _state["verbosity"] < 1
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    # paramiko logs whole tracebacks for e.g. a port that is not sshd; our errors say it in one line
    logging.getLogger("paramiko").setLevel(logging.CRITICAL if quiet else logging.NOTSET)


def verbosity() -> int:
    return _state["verbosity"]


def log_file() -> Path | None:
    """The library log of the running command, if it started one (errors from the engine name it)."""
    return _state["log_file"]


# ---- interruption ---------------------------------------------------------------------------------------


def set_command_line(argv: Sequence[str], *, own_process: bool = False) -> None:
    """The arguments of the running `ray-calib` call, for the rerun command printed when it is interrupted;
    `own_process`: the process is this command alone (not a program calling the CLI in-process)."""
    _state["argv"], _state["on_interrupt"], _state["own_process"] = list(argv), None, own_process


def own_process() -> bool:
    """True when this process runs nothing but the `ray-calib` command (it may then re-exec itself)."""
    return bool(_state.get("own_process"))


def rerun_command(add: Sequence[str] = (), drop: Sequence[str] = ()) -> str:
    """`ray-calib ARGS` as it was called, without the flags in `drop` and with those in `add` appended."""
    args = [a for a in _state["argv"] if a not in drop]
    return shlex.join(["ray-calib", *args, *(a for a in add if a not in args)])


def on_interrupt(describe: Callable[[], str] | None) -> None:
    """Register what an interruption keeps and how to go on; called at interrupt time, so it can count."""
    _state["on_interrupt"] = describe


def interrupted_message() -> str:
    """One line for Ctrl-C / SIGTERM: what the command kept and the command that goes on from there."""
    describe = _state["on_interrupt"]
    if describe is not None:
        with contextlib.suppress(Exception):
            return f"interrupted: {describe()}"
    return (
        "interrupted; no output is left half-written (each is written under a temporary name and renamed "
        f"when complete); to start again: {rerun_command()}"
    )


# ---- text -----------------------------------------------------------------------------------------------


def result(text: str) -> None:
    click.echo(text)


def note(text: str) -> None:
    if _state["verbosity"] >= 0:
        click.echo(text, err=True)


def warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def stage(index: int, total: int, name: str, detail: str = "") -> None:
    """One step of a long command, e.g. "(2/5 preflight) versions, devices"; bars of the step before end."""
    if _state["verbosity"] >= 0:
        click.echo(f"({index}/{total} {name}) {detail}".rstrip(), err=True)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A result table on stdout: rich on a terminal, aligned plain text otherwise (cheap to import, greppable)."""
    cells = [[str(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        rich_table = Table(title=title, title_justify="left")
        for name in header:
            rich_table.add_column(name, overflow="fold")
        for row in cells:
            rich_table.add_row(*row)
        Console(highlight=False).print(rich_table)
        return
    header = [str(h) for h in header]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(header)]
    lines = [title]
    for index, row in enumerate([header] + cells):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    click.echo("\n".join(lines))


# ---- progress -------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Bar:
    """Counts work done; `advance(n, tokens=...)` adds n units and any named counts (shown as rates)."""

    def __init__(
        self, description: str, total: int, completed: int = 0, unit: str = "", interval: float = PROGRESS_INTERVAL_S
    ) -> None:
        self.description, self.total, self.completed, self.unit = description, total, completed, unit
        self.interval = interval
        self.counts: dict[str, int] = {}
        self._done_here = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._rich: Progress | None = None  # the rich Progress on a terminal
        self._task: TaskID | None = None
        self._plain = False  # plain lines every `interval` s (stderr is not a terminal)

    def rates(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        parts = [f"{self._done_here / elapsed:.2f} {self.unit or 'it'}/s"]
        parts += [f"{count / elapsed:.0f} {name}/s" for name, count in self.counts.items()]
        return " ".join(parts)

    def eta(self) -> str:
        elapsed = time.monotonic() - self._started
        if not self._done_here:
            return "?"
        return _duration((self.total - self.completed) * elapsed / self._done_here)

    def line(self) -> str:
        percent = 100 * self.completed / self.total if self.total else 100.0
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.description}: {self.completed}/{self.total}{unit} ({percent:.0f}%) {self.rates()} "
            f"elapsed {_duration(time.monotonic() - self._started)} ETA {self.eta()}"
        )

    def advance(self, n: int = 1, **counts: int) -> None:
        self.completed += n
        self._done_here += n
        for name, count in counts.items():
            self.counts[name] = self.counts.get(name, 0) + count
        if self._rich is not None and self._task is not None:  # set together
            self._rich.update(self._task, advance=n, rates=self.rates())
        elif self._plain and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            click.echo(self.line(), err=True)


@contextlib.contextmanager
def progress(
    description: str,
    total: int,
    *,
    completed: int = 0,
    unit: str = "",
    transient: bool = False,
    interval: float = PROGRESS_INTERVAL_S,
) -> Iterator[Bar]:
    """A progress bar on stderr for the `with` block; a plain line every `interval` s when not a terminal.

    `transient` bars (one of many, e.g. per shard) vanish when done and end without a closing line.
    """
    bar = Bar(description, total, completed, unit, interval)
    if _state["verbosity"] < 0:
        yield bar
        return
    if not sys.stderr.isatty():
        bar._plain = True
        try:
            yield bar
        finally:
            if not transient:
                click.echo(bar.line(), err=True)  # the last state, so a log always ends with the totals
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=transient) as rich_progress:
        bar._rich = rich_progress
        bar._task = rich_progress.add_task(description, total=total, completed=completed, rates="")
        yield bar


# ---- library logs ---------------------------------------------------------------------------------------


def _logging_config(path: Path) -> dict:
    level = "DEBUG" if _state["verbosity"] >= 2 else "INFO"
    handlers = ["file"] + (["stderr"] if _state["verbosity"] >= 1 else [])
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(path),
                "mode": "a",
                "formatter": "plain",
                "level": level,
            },
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "plain",
                "level": level,
            },
        },
        "loggers": {name: {"handlers": handlers, "level": level, "propagate": False} for name in LIBRARY_LOGGERS},
    }


def library_logs(run_dir: Path, command: str) -> Path:
    """Send vLLM, Ray and transformers logs of this command to <run dir>/logs/<command>.log.

    vLLM reads VLLM_LOGGING_CONFIG_PATH in every process it starts (engine core, workers), so the
    environment carries the routing to child processes; this process is configured at once.
    """
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command}.log"
    config = _logging_config(path)
    config_path = logs / f".{command}.logging.json"
    config_path.write_text(json.dumps(config, indent=1))
    env = {
        "VLLM_CONFIGURE_LOGGING": "1",
        "VLLM_LOGGING_CONFIG_PATH": str(config_path),
        "VLLM_LOGGING_LEVEL": config["handlers"]["file"]["level"],
        # never stdout, even where vLLM re-applies its own config (engine core, executors, workers without
        # the file): sys.__stderr__ writes to descriptor 2, which is the log file while an engine runs
        "VLLM_LOGGING_STREAM": "ext://sys.__stderr__",
        "RAY_CALIB_LOG_FILE": str(path),
    }
    _state["env"] = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # torch/transformers warnings are library noise too ("py.warnings")
    _state["log_file"] = path
    _streams_to_log(path)
    return path


def _streams_to_log(path: Path) -> None:
    """Point file descriptors 1 and 2 at the log file, keeping our own stdout/stderr on copies of them.

    What libraries write to the descriptors directly (C++ of Ray and torch, `*** SIGTERM received`,
    tracebacks of killed workers) and everything child processes (vLLM's engine core, its workers, the
    resource tracker) print lands in the log file; `result`, `note`, stages and progress still reach
    the user. Skipped when sys.stdout/sys.stderr are not the process's descriptors 1 and 2 (captured
    in-process, e.g. by pytest) or with -v (the libraries' output is wanted on stderr then).
    """
    if _state["verbosity"] >= 1 or _state.get("streams") is not None:
        return
    try:
        if sys.stdout.fileno() != 1 or sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _state["streams"] = (saved, sys.stdout, sys.stderr)
    sys.stdout = _Routed(_text_stream(saved[0], sys.stdout), sys.stdout)  # type: ignore[assignment]
    sys.stderr = _Routed(_text_stream(saved[1], sys.stderr), sys.stderr)  # type: ignore[assignment]


def _text_stream(fd: int, like) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    encoding = getattr(like, "encoding", None) or "utf-8"
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", line_buffering=True, write_through=True)


class _Routed:
    """sys.stdout/sys.stderr while an engine runs: our writes reach the user, logging handlers' writes the
    log file. Libraries (torch, vLLM) create their stream handlers on `sys.stderr` whenever they (re)configure
    logging; a record they emit arrives here from the `logging` module and goes to the log like the rest."""

    def __init__(self, ours: io.TextIOWrapper, log) -> None:
        self._ours, self._log = ours, log

    def write(self, text: str) -> int:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        target = self._log if caller == "logging" or caller.startswith("logging.") else self._ours
        return target.write(text)

    def flush(self) -> None:
        for stream in (self._ours, self._log):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer, ...: the user's stream
        return getattr(self._ours, name)


def _streams_back() -> None:
    streams = _state.get("streams")
    if streams is None:
        return
    (out_fd, err_fd), stdout, stderr = streams
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.close(out_fd)
    os.close(err_fd)
    sys.stdout, sys.stderr = stdout, stderr
    _state["streams"] = None


def end_library_logs() -> None:
    """Close the log file and give the environment back as it was (matters when the CLI runs in-process)."""
    _streams_back()
    logging.captureWarnings(False)
    for key, value in _state["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _state["env"] = {}
    if _state["log_file"] is not None:
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
            logger.propagate = True
        _library_levels()
    _state["log_file"] = None


def without_log_file_for_remote_workers() -> None:
    """Ray workers may run on nodes where the log config file does not exist (vLLM refuses to start then):
    they log to their own stderr (Ray's worker logs), at WARNING unless -v."""
    if os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None) is not None:
        os.environ["VLLM_LOGGING_LEVEL"] = "WARNING" if _state["verbosity"] < 1 else os.environ["VLLM_LOGGING_LEVEL"]


def reroute_library_logs() -> None:
    """Apply the log routing again after importing a library that installs its own handlers (Ray, vLLM)."""
    if _state["log_file"] is not None:
        logging.config.dictConfig(_logging_config(_state["log_file"]))

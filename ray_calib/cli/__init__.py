"""The `ray-calib` command line: a click group whose commands load on first use.

Each module here holds the thin click commands of one pipeline stage (parse flags, call the stage's
library functions, render the result); no stage package imports click. `COMMANDS` below maps a command
name to where it lives, so that `ray-calib --help` and `ray-calib unify` never import torch, vLLM or Ray.

    cluster          `cluster check`, `up`, `status`, `down`
    ladder           `ladder`: the hardware ladder, rung by rung
    measure          `measure`
    measurements     `unify`, `expand`, `inspect`
    quantize         `quantize` (and the k/v scale choice it makes with `infer.kv_choice`), `convert-bf16`
    scales           `scales`, `quant-config`
    infer            `infer`, `eval`
    report           `report`
    hub              `push`, `pull`
    data             `dataset-info`
    realmodel        `import-gguf`, `make-text-set`
    options          options several commands share, each defined once (and `--run-dir`)
    engine_options   the engine options `measure`, `infer` and `eval` share
    __main__         `python -m ray_calib.cli`, the same as the `ray-calib` script
(`make-tiny-model` and `make-calib-set` live in ray_calib.testing.)
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
import time

import click

from ray_calib import __version__, ui
from ray_calib.errors import ClusterError, EngineError, RayCalibError

# name -> "module:attribute", in pipeline order (the order `ray-calib --help` lists them); every command is
# registered here (and only here).
PIPELINE: dict[str, str] = {
    "cluster": "ray_calib.cli.cluster:cluster",
    "up": "ray_calib.cli.cluster:up",
    "status": "ray_calib.cli.cluster:status",
    "ladder": "ray_calib.cli.ladder:ladder",
    "down": "ray_calib.cli.cluster:down",
    "measure": "ray_calib.cli.measure:measure",
    "unify": "ray_calib.cli.measurements:unify",
    "inspect": "ray_calib.cli.measurements:inspect",
    "expand": "ray_calib.cli.measurements:expand",
    "quantize": "ray_calib.cli.quantize:quantize",
    "scales": "ray_calib.cli.scales:scales",
    "quant-config": "ray_calib.cli.scales:quant_config",
    "infer": "ray_calib.cli.infer:infer",
    "eval": "ray_calib.cli.infer:eval_command",
    "report": "ray_calib.cli.report:report",
    "push": "ray_calib.cli.hub:push",
    "pull": "ray_calib.cli.hub:pull",
}
TOOLS: dict[str, str] = {
    "convert-bf16": "ray_calib.cli.quantize:convert_bf16",
    "dataset-info": "ray_calib.cli.data:dataset_info",
    "import-gguf": "ray_calib.cli.realmodel:import_gguf",
    "make-text-set": "ray_calib.cli.realmodel:make_text_set",
    # test/demo support (ray_calib.testing): a tiny model and calibration set to try the pipeline without a download
    "make-tiny-model": "ray_calib.testing.commands:make_tiny_model",
    "make-calib-set": "ray_calib.testing.commands:make_calib_set",
}
COMMANDS: dict[str, str] = {**PIPELINE, **TOOLS}
# Old command names: still accepted (with a warning from the command itself) for one release, not listed.
DEPRECATED_COMMANDS: dict[str, str] = {
    "configs": "ray_calib.cli.scales:configs",
    "config": "ray_calib.cli.cluster:config",
}

# OS errors a user causes (full disk, no permission) -> the fix. Everything else is a bug: traceback.
_OS_ERRORS = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EACCES: "check the permissions of that path or choose another one",
    errno.EROFS: "that file system is read-only; choose another path",
    errno.EEXIST: "a part of that path is an existing file; choose another path",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Two sections, each in pipeline order: the run's stages, then the tools around them."""
        for title, names in (("Pipeline", PIPELINE), ("Tools", TOOLS)):
            commands = [(name, self.get_command(ctx, name)) for name in names]
            rows = [(name, command.get_short_help_str(formatter.width - 30)) for name, command in commands if command]
            with formatter.section(title):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name) or DEPRECATED_COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ray-calib")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Also show vLLM/Ray/transformers logs on stderr (-vv: debug level). They always go to "
    "<run dir>/logs/<command>.log.",
)
@click.option("-q", "--quiet", is_flag=True, help="Only results and warnings: no stages, no progress.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Calibrate very large LLMs for FP8 inference across a Ray cluster.

    \b
    A run across a cluster (devices.conf: docs in the README):
      ray-calib up --conf devices.conf
      ray-calib measure -m MODEL -d DATA --conf devices.conf --tp 16 --fp8-kv
      ray-calib unify --to-tp 8
      ray-calib quantize --low-cpu-mem
      ray-calib infer
      ray-calib eval --baseline MODEL --min-agreement 0.9
      ray-calib push --repo ORG/NAME

    \b
    On one box, no cluster (a tiny model to try it):
      ray-calib make-tiny-model --arch llama --out tiny
      ray-calib make-calib-set --format pile --out calib.jsonl
      ray-calib measure -m tiny -d calib.jsonl --tp 1 && ray-calib unify --to-tp 1
      ray-calib quantize && ray-calib infer

    \b
    Results go to stdout, stages and progress to stderr, library logs to <run dir>/logs/<command>.log.
    """
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other: give one")
    ui.set_verbosity(-1 if quiet else verbose)
    if ctx.invoked_subcommand is None:  # `ray-calib` alone: the help, as `ray-calib --help`
        click.echo(ctx.get_help())


def _log_hint(err: RayCalibError) -> str:
    """Errors from the engine or the cluster name the log file their library wrote, when there is one."""
    path = ui.log_file()
    if path is None or not isinstance(err, (EngineError, ClusterError)):
        return ""
    return f" (vLLM/Ray log: {path})"


def _terminated(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C: every `finally` runs (engines shut down, temporaries removed)."""
    _received["signal"] = signum
    raise KeyboardInterrupt


_received: dict[str, int] = {}


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (from /proc: no psutil on the light install)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


def end_children(older: set[int], grace_s: float = 5.0) -> int:
    """End every process this command started and that still runs (engine core, workers, resource
    tracker), not those in `older` (running before it, e.g. when the CLI runs inside another program):
    SIGTERM, then SIGKILL after `grace_s`. Returns how many there were."""
    children = [p for p in descendants(os.getpid()) if p not in older]
    send(children, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and set(descendants(os.getpid())) & set(children):
        time.sleep(0.1)
    send(set(descendants(os.getpid())) & set(children), signal.SIGKILL)
    return len(children)


def send(pids, signum: int) -> None:
    """`signum` to each of `pids` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and a non-zero exit code."""
    debug = os.environ.get("RAY_CALIB_DEBUG") == "1"
    ui.set_command_line(sys.argv[1:] if argv is None else argv, own_process=argv is None)
    _received.clear()
    older = set(descendants(os.getpid()))
    main_thread = _main_thread()
    handlers = (signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _terminated)) if main_thread else None
    try:
        code = cli.main(args=argv, prog_name="ray-calib", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        ended = end_children(older)
        kept = ui.interrupted_message()
        plural = "es" if ended != 1 else ""
        click.echo(f"{kept} ({ended} child process{plural} ended)" if ended else kept, err=True)
        code = 128 + _received.get("signal", signal.SIGINT)
    except click.ClickException as err:
        err.show()
        code = err.exit_code
    except RayCalibError as err:
        if debug:
            raise
        click.echo(f"error: {err}{_log_hint(err)}", err=True)
        code = err.exit_code
    except OSError as err:
        if debug or err.errno not in _OS_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        click.echo(f"error: {where}{err.strerror}; {_OS_ERRORS[err.errno]}", err=True)
        code = 1
    finally:
        ui.end_library_logs()
        if handlers is not None:
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
    sys.exit(code or 0)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()

"""The CLI's shared vocabulary: every option that more than one command takes is defined here, once.

    -t/--tp             tensor-parallel size an engine runs at       measure, infer, eval
    -n/--num-samples    calibration prompts / texts to use          measure, dataset-info, make-calib-set, make-text-set
    -l/--least-tokens   Pile text: drop shorter samples, truncate    measure, dataset-info
    -o/--out            where the command writes                    every command that writes
    --conf              devices.conf                                cluster check, up, status, down, measure, infer
    --scale-method      INC scale method                            scales, quantize
    --device            gaudi2 | gaudi3 | cuda | cpu (plus auto and hpu where the device can be detected)

Old spellings keep working for one release as hidden aliases: `Command` rewrites them to the new
spelling before click parses and prints a one-line deprecation warning on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.rundir import DEFAULT_RUN_DIR

# Target devices, one vocabulary: the Gaudi generation matters for FP8 scales, so it is named.
DEVICE_NAMES = ("gaudi2", "gaudi3", "cuda", "cpu")
# Where an engine runs, the device can also be detected ("auto") or be a Gaudi of the detected generation.
RUNTIME_DEVICE_NAMES = ("auto", "hpu", *DEVICE_NAMES)


def deprecated(old: str, new: str) -> None:
    click.echo(f"warning: {old} is deprecated and will be removed in the next release; use {new}", err=True)


class Command(click.Command):
    """A click command that accepts the old spellings in `renamed` (old -> new) with a warning."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rewrite_renamed(args, self.renamed))


def rewrite_renamed(args: list[str], renamed: dict[str, str]) -> list[str]:
    """`--limit 8` -> `--num-samples 8` (also `--limit=8`, `-l8`), warning once per old spelling."""
    out: list[str] = []
    warned: set[str] = set()
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        old = _old_spelling(arg, renamed)
        if old is None:
            out.append(arg)
            continue
        new = renamed[old]
        if old not in warned:
            deprecated(old, new)
            warned.add(old)
        if new in args or any(a.startswith(f"{new}=") for a in args if new.startswith("--")):
            raise click.UsageError(f"{old} is the old spelling of {new}: give one of them")
        out.append(new + arg[len(old) :] if arg.startswith(f"{old}=") or not old.startswith("--") else new)
    return out


def _old_spelling(arg: str, renamed: dict[str, str]) -> str | None:
    for old in renamed:
        if arg == old or (old.startswith("--") and arg.startswith(f"{old}=")):
            return old
        if not old.startswith("--") and len(old) == 2 and arg.startswith(old) and len(arg) > 2:
            return old  # a short option with its value attached, e.g. -l128
    return None


def command(name: str | None = None, *, renamed: dict[str, str] | None = None, **kwargs):
    """`@click.command` with hidden, warned aliases for renamed options."""
    return click.command(name, cls=Command, renamed=renamed, **kwargs)


# ---- the shared options --------------------------------------------------------------------------------

_dir = click.Path(file_okay=False, path_type=Path)
_file = click.Path(dir_okay=False, path_type=Path)


def tp_option(help: str, **kwargs):
    return click.option("-t", "--tp", "tp_size", type=click.IntRange(min=1), default=None, help=help, **kwargs)


def num_samples_option(default: int, help: str = "Prompts (samples) to use."):
    return click.option(
        "-n", "--num-samples", "num_samples", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def least_tokens_option(help: str = "Pile text: drop samples shorter than this many tokens, truncate longer ones."):
    return click.option("-l", "--least-tokens", "least_tokens", type=click.IntRange(min=1), default=None, help=help)


def out_option(help: str, *, file: bool = False, required: bool = False, dest: str = "out"):
    return click.option("-o", "--out", dest, type=_file if file else _dir, required=required, default=None, help=help)


def conf_option(help: str = "devices.conf [default: $RAY_CALIB_DEVICES_CONF or ./devices.conf]."):
    return click.option("--conf", "conf", type=_file, default=None, help=help)


def scale_method_option(help: str):
    return click.option("--scale-method", "scale_method", default=None, help=help)


def engine_timeout_option(help: str = "Seconds for vLLM to start and for one step (large models load for long)."):
    """--timeout: vLLM's engine start and step timeouts (VLLM_ENGINE_READY_TIMEOUT_S and friends)."""
    return click.option("--timeout", "timeout_s", type=int, default=1800, show_default=True, help=help)


def device_option(help: str, *, runtime: bool = False):
    """--device: the target names everywhere; `runtime` commands also take auto (detect) and hpu."""
    if runtime:
        return click.option(
            "--device", type=click.Choice(RUNTIME_DEVICE_NAMES), default="auto", show_default=True, help=help
        )
    return click.option("--device", type=click.Choice(DEVICE_NAMES), default=None, help=help)


override_run_option = click.option(
    "--override-run",
    is_flag=True,
    help="Accept flags that contradict the run's record (run.json); the change is recorded there.",
)


run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="RAY_CALIB_RUN_DIR",
    help=f"Directory of this calibration run [env RAY_CALIB_RUN_DIR; default ./{DEFAULT_RUN_DIR}].",
)

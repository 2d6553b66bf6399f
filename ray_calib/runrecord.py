"""`<run dir>/run.json`: the run's facts, each decided once by the stage that decides it.

A run is a chain of commands; each used to re-decide the run's facts (FP8 KV, the TP to serve at, the
model) with its own default. This module owns the one record they share:

    {"format": 1, "run_id": "...", "created": "...",
     "facts": {"fp8_kv": {"value": true, "by": "measure"}, ...},
     "overrides": [{"fact": "fp8_kv", "was": true, "now": false, "by": "quantize", "flag": "--no-fp8-kv"}],
     "rank_files": [{"file": "measure/<stem>.json", "run_id": "...", "sha256": "..."}, ...]}

`measure` starts a record (a new run id) when it writes the run's own measure/; later stages add their facts
with `record_facts`. A flag goes through `decide`: absent, it takes the recorded value; equal, it is
confirmed; different, it is refused (one line: the flag, the recorded value, how to start a new run) unless
the command's `--override-run` says the change is wanted, which is then recorded in `overrides`.
`run_measurements` answers "which unified directory" once: the run's target TP, else the only one.
Writes are atomic (`atomic.write_json`): a reader sees the old record or the new one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import ConfigError
from ray_calib.rundir import RunDir

RECORD_FILE = "run.json"
FORMAT = 1
OVERRIDE_FLAG = "--override-run"
_UNIFIED_RE = re.compile(r"^unified-tp(\d+)$")


class RunFactError(ConfigError):
    """A flag or a file that contradicts the run's record."""


@dataclass
class RunRecord:
    root: Path
    run_id: str
    created: str = ""
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    rank_files: list[dict[str, str]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root / RECORD_FILE

    def value(self, fact: str) -> Any:
        """The recorded value of `fact`, None when no stage decided it."""
        entry = self.facts.get(fact)
        return entry["value"] if entry else None

    def by(self, fact: str) -> str | None:
        entry = self.facts.get(fact)
        return entry.get("by") if entry else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "created": self.created,
            "facts": self.facts,
            "overrides": self.overrides,
            "rank_files": self.rank_files,
        }


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_record(root: str | Path) -> RunRecord | None:
    """The record of the run in `root`, None when no stage wrote one (a measurement made elsewhere)."""
    path = Path(root) / RECORD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise RunFactError(f"{path}: not a readable run record ({err})", fix=_NEW_RUN) from None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or data.get("format") != FORMAT:
        raise RunFactError(f"{path}: not a run record of format {FORMAT}", fix=_NEW_RUN)
    return RunRecord(
        root=Path(root),
        run_id=data["run_id"],
        created=str(data.get("created", "")),
        facts=dict(data.get("facts") or {}),
        overrides=list(data.get("overrides") or []),
        rank_files=list(data.get("rank_files") or []),
    )


def start_record(root: Path, run_id: str, stage: str, facts: dict[str, Any], rank_files: list[Path]) -> RunRecord:
    """A new run: the record `stage` (measure) decided, replacing any older one in `root`."""
    record = RunRecord(root=Path(root), run_id=run_id, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    record.facts = {k: {"value": v, "by": stage} for k, v in facts.items() if v is not None}
    record.rank_files = [
        {
            "file": p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p),
            "run_id": run_id,
            "sha256": file_digest(p),
        }
        for p in rank_files
    ]
    atomic.write_json(record.path, record.to_json())
    return record


def record_facts(record: RunRecord, stage: str, facts: dict[str, Any], overrides: list[dict] | None = None) -> None:
    """Add what `stage` decided (values that `decide` accepted) and the overrides it was given, atomically."""
    current = read_record(record.root) or record  # another command may have added facts meanwhile
    for key, value in facts.items():
        if value is not None:
            current.facts[key] = {"value": value, "by": stage}
    current.overrides += overrides or []
    atomic.write_json(current.path, current.to_json())
    record.facts, record.overrides = current.facts, current.overrides


@dataclass
class Decision:
    """The value a command uses for one fact, and the override to record when it contradicts the run."""

    value: Any
    override: dict[str, Any] | None = None


def decide(record: RunRecord | None, fact: str, given: Any, *, flag: str, stage: str, override: bool) -> Decision:
    """`given` (a flag's value, None when not passed) against the run's record of `fact`."""
    recorded = record.value(fact) if record else None
    if given is None or recorded is None or given == recorded:
        return Decision(recorded if given is None else given)
    assert record is not None
    if not override:
        raise RunFactError(
            f"{flag}: {record.path} records {fact} = {_show(recorded)} (decided by {record.by(fact)}), "
            f"the flag says {_show(given)}",
            fix=f"drop {flag}, start a new run (--run-dir NEW_DIR, or `measure --force`), "
            f"or pass {OVERRIDE_FLAG} to change it for this run (recorded)",
        )
    return Decision(given, {"fact": fact, "was": recorded, "now": given, "by": stage, "flag": flag})


def _show(value: Any) -> str:
    return json.dumps(value)


_NEW_RUN = "delete it and start a new run (`ray-calib measure --force`), or pass another --run-dir"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_digest(model: str | Path) -> str | None:
    """sha256 of the model's config.json (a revision pins a hub model; a local directory has only this)."""
    path = Path(model) / "config.json"
    return file_digest(path) if path.is_file() else None


def unified_dirs(run: RunDir) -> dict[int, Path]:
    """TP -> unified-tp<TP> directory of the run."""
    found = ((m, p) for p in run.root.glob("unified-tp*") if (m := _UNIFIED_RE.match(p.name)) and p.is_dir())
    return dict(sorted((int(m[1]), p) for m, p in found))


def run_measurements(run: RunDir) -> Path | None:
    """The unified directory later stages read: the run's target TP (run.json), else the only one.

    None when nothing was unified (the stages then read measure/). Several unified directories and no
    recorded target are refused: a leftover of a one-off `unify --to-tp` must never win silently.
    """
    found = unified_dirs(run)
    record = read_record(run.root)
    target = record.value("target_tp") if record else None
    if target is not None:
        path = run.unified(int(target))
        if not path.is_dir():
            raise RunFactError(
                f"{record.path if record else run.root} records target TP {target}, but {path} is missing",
                fix=f"run `ray-calib unify --run-dir {run.root} --to-tp {target}`, or pass --measurements DIR",
            )
        return path
    if len(found) > 1:
        names = ", ".join(p.name for p in found.values())
        raise RunFactError(
            f"{run.root} holds several unified directories ({names}) and no recorded target TP",
            fix="pass --measurements DIR, or re-run `ray-calib unify --to-tp M --set-target` for the one to serve",
        )
    return next(iter(found.values()), None)


def check_rank_files(record: RunRecord, directory: Path, meta_run_id: str | None, files: list[Path]) -> None:
    """Rank files in `directory` that are not this run's (another run id, unlisted or changed) are refused.

    The meta names the run the set belongs to; the record lists the files measure wrote with their sha256,
    so a file of another run of the same model and TP copied in beside them is caught too.
    """
    if meta_run_id is not None and meta_run_id != record.run_id:
        raise RunFactError(
            f"{directory}: its rank files belong to run {meta_run_id}, {record.path} is run {record.run_id}",
            fix="use the run directory those files were measured in (--run-dir), or measure again in this one",
        )
    listed = {entry["file"]: entry for entry in record.rank_files}
    try:
        prefix = Path(directory).absolute().relative_to(record.root.absolute()).as_posix()
    except ValueError:
        return  # a directory outside the run: only its meta's run id says whose it is
    if not any(name.startswith(prefix + "/") for name in listed):
        return  # no stage of this run listed files here (e.g. a unified directory)
    for path in files:
        entry = listed.get(f"{prefix}/{path.name}")
        if entry is None:
            raise RunFactError(
                f"{path}: not a rank file of run {record.run_id} (not listed in {record.path})",
                fix="move it out of the directory; it belongs to another run",
            )
        if file_digest(path) != entry["sha256"]:
            raise RunFactError(
                f"{path}: its sha256 differs from the one {record.path} lists for run {record.run_id}",
                fix="restore the run's own file (re-copy it from the node that measured), or measure again",
            )


def checkpoint_digest(directory: Path) -> str | None:
    """Identity of a checkpoint directory without hashing its weights: config.json, the quantize manifest
    (it holds every shard's checksum) and each file's name and size. None when there is no directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
            if path.name in ("config.json", ".ray-calib-quantize.json"):
                digest.update(path.read_bytes())
    return digest.hexdigest()

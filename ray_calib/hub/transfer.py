"""`push` a calibration run to a Hugging Face hub repo and `pull` one back, with one-line errors.

The endpoint is `HF_ENDPOINT` (read at call time, so tests and the demo can point at a local
server); the token comes from the usual places (`HF_TOKEN`, the `hf auth login` cache) and is never
printed. Every failure of the hub client becomes a `HubError` naming the repo and endpoint and the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ray_calib import atomic
from ray_calib.errors import ConfigError, HubError, OutputExistsError
from ray_calib.hub.card import build_card
from ray_calib.hub.verify import verification
from ray_calib.inc.quant_config import read_config, write_configs
from ray_calib.rundir import RunDir

DEFAULT_ENDPOINT = "https://huggingface.co"
_SKIP = [".*", "**/.*", "*.tmp", "**/*.tmp", "**/__pycache__/**"]
# this machine's own records, not results: vLLM/Ray logs (large, with host names), served completions, the ladder
_LOCAL = ["logs/**", "infer/**", "ladder/**"]
# large: pushed only with the checkpoint (both FP8 checkpoints: CPU/CUDA and vllm-gaudi; GPTQ inputs)
_CHECKPOINT = ["fp8/**", "fp8-gaudi2/**", "fp8-gaudi3/**", "**/hessians*.safetensors"]


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit_url: str
    files: list[str]
    num_bytes: int


@dataclass
class PullResult:
    repo_id: str
    directory: Path
    files: list[str]
    configs_rewritten: list[str] = field(default_factory=list)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def push(
    run: RunDir, repo_id: str, *, private: bool = False, include_checkpoint: bool = False, verify: bool = True
) -> PushResult:
    """Upload the run directory (model card as README.md; the FP8 checkpoint only when asked).

    `verify`: refuse a run whose checkpoint has no passed `eval` (`hub.verify`); False says so in the card.
    """
    from huggingface_hub import HfApi, get_token

    check_repo_id(repo_id)
    ignore = _SKIP + _LOCAL + ([] if include_checkpoint else _CHECKPOINT)
    files = _files_to_push(run, ignore + ["README.md"])  # the card is written below, from these files
    verified = verification(run, verify=verify)
    token = get_token()
    if not token:
        raise HubError(
            f"no Hugging Face token found for {endpoint()}",
            fix="set HF_TOKEN or run `hf auth login` (a token with write access).",
        )
    api = HfApi(endpoint=endpoint(), token=token)
    with hub_errors(repo_id, writing=True):
        card = build_card(run, repo_id, include_checkpoint=include_checkpoint, verified=verified)
        atomic.write_text(run.root / "README.md", card)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        large = getattr(api, "upload_large_folder", None)  # huggingface_hub < 2: the resumable path
        if include_checkpoint and large is not None:
            large(repo_id=repo_id, folder_path=str(run.root), repo_type="model", ignore_patterns=ignore)
            commit_url = f"{url}/tree/main"
        else:  # huggingface_hub >= 2: upload_folder is itself streamed, multi-commit and resumable (Xet)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(run.root),
                repo_type="model",
                ignore_patterns=ignore,
                commit_message="ray-calib push",
            )
            commit_url = info.commit_url
    sizes = sum((run.root / f).stat().st_size for f in files)
    return PushResult(
        repo_id=repo_id, url=str(url), commit_url=commit_url, files=["README.md", *files], num_bytes=sizes
    )


def _files_to_push(run: RunDir, ignore: list[str]) -> list[str]:
    """The files the upload will send: the hub client's own filter over the same patterns."""
    from huggingface_hub.utils import filter_repo_objects

    if not run.root.is_dir():
        raise ConfigError(
            f"{run.root}: run directory not found", fix="pass --run-dir (the directory `measure` wrote to)."
        )
    every = sorted(p.relative_to(run.root).as_posix() for p in run.root.rglob("*") if p.is_file())
    files = list(filter_repo_objects(every, ignore_patterns=ignore))
    if not files:
        raise ConfigError(
            f"{run.root}: nothing to push (no measurement, configs or report yet)",
            fix="run `ray-calib measure` first, or pass the right --run-dir.",
        )
    return files


def pull(repo_id: str, to: Path, *, revision: str | None = None, force: bool = False) -> PullResult:
    """Download the repo into `to` (a run directory), files moved in only once all arrived.

    QUANT_CONFIGs in `configs/` get their `dump_stats_path` pointed at the pulled directories, so
    `QUANT_CONFIG=<to>/configs/...` works on this machine as it did on the one that measured.
    """
    from huggingface_hub import get_token, snapshot_download

    check_repo_id(repo_id)
    to = Path(to).absolute()
    to.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".ray-calib-pull-", dir=to))
    try:
        with hub_errors(repo_id, writing=False):
            snapshot_download(
                repo_id, revision=revision, local_dir=str(stage), endpoint=endpoint(), token=get_token() or None
            )
        files = sorted(
            p.relative_to(stage).as_posix()
            for p in stage.rglob("*")
            if p.is_file() and not p.relative_to(stage).parts[0].startswith(".")
        )
        clashes = [rel for rel in files if (to / rel).exists()]
        if clashes and not force:
            raise OutputExistsError(
                f"{to}: already holds {clashes[0]} ({len(clashes)} of the {len(files)} files of {repo_id})",
                fix="pull into another --to, or pass --force to replace them.",
            )
        for rel in files:
            (to / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, to / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return PullResult(repo_id=repo_id, directory=to, files=files, configs_rewritten=_rebase_configs(to))


def _rebase_configs(run_root: Path) -> list[str]:
    """Point each config's dump_stats_path at `<run_root>/<its directory name>/<prefix>` when that exists."""
    rewritten = []
    for path in sorted((run_root / "configs").glob("*.json")):
        try:
            config = read_config(path)
        except ConfigError:
            continue
        old = config.get("dump_stats_path")
        if not old:
            continue
        stats = PurePosixPath(old)
        new = run_root / stats.parent.name / stats.name
        if new.parent.is_dir() and str(new) != old:
            write_configs(path.parent, {path.name: {**config, "dump_stats_path": str(new)}})
            rewritten.append(path.name)
    return rewritten


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(
            f"--repo {repo_id!r} is not a valid repo id ({str(err).splitlines()[0]})",
            fix="use ORG/NAME with letters, digits, '-', '_' or '.'",
        ) from None


@contextlib.contextmanager
def hub_errors(repo_id: str, *, writing: bool) -> Iterator[None]:
    """Map the hub client's exceptions to one-line `HubError`s (no traceback, no token in the text)."""
    from huggingface_hub import errors

    where = endpoint()
    try:
        yield
    except HubError:
        raise
    except Exception as err:  # classified below; anything unknown is re-raised untouched
        cause = _root_cause(
            err,
            (
                *_network_errors(),
                errors.RepositoryNotFoundError,
                errors.RevisionNotFoundError,
                errors.HfHubHTTPError,
                errors.LocalTokenNotFoundError,
                ConnectionError,
            ),
        )
        if cause is None:
            raise
        raise _translate(cause, repo_id, where, writing) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    from huggingface_hub import errors

    kinds: list[type[BaseException]] = [errors.OfflineModeIsEnabled]
    for module, names in (
        ("httpx2", ("ConnectError", "TimeoutException")),
        ("httpx", ("ConnectError", "TimeoutException")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        with contextlib.suppress(ImportError):
            loaded = importlib.import_module(module)
            kinds += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(kinds)


def _root_cause(err: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _translate(cause: BaseException, repo_id: str, where: str, writing: bool) -> HubError:
    from huggingface_hub import errors

    if isinstance(cause, _network_errors()):
        return HubError(
            f"cannot reach the hub at {where} ({type(cause).__name__})",
            fix="check the network or proxy, or set HF_ENDPOINT to a reachable hub.",
        )
    if isinstance(cause, ConnectionError):  # raised by hf_xet (Rust) for its storage protocol
        return HubError(
            f"the Xet upload to {where} failed ({str(cause).splitlines()[0]})",
            fix="retry (uploads resume); against the ray-calib Hub stand-in set HF_HUB_DISABLE_XET=1.",
        )
    if isinstance(cause, errors.LocalTokenNotFoundError):
        return HubError(f"no Hugging Face token found for {where}", fix="set HF_TOKEN or run `hf auth login`.")
    if isinstance(cause, errors.RevisionNotFoundError):
        return HubError(f"{repo_id}: revision not found at {where}", fix="check --revision (a branch, tag or commit).")
    if isinstance(cause, errors.RepositoryNotFoundError):
        return HubError(
            f"repo {repo_id} not found at {where} (or it is private and this token cannot see it)",
            fix="check --repo (ORG/NAME) and that your token has access to it.",
        )
    status = getattr(getattr(cause, "response", None), "status_code", None)
    message = (getattr(cause, "server_message", None) or str(cause)).strip().splitlines()[0]
    if status == 401:
        return HubError(f"{where} rejected the token ({message})", fix="set a valid HF_TOKEN or run `hf auth login`.")
    if status == 403:
        action = "write to" if writing else "read"
        return HubError(
            f"the token may not {action} {repo_id} at {where} ({message})",
            fix="use a token with write access to that namespace, or another --repo.",
        )
    return HubError(
        f"{where}: {repo_id}: HTTP {status}: {message}",
        fix="retry; if it persists, check the hub status page or HF_ENDPOINT.",
    )

"""The model card (README.md of the hub repo): what was measured, how, and how well the FP8 model does.

Everything comes from the run directory: the meta sidecar of the measurement (via
`ray_calib.inc.read_meta`), the QUANT_CONFIGs (scale method), the unified directories
(serving TP) and `eval.json` (read defensively: any dict of figures). Missing pieces show as "n/a".
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_calib.errors import ConfigError
from ray_calib.inc import RunMeta, read_meta
from ray_calib.inc.quant_config import read_config
from ray_calib.rundir import RunDir

_NA = "n/a"


def build_card(run: RunDir, repo_id: str, *, include_checkpoint: bool = False, verified: str = "") -> str:
    meta = read_meta(run.measure) if run.measure.is_dir() else None
    meta = meta or RunMeta()
    rows = [
        ("Model", meta.model),
        ("Revision", meta.revision),
        ("Device", meta.device_type),
        ("Dataset", meta.dataset),
        ("Dataset hash", (meta.dataset_hash or "")[:16] or None),
        ("Samples", meta.num_samples),
        ("Tokens", meta.num_tokens),
        ("Measured at TP / EP", f"{meta.tp_size or _NA} / {meta.ep_size or _NA}"),
        ("Unified to TP", ", ".join(str(tp) for tp in _unified_tps(run)) or None),
        ("Observer", meta.observer),
        ("FP8 KV cache measured", meta.fp8_kv),
        ("Scale method", ", ".join(_scale_methods(run)) or None),
        ("Tool versions", ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())) or None),
    ]
    lines = [
        _front_matter(meta),
        f"# {repo_id.split('/')[-1]}: FP8 calibration by ray-calib",
        "",
        "Static FP8 calibration results (INC max-abs measurement files, unified sets, QUANT_CONFIGs"
        " and reports) produced by ray-calib.",
        "",
        "## Calibration",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {_NA if value is None else value} |" for name, value in rows]
    lines += [
        "",
        "## Evaluation (FP8 vs BF16)",
        "",
        *([verified, ""] if verified else []),
        *_eval_section(run.eval_json),
        "",
        "## Files",
        "",
        *_file_section(run, include_checkpoint),
        "",
        "## Use",
        "",
        "```bash",
        f"ray-calib pull --repo {repo_id} --to calib-run",
        "ray-calib infer --run-dir calib-run",
        "```",
        "",
    ]
    return "\n".join(lines)


def _front_matter(meta: RunMeta) -> str:
    tags = ["fp8", "calibration", "ray-calib", "intel-neural-compressor"]
    base = f"base_model: {meta.model}\n" if meta.model and "/" in meta.model and not meta.model.startswith("/") else ""
    return "---\n" + base + "tags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"


def _unified_tps(run: RunDir) -> list[int]:
    tps = []
    for path in run.root.glob("unified-tp*"):
        suffix = path.name[len("unified-tp") :]
        if path.is_dir() and suffix.isdigit():
            tps.append(int(suffix))
    return sorted(tps)


def _scale_methods(run: RunDir) -> list[str]:
    methods = set()
    for path in sorted(run.configs.glob("*.json")):
        try:
            config = read_config(path)
        except ConfigError:
            continue
        if str(config.get("mode", "")).upper() == "QUANTIZE" and config.get("scale_method"):
            methods.add(str(config["scale_method"]))
    return sorted(methods)


def eval_figures(path: Path) -> list[tuple[str, float]] | None:
    """(figure, value) pairs from eval.json: top-level numbers and one level of nested dicts of numbers."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    figures = []
    for key, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # JSON's numbers
            figures.append((key, float(value)))
        elif isinstance(value, dict):
            figures += [
                (f"{key} ({sub})", float(v))
                for sub, v in value.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
    return figures


def _eval_section(path: Path) -> list[str]:
    figures = eval_figures(path) if path.exists() else None
    if not figures:
        return ["No evaluation was recorded for this run (`ray-calib eval` writes eval.json)."]
    table = ["| Figure | Value |", "|---|---|", *(f"| {name} | {_fmt(value)} |" for name, value in figures)]
    return table + _audit_lines(path)


def _audit_lines(path: Path) -> list[str]:
    """The engine's scale audit per variant (eval.json `scale_audit`): scales in use of those carried."""
    try:
        audits = json.loads(path.read_text()).get("scale_audit") or {}
        lines = []
        for variant, found in audits.items():
            counts = ", ".join(
                f"{c['in_use']}/{c['carried']} {kind}" for kind, c in found["counts"].items() if c["carried"]
            )
            lines.append(f"- {variant}: {counts} scales in use, {len(found['dropped'])} dropped")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []
    return ["", "Scale audit (read back from the vLLM engine that loaded the checkpoint):", "", *lines] if lines else []


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value == int(value) and abs(value) >= 1 else f"{value:.4g}"


def _file_section(run: RunDir, include_checkpoint: bool) -> list[str]:
    described = {
        "measure": "INC range files per rank at the measured TP, meta sidecar, coverage.json",
        "configs": "QUANT_CONFIG files (measure / quantize, one-node variants)",
        "scales": "INC scale files",
        "report": "PNG plots and summary.txt",
        "fp8": "the FP8 checkpoint for CPU/CUDA (compressed-tensors, E4M3FN range 448): `vllm serve fp8`",
        "fp8-gaudi2": "the FP8 checkpoint for Gaudi2 (compressed-tensors for vllm-gaudi, E4M3FNUZ range 240, "
        "`fp8_dtype_flavor: float8_e4m3fnuz`, INC's HW-aligned scales): `vllm serve fp8-gaudi2` on Gaudi2",
        "fp8-gaudi3": "the FP8 checkpoint for Gaudi3 (compressed-tensors for vllm-gaudi, range 448, INC's "
        "HW-aligned scales): `vllm serve fp8-gaudi3` on Gaudi3",
        "eval.json": "FP8 vs BF16 fidelity figures and the verdict push checked",
        "run.json": "the run's facts, each decided once by the stage that decided it",
    }
    lines = []
    for path in sorted(run.root.iterdir()) if run.root.is_dir() else []:
        if path.name.startswith(".") or path.name in ("README.md", "logs", "infer", "ladder"):  # not pushed
            continue
        if path.name in CHECKPOINTS and not include_checkpoint:
            continue
        text = described.get(path.name) or (
            "range files re-sharded to TP " + path.name[len("unified-tp") :]
            if path.name.startswith("unified-tp")
            else ""
        )
        lines.append(f"- `{path.name}{'/' if path.is_dir() else ''}`" + (f": {text}" if text else ""))
    if include_checkpoint and any((run.root / name).is_dir() for name in ("fp8-gaudi2", "fp8-gaudi3")):
        lines += ["", GAUDI_NOTE]
    return lines or ["(empty run directory)"]


CHECKPOINTS = ("fp8", "fp8-gaudi2", "fp8-gaudi3")
GAUDI_NOTE = (
    "The Gaudi checkpoints differ from the CPU/CUDA one in range and scales, not in format: load each only on its "
    "device. MoE input scales are written per expert (gate and up equal, as vLLM requires), and vllm-gaudi keeps "
    "only the maximum of a layer's gate/up input scales over the experts a rank holds: that maximum clips no "
    "expert, and under expert parallelism each rank gets the maximum over its own experts, never more than one "
    "layer-wide value would give. Down-projection input scales stay per expert."
)

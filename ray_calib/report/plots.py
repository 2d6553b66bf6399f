"""The report's PNGs (matplotlib, Agg): KV cache ranges across runs, expert coverage, layer ranges."""

from __future__ import annotations

import io
from pathlib import Path

from ray_calib import atomic
from ray_calib.inc import ExpertCoverage
from ray_calib.report.extract import LayerRanges, RunFigures, layer_of

_KIND_TITLES = {
    "K": "K written to the cache",
    "V": "V written to the cache",
    "latent": "MLA latent cache [kv_c | k_pe]",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic.write_bytes(path, buffer.getvalue())


def _integer_layers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def kv_plot(runs: dict[str, RunFigures], path: Path) -> Path | None:
    """One panel per cache kind; one line per run (the seeds' ablation over datasets and sample lengths)."""
    kinds = [k for k in _KIND_TITLES if any(k in fig.kv for fig in runs.values())]
    if not kinds:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 3.2 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        for label, run in runs.items():
            if kind in run.kv:
                layers = sorted(run.kv[kind])
                ax.plot(layers, [run.kv[kind][layer] for layer in layers], marker="o", markersize=3, label=label)
        ax.set_title(f"Per-layer maxabs: {_KIND_TITLES[kind]}")
        _integer_layers(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("maxabs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def coverage_plot(coverage: ExpertCoverage, title: str, path: Path) -> Path | None:
    """Layer x expert token counts (log colour); experts that saw no token are crossed out in red."""
    import numpy as np
    from matplotlib.colors import LogNorm

    modules = sorted(coverage.experts, key=lambda m: (layer_of(m) is None, layer_of(m) or 0, m))
    if not modules:
        return None
    width = max(len(c) for c in coverage.experts.values())
    counts = np.zeros((len(modules), width))
    for row, module in enumerate(modules):
        counts[row, : len(coverage.experts[module])] = coverage.experts[module]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(4 + width * 0.35, 16), min(1.5 + len(modules) * 0.32, 16)))
    shown = np.ma.masked_equal(counts, 0)
    image = ax.imshow(
        shown,
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        norm=LogNorm(vmin=max(1, shown.min()), vmax=max(2, counts.max())),
    )
    zero_rows, zero_cols = np.nonzero(counts == 0)
    if len(zero_rows):
        ax.scatter(zero_cols, zero_rows, marker="x", color="red", s=max(8, 400 / max(width, len(modules))))
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels([f"layer {layer_of(m)}" if layer_of(m) is not None else m for m in modules], fontsize=8)
    ax.set_xlabel("routed expert")
    never = f"red x: never hit ({len(zero_rows)} experts)" if len(zero_rows) else "every expert saw tokens"
    ax.set_title(f"Tokens per expert: {title}\n{coverage.num_tokens} tokens; {never}")
    fig.colorbar(image, ax=ax, label="tokens routed")
    return _save(fig, path)


def ranges_plot(runs: dict[str, RunFigures], path: Path) -> Path | None:
    """Activation and weight maxabs per layer: the max line, and a band down to the smallest module max."""
    if not any(run.weights.high for run in runs.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    for ax, attr, what in ((axes[0], "activations", "linear-layer inputs"), (axes[1], "weights", "weights")):
        for label, run in runs.items():
            ranges: LayerRanges = getattr(run, attr)
            layers = sorted(ranges.high)
            if not layers:
                continue
            (line,) = ax.plot(layers, [ranges.high[layer] for layer in layers], marker="o", markersize=3, label=label)
            ax.fill_between(
                layers,
                [ranges.low[layer] for layer in layers],
                [ranges.high[layer] for layer in layers],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_yscale("log")
        ax.set_title(f"Per-layer maxabs of {what} (line: max over modules, band: down to the smallest)")
        ax.set_ylabel("maxabs")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[1].set_xlabel("layer")
    _integer_layers(axes[1])
    fig.tight_layout()
    return _save(fig, path)

"""FP8 MLA latent cache on the tiny DeepSeek: calibrated latent scales against scale 1.0, and the real
DeepSeek-R1 latent ranges (the Gaudi fixture) that say what a real MLA model would need.

    python benchmarks/bench_mla_kv.py [--calib 32] [--texts 16] [--fixture ../shared/fixtures/inc-ds-r1-0528-g2-tp16]

vLLM's CPU MLA kernel has no FP8 cache, so no engine here can score the choice `quantize --kv-scales auto`
makes for dense models. This emulates the cache instead, exactly where MLA keeps it: each layer's latent
(kv_a_layernorm output, 512 wide) and its rope key (64), the 576 values vLLM's MLA cache holds per token,
are rounded through float8_e4m3fn with one scale per layer on every write (HF transformers' DeepSeek-V3
attention, whose cache `update` sees exactly those two tensors; every read comes from that cache, so this
is an upper bound on what an FP8 cache costs: vLLM's prefill uses the fresh latent). Scales:

    1.0            what vLLM runs without calibrated scales
    calibrated     `ray-calib measure --fp8-kv`'s latent range (`latent_cache_k`) onto 448 x 0.6 (the
                   CPU/CUDA k/v rule, `convert/scale_choice.py`), and onto the full 448

Prints mean KL and top-1 agreement against the BF16 cache on held-out text for each, the share of latent
values that land below FP8's normal range (2^-6 after scaling: subnormal or zero), and the DeepSeek-R1
fixture's latent maxabs per layer against the FP8 ranges of Gaudi2 (240) and Gaudi3/CUDA (448).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ray_calib
from ray_calib.data import texts
from ray_calib.inc.runset import MeasurementSet

FP8_MAX = 448.0
NORMAL_MIN = 2.0**-6  # float8_e4m3fn's smallest normal
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "inc-ds-r1-0528-g2-tp16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=32, help="Calibration passages for measure.")
    parser.add_argument("--texts", type=int, default=16, help="Held-out passages scored.")
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-mla-kv-") as work:
        run(Path(work), args)


def run(work: Path, args) -> None:
    model, calib = work / "tiny-deepseek-v3", work / "calib.jsonl"
    cli = [sys.executable, "-m", "ray_calib.cli"]
    subprocess.run([*cli, "make-tiny-model", "--arch", "deepseek_v3", "--out", model], check=True)
    texts.write_jsonl(texts.sample("pydoc", "calibration", args.calib), calib)
    measure = [*cli, "measure", "-m", model, "-d", calib, "-t", "1", "--fp8-kv", "-o", work / "measure"]
    subprocess.run([*measure, "--max-new-tokens", "1", "-l", "32"], check=True, capture_output=True)
    nodes = MeasurementSet.discover(work / "measure").read(0).nodes
    latent = {int(k.split(".")[2]): v["inputs"][0][0][0] for k, v in nodes.items() if k.endswith("latent_cache_k")}
    print(f"tiny DeepSeek latent maxabs per layer (measure --fp8-kv): {[round(v, 2) for v in latent.values()]}")

    scores = score(model, latent, texts.sample("pydoc", "heldout", args.texts))
    print(f"\nFP8 latent cache vs BF16 cache, {args.texts} held-out pydoc passages:")
    print(f"  {'scale':<30} {'mean KL':>9} {'top-1':>6} {'below 2^-6':>11}")
    for name, (kl, top1, small) in scores.items():
        print(f"  {name:<30} {kl:9.2e} {top1:6.3f} {small:10.1%}")
    fixture(args.fixture)


def score(model: Path, latent: dict[int, float], passages: list[str]) -> dict[str, tuple[float, float, float]]:
    """{scale rule: (mean KL, top-1 agreement, share of cached values below FP8's normal range)}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    ids = [tokenizer(p, return_tensors="pt").input_ids[:, :256] for p in passages]
    rules = {
        "1.0 (no calibrated scales)": {layer: 1.0 for layer in latent},
        "calibrated, maxabs -> 448 x 0.6": {layer: m / (FP8_MAX * 0.6) for layer, m in latent.items()},
        "calibrated, maxabs -> 448": {layer: m / FP8_MAX for layer, m in latent.items()},
    }

    class FP8Cache(DynamicCache):
        """Every latent write rounded through FP8 at its layer's scale; counts values under the normal range."""

        def __init__(self, scales: dict[int, float]) -> None:
            super().__init__()
            self.scales, self.small, self.total = scales, 0, 0

        def update(self, key, value, layer_idx, *args, **kwargs):
            scale = self.scales.get(layer_idx, 1.0)
            rounded = []
            for x in (key, value):
                scaled = x.float() / scale
                self.small += int((scaled.abs() < NORMAL_MIN).sum())
                self.total += scaled.numel()
                rounded.append((scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype))
            return super().update(*rounded, layer_idx, *args, **kwargs)

    def logprobs(cache_for) -> tuple[list, float]:
        out, small, total = [], 0, 0
        with torch.no_grad():
            for x in ids:
                cache = cache_for()
                out.append(torch.log_softmax(hf(x, past_key_values=cache, use_cache=True).logits[0].float(), -1))
                small, total = small + getattr(cache, "small", 0), total + getattr(cache, "total", 1)
        return out, small / total

    reference, _ = logprobs(DynamicCache)
    results = {}
    for name, scales in rules.items():
        got, small = logprobs(lambda scales=scales: FP8Cache(scales))
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(reference, got)])
        top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, got)])
        results[name] = (float(kl.mean()), float(top1.mean()), small)
    return results


def fixture(directory: Path) -> None:
    """DeepSeek-R1's latent maxabs per layer from the real Gaudi TP-16 measurement, against the FP8 ranges."""
    if not directory.is_dir():
        print(f"\n(no DeepSeek-R1 fixture at {directory}: the real latent ranges are not shown)")
        return
    measurement = MeasurementSet.discover(directory)
    per_layer: dict[str, float] = {}
    for rank in range(measurement.world_size):
        for name, node in measurement.read(rank, check_npz=False).nodes.items():
            if name.endswith("latent_cache_k"):
                per_layer[name] = max(per_layer.get(name, 0.0), node["inputs"][0][0][0])
    values = sorted(per_layer.values())
    print(
        f"\nDeepSeek-R1 (Gaudi2, TP 16, {len(values)} layers) latent maxabs: min {values[0]:.2f}, median "
        f"{values[len(values) // 2]:.2f}, max {values[-1]:.2f}; at scale 1.0 the largest uses "
        f"{values[-1] / 240:.0%} of Gaudi2's 240 and {values[-1] / FP8_MAX:.0%} of 448 (no clipping), and a "
        f"calibrated scale (maxabs -> 448 x 0.6) moves the normal-range floor from {NORMAL_MIN:.4f} down to "
        f"{NORMAL_MIN * values[len(values) // 2] / (FP8_MAX * 0.6):.5f} for the median layer"
    )


if __name__ == "__main__":
    main()

"""The peer: llm-compressor's static FP8 (W8A8 per tensor) on the same calibration texts as ray-calib.

Runs in llm-compressor's own virtual environment (bench_quality.py builds it), never imports ray_calib.
    python _llmcompressor_peer.py MODEL CALIB_JSONL OUT --num-samples 64 --max-tokens 256 [--fp8-kv]
                                  [--recipe rtn|gptq|sq0.5+gptq|sq0.8+gptq]
Prints one JSON line {"seconds": wall time of tokenize + oneshot + save}.

Recipes, each with llm-compressor's documented defaults: `rtn` QuantizationModifier(scheme="FP8") (round to
nearest), `gptq` GPTQModifier(scheme="FP8"), `sqS+gptq` SmoothQuantModifier(smoothing_strength=S) then that
GPTQ. GPTQ records `actorder: static` for its per-tensor weights, which vLLM 0.32's compressed-tensors
(< 0.17.1) refuses to load; for per-tensor weights it is metadata only (the rounding order is already baked
into the weights), so it is cleared in the saved config.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("out")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--fp8-kv", action="store_true")
    parser.add_argument("--recipe", default="rtn", help="rtn | gptq | sq<strength>+gptq")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    with open(args.calibration) as file:
        texts = [json.loads(line)["text"] for line in file if line.strip()][: args.num_samples]
    encoded = [tokenizer(t, truncation=True, max_length=args.max_tokens) for t in texts]
    dataset = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in encoded], "attention_mask": [e["attention_mask"] for e in encoded]}
    )
    kv_scheme = (
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        if args.fp8_kv
        else None
    )
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe(args.recipe, kv_scheme),
        max_seq_length=args.max_tokens,
        num_calibration_samples=len(texts),
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    clear_actorder(args.out)
    print(json.dumps({"seconds": time.perf_counter() - started, "samples": len(texts)}))


def recipe(name: str, kv_scheme: dict | None) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    common = {"targets": "Linear", "scheme": "FP8", "ignore": ["lm_head"], "kv_cache_scheme": kv_scheme}
    if name == "rtn":
        return [QuantizationModifier(**common)]
    if name == "gptq":
        return [GPTQModifier(**common)]
    if name.startswith("sq") and name.endswith("+gptq"):
        strength = float(name[2:].removesuffix("+gptq"))
        return [SmoothQuantModifier(smoothing_strength=strength), GPTQModifier(**common)]
    raise SystemExit(f"unknown recipe {name!r}: rtn, gptq or sq<strength>+gptq")


def clear_actorder(out: str) -> None:
    """actorder -> None in every config group (see the module docstring)."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    for group in config.get("quantization_config", {}).get("config_groups", {}).values():
        if isinstance(group.get("weights"), dict) and group["weights"].get("actorder") is not None:
            group["weights"]["actorder"] = None
    path.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()

"""The peer: llm-compressor's static FP8 (W8A8 per tensor) on the same calibration texts as ray-calib.

Runs in llm-compressor's own virtual environment (bench_quality.py builds it), never imports ray_calib.
    python _llmcompressor_peer.py MODEL CALIB_JSONL OUT --num-samples 64 --max-tokens 256 [--fp8-kv]
Prints one JSON line {"seconds": wall time of tokenize + oneshot + save}.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("out")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--fp8-kv", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
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
    recipe = QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"], kv_cache_scheme=kv_scheme)
    oneshot(
        model=model, dataset=dataset, recipe=recipe, max_seq_length=args.max_tokens, num_calibration_samples=len(texts)
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": time.perf_counter() - started, "samples": len(texts)}))


if __name__ == "__main__":
    main()

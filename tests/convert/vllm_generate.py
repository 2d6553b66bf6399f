"""Run in a subprocess by test_vllm_load: load MODEL in vLLM on CPU, greedy-generate, print the tokens.

Also prints, as JSON, the top-5 next-token logprobs at every position of a fixed prompt (prefill only), so
a test can compare an FP8 checkpoint with its BF16 source position by position.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = [0, 17, 230, 51, 9, 77]
# a fixed 48-token prompt (ids below the tiny models' 1024-token vocabulary) scored position by position
SCORED = [(7 + 37 * i) % 1000 + 3 for i in range(48)]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, tp, kv_dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llm = LLM(
        model,
        tensor_parallel_size=tp,
        kv_cache_dtype=kv_dtype,
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=4,
        skip_tokenizer_init=True,
    )
    print("QUANT", json.dumps(llm.model_config.quantization), flush=True)  # e.g. "compressed-tensors"; null: BF16
    outputs = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=6, temperature=0))
    print("TOKENS", json.dumps(list(outputs[0].outputs[0].token_ids)), flush=True)
    scored = llm.generate(
        [{"prompt_token_ids": SCORED}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)
    )
    top = [
        {str(token): float(lp.logprob) for token, lp in position.items()} for position in scored[0].prompt_logprobs[1:]
    ]  # position 0 has no prediction
    print("TOP", json.dumps(top), flush=True)

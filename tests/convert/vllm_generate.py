"""Run in a subprocess by test_vllm_load: load MODEL in vLLM on CPU, greedy-generate, print the tokens."""

import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, tp, kv_dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llm = LLM(model, tensor_parallel_size=tp, kv_cache_dtype=kv_dtype, enforce_eager=True, max_model_len=128,
              max_num_seqs=4, skip_tokenizer_init=True)
    outputs = llm.generate([{"prompt_token_ids": [0, 17, 230, 51, 9, 77]}], SamplingParams(max_tokens=6, temperature=0))
    print("TOKENS", list(outputs[0].outputs[0].token_ids), flush=True)

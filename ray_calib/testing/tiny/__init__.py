"""Tiny real models and synthetic calibration sets, so tests and the demo run vLLM without downloads.

corpus      deterministic pseudo-English text
tokenizer   byte-level BPE trained on that text, with a chat template
model       random-weight DeepSeek-V3 (MLA + MoE) and Llama configs vLLM on CPU accepts
calibset    calibration files in every format `ray_calib.data` reads
"""

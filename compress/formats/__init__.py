"""Storage only: how quantized weights become files that transformers and vLLM load."""

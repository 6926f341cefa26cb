"""Quantization methods: one file each, `quantize_weights(...)` in, integers and scales out."""

"""Quantization methods, one file each; `compress/quant/table.py` lists them."""

"""Pruning methods, one file each; `compress/prune/table.py` lists them."""

"""Pruning methods: unstructured and N:M (magnitude, Wanda, SparseGPT) and structured."""

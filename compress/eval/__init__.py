"""Measurements: quality, size, speed and memory, each a small module."""

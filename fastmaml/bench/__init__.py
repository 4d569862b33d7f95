"""Benchmarks: ``python -m fastmaml.bench`` (the main job)."""

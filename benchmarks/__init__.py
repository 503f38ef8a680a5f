"""Benchmarks of udafast's hot-path ops: one shared harness, one small module per hot path.

Run ``python -m benchmarks`` (or ``python benchmarks/run.py``) from the repository root; see
benchmarks/README.md.
"""

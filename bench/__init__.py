"""Benchmarks for trio-background. Run ``python -m bench`` (``--quick`` for CI).

See ``docs/performance.rst`` for what each scenario measures and the latest results.
"""

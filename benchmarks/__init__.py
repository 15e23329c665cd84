"""Benchmarks: scripts that print ratios measured side by side in one run (``python -m benchmarks.<name>``).

They are not part of the installed package; run them from the repository root.
"""

"""Benchmarks: ``dat-ds bench <name>``; each writes ``bench/<name>.json`` (+ a PNG) and prints a table.

Ratios are measured side by side in one run: absolute times on shared machines are noise.
"""

"""Configs, benchmarks and the report script: importable from the checkout root, never installed."""

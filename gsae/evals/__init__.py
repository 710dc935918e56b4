"""Benchmarks: pure functions that measure an SAE (no Lightning import), one file per benchmark."""

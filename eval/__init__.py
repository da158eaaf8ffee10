"""Evaluation: benchmark runners, answer parsing and synthetic benchmarks."""

"""Benchmark runners, one per publisher format. ``build_benchmark(name, path, ...)`` picks one by name."""

from __future__ import annotations

from typing import Any

from vila_hd.eval.benchmarks.base import Benchmark, FormatError, Sample
from vila_hd.eval.benchmarks.hrbench import HRBench
from vila_hd.eval.benchmarks.jsonl import FourKProBenchmark, JsonlBenchmark
from vila_hd.eval.benchmarks.mme_realworld import MMERealWorld
from vila_hd.eval.benchmarks.realworldqa import RealWorldQA
from vila_hd.eval.benchmarks.textvqa import TextVQA
from vila_hd.eval.benchmarks.vstar import VStarBench

BENCHMARKS: dict[str, type[Benchmark]] = {
    "vstar": VStarBench,
    "hrbench": HRBench,
    "mme-realworld": MMERealWorld,
    "textvqa": TextVQA,
    "realworldqa": RealWorldQA,
    "4kpro": FourKProBenchmark,
    "jsonl": JsonlBenchmark,
}
ALIASES = {"hrbench4k": "hrbench", "hrbench8k": "hrbench", "hr-bench": "hrbench", "mme_realworld": "mme-realworld",
           "mmerealworld": "mme-realworld", "vstarbench": "vstar", "v*": "vstar", "custom": "jsonl",
           "synthetic": "jsonl", "realworld-qa": "realworldqa", "rwqa": "realworldqa"}


def build_benchmark(name: str, path: str, **kwargs: Any) -> Benchmark:
    """The runner ``name`` (see :data:`BENCHMARKS`; a few aliases accepted) on the data at ``path``."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[key](path, **kwargs)


__all__ = ["BENCHMARKS", "Benchmark", "FormatError", "Sample", "build_benchmark"]

"""Test-time compute scaling: one benchmark at several selection budgets, with an accuracy-vs-tokens plot.

    vila-hd eval --benchmark hrbench --data hr_bench_4k.tsv --model M --output out/hr4k --sweep steps=1,2,4,6

Each budget is an ordinary run in ``OUTPUT/<key>-<value>/`` (resumable and shardable on its own); when every
budget has its summary, ``sweep.json``, ``sweep.md`` and ``sweep.png`` (accuracy against mean LLM visual
tokens, one point per budget) are written to ``OUTPUT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vila_hd.arguments import parse_look_close
from vila_hd.eval.benchmarks.base import Benchmark
from vila_hd.eval.harness import run_benchmark
from vila_hd.eval.plot import Series, line_chart

BUDGET_KEYS = {"steps": "steps", "num_look_close": "steps", "tokens": "tokens", "num_token_look_close": "tokens"}


def parse_budgets(spec: str) -> list[dict[str, Any]]:
    """``"steps=1,2,4"`` -> ``[{"steps": 1}, {"steps": 2}, {"steps": 4}]`` (``tokens=...`` likewise; ``all``
    allowed). Values must be distinct non-negative integers or ``all``."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or key not in BUDGET_KEYS:
        raise ValueError(f"a sweep is KEY=V1,V2,... with KEY steps or tokens, got {spec!r}")
    budgets, seen = [], set()
    for raw in values.split(","):
        raw = raw.strip()
        try:
            raw = parse_look_close("", raw)
        except ValueError:
            raise ValueError(f"sweep value {raw!r} in {spec!r} is not a non-negative integer or 'all'") from None
        if raw in seen:
            raise ValueError(f"sweep value {raw!r} appears twice in {spec!r}")
        seen.add(raw)
        budgets.append({BUDGET_KEYS[key]: raw})
    if not budgets:
        raise ValueError(f"the sweep {spec!r} has no values")
    return budgets


def budget_name(budget: Mapping[str, Any]) -> str:
    return "_".join(f"{k}-{v}" for k, v in budget.items())


def run_sweep(benchmark: Benchmark, output_dir: str | os.PathLike, budgets: Sequence[Mapping[str, Any]], *,
              generation: Mapping[str, Any] | None = None, **run_kwargs: Any) -> dict[str, Any] | None:
    """Run ``benchmark`` once per budget (``run_kwargs`` as for :func:`~vila_hd.eval.harness.run_benchmark`) and write
    the sweep table and plot; returns the sweep summary, or ``None`` while budgets of a sharded run are still
    being finished by other processes."""
    out = Path(output_dir)
    base = {k: v for k, v in (generation or {}).items() if k not in BUDGET_KEYS}
    for budget in budgets:
        run_benchmark(benchmark, out / budget_name(budget), generation={**base, **budget}, **run_kwargs)
    return write_sweep(out, budgets, benchmark.name)


def write_sweep(out: Path, budgets: Sequence[Mapping[str, Any]], title: str) -> dict[str, Any] | None:
    """Collect the budgets' summaries into ``sweep.json`` / ``sweep.md`` / ``sweep.png`` (``None`` if one is
    missing)."""
    rows = []
    for budget in budgets:
        path = out / budget_name(budget) / "summary.json"
        if not path.exists():
            return None
        summary = json.loads(path.read_text(encoding="utf-8"))
        rows.append({"budget": dict(budget), "name": budget_name(budget), "accuracy": summary["accuracy"],
                     "image_tokens_mean": summary["image_tokens_mean"],
                     "selected_pct_mean": summary["selected_pct_mean"], "latency_p50_s": summary["latency_s"]["p50"],
                     "n": summary["n"], "errors": summary["errors"]})
    result = {"benchmark": title, "metric": "accuracy", "runs": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "sweep.md").write_text(sweep_markdown(result), encoding="utf-8")
    plotted = [r for r in rows if r["accuracy"] is not None and r["image_tokens_mean"] is not None]
    if plotted:
        plotted.sort(key=lambda r: r["image_tokens_mean"])
        series = Series(title, [(r["image_tokens_mean"], r["accuracy"]) for r in plotted],
                        [r["name"] for r in plotted])
        line_chart([series], out / "sweep.png", title=f"{title}: accuracy vs visual tokens",
                   x_label="mean LLM visual tokens per sample", y_label="accuracy (%)", y_range=(0, 100))
        result["plot"] = str(out / "sweep.png")
    return result


def sweep_markdown(result: Mapping[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
    lines = [f"# {result['benchmark']}: selection budget sweep", "",
             "| budget | accuracy | mean visual tokens | mean selected % | latency p50 (s) | samples |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {fmt(r['accuracy'])} | {fmt(r['image_tokens_mean'])} | "
                     f"{fmt(r['selected_pct_mean'])} | {fmt(r['latency_p50_s'])} | {r['n']} ({r['errors']} failed) |")
    return "\n".join(lines) + "\n"

"""Scores and aggregates: VQA soft accuracy, open-answer matching, percentiles, grouped accuracies."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vila_hd.eval.answers import normalize_vqa_answer

OPEN_METRICS = ("exact", "contains", "vqa")


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA / VQAv2 accuracy of one prediction against its human answers (usually 10).

    Both sides are normalised with :func:`~vila_hd.eval.answers.normalize_vqa_answer`; the score is
    ``min(1, matches / 3)`` averaged over the leave-one-annotator-out subsets: with 10 answers, a prediction
    given by 1 / 2 / 3 / 4+ annotators scores 0.3 / 0.6 / 0.9 / 1.0.
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    matches = sum(g == pred for g in gts)
    if len(gts) == 1:
        return float(matches >= 1)
    # leaving out a matching annotator leaves matches - 1 matches, any other leaves all of them
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def open_answer_score(prediction: str, answers: Sequence[str], metric: str = "exact") -> float:
    """Score an open (short) answer: ``exact`` = normalised prediction equals a normalised answer;
    ``contains`` = a normalised answer appears as whole words in the normalised prediction; ``vqa`` = soft
    accuracy over ``answers``."""
    if metric not in OPEN_METRICS:
        raise ValueError(f"unknown open-answer metric {metric!r}; choose one of {OPEN_METRICS}")
    if metric == "vqa":
        return vqa_soft_accuracy(prediction, answers)
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if metric == "exact":
        return float(pred in refs)
    return float(any(r and f" {r} " in f" {pred} " for r in refs))


def mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    data = sorted(float(v) for v in values if v is not None)
    if not data:
        return None
    position = (len(data) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return data[low] + (data[high] - data[low]) * (position - low)


def micro_accuracy(records: Sequence[dict[str, Any]]) -> float | None:
    """Mean ``score`` of the records (a failed sample scores 0)."""
    return mean(r.get("score", 0.0) or 0.0 for r in records)


def grouped(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = defaultdict(list)
    for record in records:
        value = key(record)
        if value is not None:
            groups[value].append(record)
    return dict(groups)


def accuracy_by(records: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
                accuracy: Callable[[Sequence[dict]], float | None] = micro_accuracy) -> dict[str, dict[str, Any]]:
    """``{group: {"n", "accuracy"}}`` (accuracy in percent), groups sorted by name."""
    out = {}
    for name, members in sorted(grouped(records, key).items(), key=lambda kv: str(kv[0])):
        value = accuracy(members)
        out[str(name)] = {"n": len(members), "accuracy": None if value is None else round(100 * value, 2)}
    return out


def resolution_bucket(width: int, height: int) -> str:
    """A resolution bucket from an image's longer side: ``1K`` (<= 1536), ``2K`` (<= 2560), ``4K`` (<= 4608),
    ``8K`` (larger) -- the buckets used when a benchmark does not name one."""
    side = max(width, height)
    if side <= 1536:
        return "1K"
    if side <= 2560:
        return "2K"
    if side <= 4608:
        return "4K"
    return "8K"

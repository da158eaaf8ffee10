"""Packing several samples into rows of a fixed capacity (first-fit decreasing).

Packed samples never attend to each other: the collator gives every sample its own position ids starting
at 0, and the model builds a block-diagonal causal mask from them (transformers detects packed rows from
position ids that restart) -- see :mod:`vila_hd.train.data.collate`.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose total length is at most ``capacity``.

    First-fit decreasing: deterministic (ties keep input order), rows are returned in order of their first
    (longest) sample, and within a row samples keep their input order. A length above ``capacity`` gets a
    row of its own (the caller has already rejected over-long samples)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]

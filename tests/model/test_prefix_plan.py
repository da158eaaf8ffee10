"""The top-down prefix pass's plan (vila_hd/model/prefix_plan.py) against a plain per-row reading of the same rule, on
random rows: samples of random lengths packed into rows, images (low-res then high-res tokens) at random places,
prompts after their image."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vila_hd.model.prefix_plan import prefix_plan

LOW, HIGH = 2, 3  # tokens per image: low-res, then high-res

# A sample: text length before its image (None: no image), text after the image; the prompt is the last token.
SAMPLE = st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.integers(1, 4))
ROWS = st.lists(st.lists(SAMPLE, min_size=0, max_size=3), min_size=1, max_size=3)


def build(rows):
    """positions (B, L), image rows / cols (images, LOW + HIGH), prompt index (P, 2) and the high-res mask."""
    lengths = [sum((0 if before is None else before + LOW + HIGH) + after for before, after in row) for row in rows]
    length = max(max(lengths), 1) + 2  # some padding
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    high = torch.zeros(len(rows), length, dtype=torch.bool)
    images, prompts = [], []
    for r, row in enumerate(rows):
        at = 0
        for before, after in row:
            n = (0 if before is None else before + LOW + HIGH) + after
            positions[r, at:at + n] = torch.arange(n)
            if before is not None:
                first = at + before
                images.append([(r, c) for c in range(first, first + LOW + HIGH)])
                high[r, first + LOW:first + LOW + HIGH] = True
                prompts.append((r, at + n - 1))
            at += n
        positions[r, at:] = torch.arange(length - at)
    image = torch.tensor(images, dtype=torch.long).view(-1, LOW + HIGH, 2)
    return positions, image[..., 0], image[..., 1], torch.tensor(prompts, dtype=torch.long).view(-1, 2), high


def reference(positions, high, prompts):
    """Per row: the tokens before or at its last prompt that are not high-res (row 0 keeps its first token);
    positions restart with every sample; spans are the runs of one sample."""
    kept_rows, pos_rows, span_rows = [], [], []
    for r in range(positions.shape[0]):
        last = max([c for pr, c in prompts.tolist() if pr == r], default=-1)
        kept = [c for c in range(positions.shape[1]) if not high[r, c] and c <= last]
        if r == 0 and 0 not in kept:
            kept = [0] + kept
        sample = (positions[r] == 0).long().cumsum(0).tolist()
        pos, spans = [], []
        for i, c in enumerate(kept):
            new = i == 0 or sample[c] != sample[kept[i - 1]]
            pos.append(0 if new else pos[-1] + 1)
            if new:
                spans.append([i, i])
            spans[-1][1] = i + 1
        kept_rows.append(kept)
        pos_rows.append(pos)
        span_rows.append([tuple(s) for s in spans])
    return kept_rows, pos_rows, span_rows


@settings(max_examples=150, deadline=None, database=None)
@given(rows=ROWS)
def test_prefix_plan_matches_the_rule(rows):
    positions, image_rows, image_cols, prompts, high = build(rows)
    plan = prefix_plan(positions, image_rows, image_cols, LOW, prompts)
    kept, pos, spans = reference(positions, high, prompts)
    for r in range(positions.shape[0]):
        n = len(kept[r])
        assert plan.order[r, :n].tolist() == kept[r]
        assert plan.positions[r, :n].tolist() == pos[r]
    table = [(r, s, e) for r in range(len(spans)) for s, e in spans[r]]
    assert plan.segments.tolist() == [list(t) for t in table]
    for (r, c), column in zip(prompts.tolist(), plan.prompt_columns.tolist()):
        assert kept[r][column] == c

"""Patch selection for PS3: scores -> per-step budgets -> binary selection maps.

Everything here is deterministic given the scores. The *number* of patches each look-close step
takes at each scale depends only on the grid sizes and the budgets, never on the scores, so it is
planned up front (:func:`plan_steps`): the same plan gives the token count a caller needs before the
encoder runs (VILA-HD expands its ``<image>`` placeholders with it) and drives the top-k selection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LookClose = int | str | None


@dataclass(frozen=True)
class StepSpec:
    """How many patches one look-close step selects; ``tokens=None`` means the full per-step budget."""

    tokens: int | None = None


def resolve_steps(
    max_tokens: int,
    step_budget: int,
    num_look_close: LookClose,
    num_token_look_close: LookClose,
) -> list[StepSpec]:
    """Translate the user's look-close request into a list of steps (the reference's rules, §5)."""
    if num_look_close is not None and num_token_look_close is not None:
        raise ValueError(
            "give either num_look_close or num_token_look_close, not both "
            f"(got num_look_close={num_look_close!r}, num_token_look_close={num_token_look_close!r})"
        )
    if num_look_close is None and num_token_look_close is None:
        raise ValueError("one of num_look_close or num_token_look_close is required on the feature path")
    max_steps = math.ceil(max_tokens / step_budget)
    if num_look_close is not None:
        if num_look_close == "all":
            return [StepSpec()] * max_steps
        steps = _non_negative_int("num_look_close", num_look_close)
        return [StepSpec()] * min(steps, max_steps)
    if num_token_look_close == "all":
        return [StepSpec()] * max_steps
    tokens = min(_non_negative_int("num_token_look_close", num_token_look_close), max_tokens)
    if tokens == 0:
        return []
    full, last = divmod(tokens, step_budget)
    if last == 0:
        return [StepSpec()] * full
    return [StepSpec()] * full + [StepSpec(tokens=last)]


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or 'all', got {value!r}")
    return value


def split_budget(budget_each_scale: Sequence[int], tokens: int | None, first_n: int | None) -> list[int]:
    """Per-scale quotas of one step: pixel-count split of ``tokens`` (remainder to the last scale),
    optionally moved onto the first ``first_n`` scales (others keep one patch)."""
    quota = list(budget_each_scale)
    total = sum(quota)
    if tokens is not None:
        quota = [int(q * tokens / total) for q in quota]
        quota[-1] += tokens - sum(quota)
    if first_n is not None and first_n < len(quota):
        # The other scales keep one patch each; the first n share the rest pro rata, remainder to the
        # n-th. (The reference pads the *last* scale to the full budget instead, which goes negative for
        # n=1 and ignores a partial last step; both agree otherwise.)
        head, step_total = sum(quota[:first_n]), sum(quota)
        share = step_total - (len(quota) - first_n)
        quota = [int(q / head * share) if i < first_n else 1 for i, q in enumerate(quota)]
        quota[first_n - 1] += step_total - sum(quota)
    return quota


def plan_steps(
    grid_sizes: Sequence[tuple[int, int]],
    budget_each_scale: Sequence[int],
    steps: Sequence[StepSpec],
    only_select_first_n_scale: int | None = None,
    group_size: int = 1,
) -> list[list[int]]:
    """Patches taken at each high-res scale by each step: ``plan[step][scale]``.

    A scale that runs out of unselected patches passes its surplus to the next scale. With
    ``group_size=g`` the quotas are counted in whole g x g groups (every selected patch then lies in a
    complete group; the step total is rounded down to a multiple of g*g).
    """
    area = group_size * group_size
    available = [(h // group_size) * (w // group_size) for h, w in grid_sizes]
    plan = []
    for step in steps:
        quota = split_budget(budget_each_scale, step.tokens, only_select_first_n_scale)
        if area > 1:
            groups = [q // area for q in quota]
            groups[-1] += sum(quota) // area - sum(groups)
            quota = groups
        for i in range(len(quota)):
            if available[i] < quota[i]:
                if i + 1 < len(quota):
                    quota[i + 1] += quota[i] - available[i]
                quota[i] = available[i]
        available = [a - q for a, q in zip(available, quota)]
        plan.append([q * area for q in quota])
    return plan


def selection_probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The reference's squashing: sigmoid of the 5x-scaled, clamped cosine logit."""
    return torch.sigmoid((logits * 5.0).clamp(-10.0, 10.0))


def resize_maps(maps: torch.Tensor, sizes: Sequence[tuple[int, int]], mode: str = "nearest") -> list[torch.Tensor]:
    """Resize a (B, h, w) map to each size in ``sizes`` (returns float maps)."""
    x = maps.unsqueeze(1).float()
    return [F.interpolate(x, size=tuple(s), mode=mode).squeeze(1) for s in sizes]


def apply_gt_and_smoothing(
    probs: list[torch.Tensor],
    gt_selection_maps: torch.Tensor | None,
    smooth: bool,
) -> list[torch.Tensor]:
    """Force GT regions to probability 1 (area-resized to the first grid, nearest to the others), then
    optionally smooth each map (area-pool to 6x6 and back)."""
    sizes = [tuple(p.shape[-2:]) for p in probs]
    if gt_selection_maps is not None:
        first = resize_maps(gt_selection_maps, sizes[:1], mode="area")[0]
        gts = resize_maps(first, sizes, mode="nearest")
        probs = [torch.where(g > 0, torch.ones_like(p), p) for g, p in zip(gts, probs)]
    if smooth:
        probs = [
            F.interpolate(F.adaptive_avg_pool2d(p.unsqueeze(1), (6, 6)), size=p.shape[-2:], mode="nearest").squeeze(1)
            for p in probs
        ]
    return probs


@torch.no_grad()
def select_step(
    probs: list[torch.Tensor],
    taken: list[torch.Tensor],
    quota: Sequence[int],
    group_size: int = 1,
) -> list[torch.Tensor]:
    """Top-k among not-yet-taken patches at each scale; returns this step's (B, h, w) 0/1 maps."""
    new_maps = []
    for prob, done, k in zip(probs, taken, quota):
        new = torch.zeros_like(done)
        if k > 0:
            score, mask = prob.float(), done
            if group_size > 1:
                score = F.max_pool2d(score.unsqueeze(1), group_size).squeeze(1)
                mask = F.max_pool2d(done.unsqueeze(1), group_size).squeeze(1)
            flat = torch.where(mask.flatten(1) > 0, torch.full_like(score.flatten(1), -1.0), score.flatten(1))
            idx = flat.topk(k // (group_size * group_size), dim=-1).indices
            picked = torch.zeros_like(flat).scatter_(1, idx, 1.0).view_as(score)
            if group_size > 1:
                picked = picked.repeat_interleave(group_size, 1).repeat_interleave(group_size, 2)
            new = picked.to(done.dtype)
        new_maps.append(new)
    return new_maps

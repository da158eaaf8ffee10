"""PS3 geometry and selection planning as pure functions of the configuration (no model needed).

The encoder and VILA-HD's token layout (which the processor uses before any forward pass) both call
these, so the number of selected patches is decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence

from .selection import StepSpec, plan_steps, resolve_steps


def scale_image_size(ps3_scales: Sequence[int], patch_size: int, image_hw, scale_idx: int) -> tuple[int, int]:
    """Pixel size of scale ``scale_idx`` for an input of size ``image_hw`` (§2): scale 0 is square; higher
    scales put ``scales[0] * zoom`` on the long side and keep the aspect ratio in whole patches."""
    base = ps3_scales[0]
    if scale_idx == 0:
        return (base, base)
    h, w = int(image_hw[0]), int(image_hw[1])
    zoom = ps3_scales[scale_idx] // base
    if h >= w:
        return (base * zoom, max(int(base / h * w) // patch_size, 1) * patch_size * zoom)
    return (max(int(base / w * h) // patch_size, 1) * patch_size * zoom, base * zoom)


def scale_grid_size(ps3_scales: Sequence[int], patch_size: int, image_hw, scale_idx: int) -> tuple[int, int]:
    """Patch grid (h, w) of scale ``scale_idx``."""
    h, w = scale_image_size(ps3_scales, patch_size, image_hw, scale_idx)
    return (max(h // patch_size, 1), max(w // patch_size, 1))


def highres_grids(ps3_scales: Sequence[int], patch_size: int, image_hw) -> list[tuple[int, int]]:
    return [scale_grid_size(ps3_scales, patch_size, image_hw, i) for i in range(1, len(ps3_scales))]


def plan_selection(
    ps3_scales: Sequence[int],
    patch_size: int,
    budget_each_scale: Sequence[int],
    image_hw,
    num_look_close=None,
    num_token_look_close=None,
    only_select_first_n_scale: int | None = None,
    selection_group_size: int = 1,
    steps: list[StepSpec] | None = None,
) -> list[list[int]]:
    """Patches selected per look-close step and high-res scale, ``plan[step][scale]``."""
    n_hi = len(ps3_scales) - 1
    first_n = only_select_first_n_scale
    if first_n is not None and (isinstance(first_n, bool) or not isinstance(first_n, int) or not 1 <= first_n <= n_hi):
        raise ValueError(f"only_select_first_n_scale must be an int in [1, {n_hi}], got {first_n!r}")
    grids = highres_grids(ps3_scales, patch_size, image_hw)
    g = selection_group_size
    if g > 1:
        bad = [grid for grid in grids if grid[0] % g or grid[1] % g]
        if bad:
            raise ValueError(f"selection_group_size={g} does not divide the patch grids {bad} of an input {image_hw}")
    if steps is None:
        counted = grids if first_n is None else grids[:first_n]
        max_tokens = sum(h * w for h, w in counted)
        steps = resolve_steps(max_tokens, sum(budget_each_scale), num_look_close, num_token_look_close)
    return plan_steps(grids, budget_each_scale, steps, first_n, g)

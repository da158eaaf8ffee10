"""What ``num_look_close="all"`` selects, from the plan alone (no model).

The reference (PS3's vision encoder) turns "all" into ceil(high-res patches / step budget) steps of the usual
per-scale quotas, a scale's surplus flowing only to the next scale. With the released budgets that covers
every patch; with budgets whose per-scale split starves an early scale over those steps (the tiny preset:
25 of 128 per step for a 256-patch scale, 10 steps) a few patches stay unselected, in the reference as here.
The 2x2 groups VILA-HD selects round each scale's quota down to whole groups, which leaves a few more."""

from __future__ import annotations

import pytest

from vila_hd.builder import build_tiny_processor
from vila_hd.model.token_layout import image_token_layout
from vila_hd.ps3.geometry import highres_grids, plan_selection

RELEASED = {  # scales, budget_each_scale of the released PS3-1.5K and PS3-4K configs
    "1.5K": ((378, 756, 1512), (512, 2048)),
    "4K": ((378, 756, 1512, 3780), (85, 341, 2134)),
}


def selected(scales, budget, group: int, **look_close) -> tuple[int, int]:
    hw = (scales[-1], scales[-1])
    plan = plan_selection(scales, 14, budget, hw, selection_group_size=group, **look_close)
    return sum(map(sum, plan)), sum(h * w for h, w in highres_grids(scales, 14, hw))


@pytest.mark.parametrize("name", sorted(RELEASED))
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("look_close", [dict(num_look_close="all"), dict(num_token_look_close="all")])
def test_all_selects_every_patch_of_the_released_configs(name, group, look_close):
    taken, total = selected(*RELEASED[name], group, **look_close)
    assert taken == total  # 14,580 at 1.5K, 87,480 at 4K (the reference README's 88,209 tokens - 729)


def test_all_on_the_tiny_preset_follows_the_reference_rule():
    spec = build_tiny_processor("tiny").layout
    scales, budget = spec.ps3_scales, spec.budget_each_scale
    assert budget == (25, 103) and selected(scales, budget, 1, num_look_close="all") == (1274, 1280)
    assert selected(scales, budget, 2, num_look_close="all") == (1264, 1280)  # 24 + 104 per step in groups
    layout = image_token_layout(spec, num_look_close="all")
    assert layout.num_selected_patches == 1264 and layout.num_tokens == 16 + 1264 // 4


def test_a_token_budget_of_every_patch_is_not_all_steps_at_4k():
    """The reference clamps num_token_look_close to the patch count and splits the last, partial step pro rata,
    so 87,480 tokens leave 24 patches of the two first scales unselected (the "all" steps select them)."""
    scales, budget = RELEASED["4K"]
    assert selected(scales, budget, 1, num_token_look_close=87480) == (87456, 87480)
    assert selected(scales, budget, 1, num_token_look_close=10**6) == (87456, 87480)

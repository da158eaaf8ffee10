"""How many LLM tokens an image becomes, and where they are: the one function both the processor
(placeholder expansion) and the model (feature placement) use.

Per image the LLM sees ``[low-res merged tokens][high-res merged tokens of scale 1, raster]...[scale S]``
followed by the image-end text (the reference's ``"\\n"``, one extra token for Qwen2; it is ordinary text
and not counted here). With the ``mlp_downsample_2x2`` projector the 27x27 low-res grid becomes 14x14 = 196
tokens and every 2x2 group of selected high-res patches one token.

The reference keeps only the 2x2 groups whose four patches were all selected, so its count depends on
the image. We ask PS3 to select whole groups (``selection_group_size`` = the projector's merge size), so
every selected patch lies in a complete group and the count is exact and known before any forward pass:
``196 + selected_patches / 4`` (1.5K, all patches: 3841; 4K at 2 / 4 / 6 / 12 steps: 1476 / 2756 / 4036 /
7876).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from vila_hd.ps3.geometry import highres_grids, plan_selection

LookClose = int | str | None


@dataclass(frozen=True)
class TokenLayoutSpec:
    """The fields of a VILA-HD config that decide the token layout (stored by the processor too)."""

    ps3_scales: tuple[int, ...]
    patch_size: int
    budget_each_scale: tuple[int, ...]
    downsample: int = 2
    num_look_close: LookClose = 6
    num_token_look_close: LookClose = None
    max_context: int | None = None

    @classmethod
    def from_config(cls, config) -> TokenLayoutSpec:
        """Build from a :class:`VilaHDConfig`."""
        vision = config.vision_config
        return cls(
            ps3_scales=tuple(int(s) for s in vision.ps3_scales),
            patch_size=int(vision.patch_size),
            budget_each_scale=tuple(int(b) for b in vision.budget_each_scale),
            downsample=int(config.downsample),
            num_look_close=config.num_look_close,
            num_token_look_close=config.num_token_look_close,
            max_context=config.max_context,
        )

    @classmethod
    def from_dict(cls, data: dict) -> TokenLayoutSpec:
        data = dict(data)
        data["ps3_scales"] = tuple(data["ps3_scales"])
        data["budget_each_scale"] = tuple(data["budget_each_scale"])
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ps3_scales"] = list(self.ps3_scales)
        out["budget_each_scale"] = list(self.budget_each_scale)
        return out

    @property
    def low_res_grid(self) -> int:
        return self.ps3_scales[0] // self.patch_size

    @property
    def low_res_token_num(self) -> int:
        return self.low_res_grid**2

    def resolve_look_close(
        self, num_look_close: LookClose = None, num_token_look_close: LookClose = None
    ) -> tuple[LookClose, LookClose]:
        """Per-call settings win over the defaults; giving one of the two replaces both defaults."""
        if num_look_close is None and num_token_look_close is None:
            return self.num_look_close, self.num_token_look_close
        return num_look_close, num_token_look_close


@dataclass(frozen=True)
class ImageTokenLayout:
    """Token layout of one image: ``num_tokens`` = ``num_low_res_tokens`` + sum of ``high_res_tokens``."""

    image_hw: tuple[int, int]
    low_res_grid: tuple[int, int]  # merged grid of the low-res tokens (14x14 for 27x27 and 2x2 merging)
    high_res_grids: tuple[tuple[int, int], ...]  # patch grid of each high-res scale
    selected_patches: tuple[int, ...]  # patches PS3 selects at each high-res scale
    downsample: int
    high_res_tokens: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        area = self.downsample * self.downsample
        object.__setattr__(self, "high_res_tokens", tuple(n // area for n in self.selected_patches))

    @property
    def num_low_res_tokens(self) -> int:
        return self.low_res_grid[0] * self.low_res_grid[1]

    @property
    def num_high_res_tokens(self) -> int:
        return sum(self.high_res_tokens)

    @property
    def num_selected_patches(self) -> int:
        return sum(self.selected_patches)

    @property
    def num_tokens(self) -> int:
        return self.num_low_res_tokens + self.num_high_res_tokens

    @property
    def merged_grids(self) -> tuple[tuple[int, int], ...]:
        """Merged grid of each high-res scale (ceil, as the reference pads odd grids)."""
        r = self.downsample
        return tuple((math.ceil(h / r), math.ceil(w / r)) for h, w in self.high_res_grids)


def highres_grid_sizes(ps3_scales: Sequence[int], patch_size: int, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Patch grid of each high-res scale for an input of size ``image_hw`` (PS3 §2 geometry)."""
    return highres_grids(ps3_scales, patch_size, image_hw)


def image_token_layout(
    spec: TokenLayoutSpec,
    image_hw: tuple[int, int] | None = None,
    *,
    num_look_close: LookClose = None,
    num_token_look_close: LookClose = None,
    only_select_first_n_scale: int | None = None,
) -> ImageTokenLayout:
    """THE function that says how many tokens an image becomes (and per scale, where).

    Args:
        spec: layout fields of the model config (:meth:`TokenLayoutSpec.from_config`).
        image_hw: size of the pixel tensor given to PS3 (default: square at the largest scale, what the
            processor produces).
        num_look_close / num_token_look_close: per-call selection budget (defaults from ``spec``);
            0 means low-res tokens only.
        only_select_first_n_scale: move the budget onto the first n high-res scales.
    """
    if image_hw is None:
        image_hw = (spec.ps3_scales[-1], spec.ps3_scales[-1])
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    r = spec.downsample
    low = math.ceil(spec.low_res_grid / r)
    grids = highres_grid_sizes(spec.ps3_scales, spec.patch_size, image_hw)
    num_look_close, num_token_look_close = spec.resolve_look_close(num_look_close, num_token_look_close)
    if r > 1:
        bad = [g for g in grids if g[0] % r or g[1] % r]
        if bad:
            raise ValueError(f"the {r}x{r} projector needs high-res grids divisible by {r}; got {bad} for {image_hw}")
    plan = plan_selection(spec.ps3_scales, spec.patch_size, spec.budget_each_scale, image_hw, num_look_close,
                          num_token_look_close, only_select_first_n_scale, selection_group_size=r)
    selected = [sum(step[i] for step in plan) for i in range(len(grids))]
    return ImageTokenLayout(
        image_hw=image_hw,
        low_res_grid=(low, low),
        high_res_grids=tuple(grids),
        selected_patches=tuple(selected),
        downsample=r,
    )


def num_image_tokens(spec: TokenLayoutSpec, image_hw: tuple[int, int] | None = None, **look_close) -> int:
    """Number of image tokens (placeholder positions) one image takes; the image-end text is extra."""
    return image_token_layout(spec, image_hw, **look_close).num_tokens

"""What an answer is: its text and token ids (:class:`GenerationResult`), what it cost
(:class:`GenerationStats`) and where PS3 looked (:class:`ImageSelection`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vila_hd.engine.options import MODE_NAMES


@dataclass
class GenerationStats:
    """What an answer cost. Token counts per image exclude the image-end text (``"\\n"``).

    Counts and image fields are the answer's own (a text-only answer has 0 of each). The times (``*_s``) are
    those of the generate call that produced it, shared by the ``batch_size`` answers of its batch; so is the
    decoding time behind ``tokens_per_s`` (this answer's tokens over the batch's decoding seconds)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    images: int = 0
    image_tokens: int = 0  # all images together
    tokens_per_image: int = 0
    low_res_tokens_per_image: int = 0
    high_res_tokens_per_image: int = 0
    selected_patches: int = 0  # per image, over all high-res scales
    total_patches: int = 0
    look_close_mode: str | None = None
    num_look_close: int | str | None = None
    num_token_look_close: int | str | None = None
    batch_size: int = 1
    preprocess_s: float = 0.0
    prefix_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    stopped: bool = False  # interrupted by Generation.stop()

    @property
    def selected_pct(self) -> float:
        return 100.0 * self.selected_patches / self.total_patches if self.total_patches else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed (tokens after the first per second of decoding)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["look_close_mode"] = MODE_NAMES.get(self.look_close_mode, self.look_close_mode)
        for key in ("preprocess_s", "prefix_s", "encode_s", "prefill_s", "decode_s", "total_s"):
            out[key] = round(out[key], 4)
        out["selected_pct"] = round(self.selected_pct, 2)
        out["tokens_per_s"] = round(self.tokens_per_s, 2)
        return out

    def format(self) -> str:
        """Human-readable summary (what ``/stats`` prints)."""
        mode = MODE_NAMES.get(self.look_close_mode, self.look_close_mode)
        budget = (
            f"steps {self.num_look_close}"
            if self.num_token_look_close is None
            else f"tokens {self.num_token_look_close}"
        )
        times = "times" if self.batch_size == 1 else f"times (batch of {self.batch_size})"
        lines = []
        if self.images:
            lines += [
                f"image tokens   {self.tokens_per_image} per image x {self.images} image(s) = {self.image_tokens} "
                f"({self.low_res_tokens_per_image} low-res + {self.high_res_tokens_per_image} high-res per image)",
                f"selected       {self.selected_patches} / {self.total_patches} high-res patches per image "
                f"({self.selected_pct:.1f}%), mode {mode}, {budget}",
            ]
        else:
            lines.append(f"image tokens   0 (no image), mode {mode}, {budget}")
        lines += [
            f"tokens         {self.prompt_tokens} prompt, {self.new_tokens} generated"
            + (" (stopped)" if self.stopped else ""),
            f"{times:<14} preprocess {self.preprocess_s:.3f} s | prefix {self.prefix_s:.3f} s | encode "
            f"{self.encode_s:.3f} s | prefill {self.prefill_s:.3f} s | decode {self.decode_s:.3f} s",
            f"speed          {self.tokens_per_s:.1f} tokens/s (decode), total {self.total_s:.3f} s",
        ]
        return "\n".join(lines)


NO_IMAGE = dict(tokens_per_image=0, low_res_tokens_per_image=0, high_res_tokens_per_image=0, selected_patches=0,
                total_patches=0)


@dataclass
class ImageSelection:
    """Where PS3 looked in one image: per high-res scale a 0/1 ``maps[i]`` (h, w) and ``probs[i]`` (h, w)."""

    image: Image.Image
    maps: list[torch.Tensor]
    probs: list[torch.Tensor]

    @property
    def selected_fraction(self) -> float:
        total = sum(m.numel() for m in self.maps)
        return float(sum(m.sum() for m in self.maps)) / total if total else 0.0

    def figure(self, tile: int = 512) -> Image.Image:
        """Heatmap of the probabilities (top row) and the selected patches (bottom row), one column per scale."""
        from vila_hd.visualize import selection_figure

        return selection_figure(self.image, self.probs, self.maps, tile=tile)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`figure` as a PNG and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure().save(path, format="PNG")
        return path


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    selection_maps: list[torch.Tensor] | None = None  # per scale (num_images, h, w)
    selection_probs: list[torch.Tensor] | None = None

    def selection(self, index: int = -1) -> ImageSelection | None:
        """The selection of image ``index`` of this answer (default the last); ``None`` without images."""
        if not self.images or self.selection_maps is None:
            return None
        return ImageSelection(
            self.images[index],
            [m[index].cpu() for m in self.selection_maps],
            [p[index].float().cpu() for p in self.selection_probs],
        )

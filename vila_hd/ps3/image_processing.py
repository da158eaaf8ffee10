"""PS3 image processor: squash-resize to the largest scale (bicubic), normalise, batch.

Any input the safe loader accepts works (paths, bytes, PIL images of any mode, numpy arrays, tensors);
EXIF orientation is honoured and decompression bombs are refused (``max_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from ..images import DEFAULT_MAX_PIXELS, load_image

# A side shrinking by more than 2x this is box-reduced first (see squash_resize); real images never shrink that much.
_REDUCING_GAP = 64.0
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PS3ImageProcessor(BaseImageProcessor):
    """Drop-in for the reference ``PS3ImageProcessor`` (same constructor and ``preprocessor_config.json``)."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        resize_mode: str | None = None,
        interpolation: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **kwargs,
    ):
        for derived in ("size", "crop_size", "image_mean", "image_std"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        image_size = image_size if image_size is not None else 378
        self.image_size = [image_size, image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
        self.mean = _triple(mean if mean is not None else 0.5, "mean")
        self.std = _triple(std if std is not None else 0.5, "std")
        self.resize_mode = resize_mode or "squash"
        if self.resize_mode != "squash":
            raise ValueError(f"resize_mode must be 'squash', got {self.resize_mode!r}")
        self.interpolation = interpolation or "bicubic"
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``BaseImageProcessor.from_pretrained``; a local-looking path that does not exist is an error, never a
        Hub download, and a directory whose configs name custom code (``auto_map``) is refused."""
        from vila_hd.hub import locate, refuse_custom_code

        path, local = locate(pretrained_model_name_or_path, "PS3 image processor")
        if local:
            refuse_custom_code(path, "PS3 image processor")
        if kwargs.pop("trust_remote_code", False):
            raise ValueError("PS3ImageProcessor never runs remote code; trust_remote_code=True is not supported")
        return super().from_pretrained(path, *args, trust_remote_code=False, **kwargs)

    # Names VILA-era code reads.
    @property
    def image_mean(self) -> list[float]:
        return self.mean

    @property
    def image_std(self) -> list[float]:
        return self.std

    @property
    def crop_size(self) -> dict:
        return {"height": self.image_size[0], "width": self.image_size[1]}

    def to_tensor(self, image) -> torch.Tensor:
        """One image (any supported source) -> normalised (3, H, W) float tensor at ``image_size``."""
        return self.normalize(self.to_uint8(image))

    def to_uint8(self, image) -> torch.Tensor:
        """One image -> resized (3, H, W) uint8 tensor: a quarter of the float tensor's bytes to collate, pin and
        copy to the GPU, where :meth:`normalize` finishes the job (training data does this)."""
        img = load_image(image, max_pixels=self.max_pixels)
        height, width = self.image_size
        img = squash_resize(img, width, height, _RESAMPLE[self.interpolation])
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> float32 model input ``(x / 255 - mean) / std``, on the tensor's device."""
        mean = torch.tensor(self.mean).view(3, 1, 1).to(pixels.device, non_blocking=True)
        std = torch.tensor(self.std).view(3, 1, 1).to(pixels.device, non_blocking=True)
        return (pixels.float() / 255.0 - mean) / std

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("PS3ImageProcessor got an empty list of images")
        pixel_values = torch.stack([self.to_tensor(image) for image in images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=None)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for derived in ("size", "crop_size", "image_mean", "image_std"):
            out.pop(derived, None)
        return out


def squash_resize(img: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """``img.resize((width, height))`` with memory bounded by the input and the output, whatever the aspect ratio.

    Pillow resamples horizontally first, into a ``width x img.height`` intermediate: for a tall thin image (say
    1 x 4M pixels squashed to 1512 x 1512) that is gigabytes, so such images are resampled vertically first. And
    its filter weights take 32 bytes per source row or column: a side shrinking more than _REDUCING_GAP times is
    first box-reduced by an integer factor (Pillow's ``reducing_gap``). Every other image goes through the
    one-call resize, bit for bit."""
    if img.size == (width, height):
        return img
    if width > img.width and img.height > height:
        img = img.resize((img.width, height), resample=resample, reducing_gap=_REDUCING_GAP)
    return img.resize((width, height), resample=resample, reducing_gap=_REDUCING_GAP)


def _triple(value, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must be a number or three numbers, got {value!r}")
    return values

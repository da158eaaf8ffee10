"""Safe image loading: every image that enters VILA-HD (processor, chat, data) goes through `load_image`.

What it guarantees, whatever the source:
- an RGB `PIL.Image.Image`, fully decoded (a truncated file fails here, not deep inside a training step);
- the pixel limit is checked from the header *before* decoding, so a decompression bomb costs nothing;
- EXIF orientation applied; the first frame of animated / multi-page files;
- every failure is an `ImageLoadError` whose message names the culprit (path or description) and the reason.

Conversion rules (mode -> RGB):
- RGBA, LA, PA, RGBa, La and P/L/RGB with a transparency key are composited on a white background.
- 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own `convert("RGB")`.
- I;16, I;16L, I;16B, I;16N (16-bit): ``round(v / 257)``, so 0 -> 0 and 65535 -> 255.
- I (32-bit signed): values inside [0, 65535] are taken as 16-bit data in a wider container (16-bit PGM/TIFF)
  and scaled by ``round(v / 257)``; anything outside that range is min-max stretched to [0, 255].
- F (32-bit float): values inside [0, 1] are scaled by 255; anything else is min-max stretched to [0, 255].
  NaN and infinities become 0 before scaling.
Arrays and tensors (HW, HWC, and for tensors also CHW; 1, 3 or 4 channels; 4 = RGBA):
- uint8 as is; uint16 by ``round(v / 257)``; bool -> {0, 255}; float must lie in [0, 1] and is scaled by 255.
  Any other dtype, channel count or rank is an error (no guessing).

Pillow keeps its limits (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`) in module globals. We set
them only while a load runs and restore them afterwards; concurrent loads in threads share the settings when
they use the same `max_pixels` and take turns otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "load_image"]

# Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS): about 4K x 4K x 11, far above any training resolution.
DEFAULT_MAX_PIXELS = 178_956_970

_ALPHA_MODES = {"RGBA", "LA", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Errors Pillow raises for corrupt or truncated data during open / load.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the image and the reason."""


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` as a fully decoded RGB image.

    Args:
        source: a path (str / os.PathLike), encoded bytes, a binary file-like object, a PIL image, a numpy array
            (HW or HWC) or a torch tensor (HW, CHW or HWC). See the module docstring for dtype rules.
        max_pixels: refuse images with more than this many pixels (checked before decoding). None: no limit;
            only for files you trust.

    Raises:
        ImageLoadError: the source is missing, unreadable, not an image, truncated, too large or of an
            unsupported layout.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, "numpy array", max_pixels)
    if _is_torch_tensor(source):
        return _from_tensor(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(io.BytesIO(data), f"<{len(data)} bytes>", max_pixels)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return _decode(source, str(name) if name else f"<{type(source).__name__} object>", max_pixels)
    raise ImageLoadError(f"cannot load an image from an object of type {type(source).__name__}")


# --------------------------------------------------------------------------------------------------- sources


def _from_path(path: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if os.path.isdir(name):
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    try:
        with open(name, "rb") as f:
            return _decode(f, name, max_pixels)
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: not found") from None
    except PermissionError as e:
        raise ImageLoadError(f"{name}: cannot read ({e.strerror})") from None


def _decode(fp: Any, name: str, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the header size, decode the first frame fully, orient and convert."""
    with _PIL_SETTINGS.applied(max_pixels):
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: unrecognised image format{_empty_hint(fp)}") from None
        except _BOMB_ERRORS as e:
            raise _pil_bomb_error(e, name, max_pixels) from None
        except _DECODE_ERRORS as e:
            raise ImageLoadError(f"{name}: cannot read image header ({e})") from None
        _check_size(im.size, name, max_pixels)
        _load_first_frame(im, name, max_pixels)
        im = _exif_transpose(im, in_place=True)
        rgb = _to_rgb(im, name)
    # The opened image still refers to its (soon closed) file; hand back a detached copy.
    return rgb.copy() if rgb is im else rgb


def _from_pil(im: Image.Image, max_pixels: int | None) -> Image.Image:
    name = f"PIL image ({im.width} x {im.height}, mode {im.mode})"
    with _PIL_SETTINGS.applied(max_pixels):
        _check_size(im.size, name, max_pixels)
        try:
            im.load()  # a no-op for decoded images; decodes a lazily opened one
        except _BOMB_ERRORS as e:
            raise _pil_bomb_error(e, name, max_pixels) from None
        except _DECODE_ERRORS as e:
            raise ImageLoadError(f"{name}: cannot decode image ({e})") from None
    # The caller keeps its object: orientation and conversion work on copies (or return it when nothing changes).
    im = _exif_transpose(im, in_place=False)
    return _to_rgb(im, name)


def _is_torch_tensor(x: Any) -> bool:
    torch = _torch_if_imported()
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_if_imported() -> Any:
    # torch is never imported here for its own sake: a tensor can only exist if the caller imported it.
    return sys.modules.get("torch")


def _from_tensor(t: Any, max_pixels: int | None) -> Image.Image:
    torch = _torch_if_imported()
    shape = tuple(t.shape)
    name = f"torch tensor of shape {shape} ({t.dtype})"
    t = t.detach().cpu()
    if t.ndim not in (2, 3):
        raise ImageLoadError(f"{name}: expected HW, CHW or HWC")
    if t.ndim == 3:
        chw = shape[0] in (1, 3, 4)
        hwc = shape[-1] in (1, 3, 4)
        if chw:  # torch's convention wins when both readings fit (e.g. 3 x 4 x 3)
            t = t.permute(1, 2, 0)
        elif not hwc:
            raise ImageLoadError(f"{name}: expected CHW or HWC with 1, 3 or 4 channels")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return _from_array(t.numpy(), name, max_pixels)


def _from_array(a: np.ndarray, name: str, max_pixels: int | None) -> Image.Image:
    if name == "numpy array":
        name = f"numpy array of shape {a.shape} ({a.dtype})"
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageLoadError(f"{name}: expected HW or HWC with 1, 3 or 4 channels")
    height, width = a.shape[:2]
    _check_size((width, height), name, max_pixels)
    a8 = _array_to_uint8(a, name)
    im = Image.fromarray(np.ascontiguousarray(a8))  # uint8 HW / HWC3 / HWC4 -> L / RGB / RGBA
    rgb = _to_rgb(im, name)
    # fromarray may share the caller's buffer; the result must not change when the caller's array does.
    return rgb.copy() if rgb is im and a8 is a else rgb


def _array_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return _uint16_to_uint8(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageLoadError(f"{name}: float image contains NaN or infinity")
        low, high = float(a.min()), float(a.max())
        if low < 0.0 or high > 1.0:
            raise ImageLoadError(
                f"{name}: float images must lie in [0, 1], got values in [{low:g}, {high:g}]"
                " (divide 0-255 data by 255 first)"
            )
        return np.rint(a.astype(np.float32) * 255.0).astype(np.uint8)
    raise ImageLoadError(f"{name}: unsupported dtype {a.dtype} (use uint8, uint16, bool or float in [0, 1])")


# ------------------------------------------------------------------------------------------- decoding steps


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: empty image ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(_bomb_message(name, (width, height), max_pixels))


def _bomb_message(name: str, size: tuple[int, int] | None, max_pixels: int | None) -> str:
    what = f"{size[0]} x {size[1]} = {size[0] * size[1]} pixels" if size else "more pixels"
    return f"{name} has {what}, above the limit max_pixels={max_pixels}; raise max_pixels if you trust this file"


def _pil_bomb_error(e: BaseException, name: str, max_pixels: int | None) -> ImageLoadError:
    """Pillow refused a frame or header itself (it checks with our limit while a load runs)."""
    # Pillow's message has only the pixel count; its check function holds the size. Best effort, for the message.
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    size = tb.tb_frame.f_locals.get("size") if tb is not None else None
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        size = None
    return ImageLoadError(_bomb_message(name, size, max_pixels))


def _empty_hint(fp: Any) -> str:
    try:
        pos = fp.tell()
        fp.seek(0, os.SEEK_END)
        empty = fp.tell() == 0
        fp.seek(pos)
    except (OSError, AttributeError, ValueError):
        return ""
    return " (the file is empty)" if empty else ""


def _load_first_frame(im: Image.Image, name: str, max_pixels: int | None) -> None:
    # Image.open leaves animated / multi-page files on their first frame; load() decodes all of it, so a
    # truncated file fails here (verify() would let it through).
    try:
        im.load()
    except _BOMB_ERRORS as e:
        raise _pil_bomb_error(e, name, max_pixels) from None
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{name}: cannot decode image, the file is corrupt or truncated ({e})") from None


def _exif_transpose(im: Image.Image, *, in_place: bool) -> Image.Image:
    try:
        if in_place:
            ImageOps.exif_transpose(im, in_place=True)
            return im
        orientation = im.getexif().get(0x0112, 1)
        return ImageOps.exif_transpose(im) if orientation != 1 else im
    except Exception:  # malformed EXIF must not make an otherwise decodable image unusable
        return im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBa", "La"):
        return _premultiplied_on_white(np.asarray(im))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_uint16_to_uint8(np.asarray(im))).convert("RGB")
    if mode == "I":
        return Image.fromarray(_int32_to_uint8(np.asarray(im))).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(im))).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(f"{name}: cannot convert mode {mode} to RGB ({e})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _premultiplied_on_white(a: np.ndarray) -> Image.Image:
    # Over white with premultiplied colour c: c + 255 * (1 - alpha / 255) = c + 255 - alpha.
    alpha = a[..., -1:].astype(np.int32)
    colour = np.minimum(a[..., :-1].astype(np.int32) + 255 - alpha, 255).astype(np.uint8)
    if colour.shape[-1] == 1:
        return Image.fromarray(colour[..., 0]).convert("RGB")
    return Image.fromarray(colour)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    # round(v / 257) in integers: (v + 128) // 257 maps 0 -> 0, 65535 -> 255, 257 * k -> k.
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _int32_to_uint8(a: np.ndarray) -> np.ndarray:
    low, high = int(a.min()), int(a.max())
    if low >= 0 and high <= 65535:
        return _uint16_to_uint8(a)
    return _stretch(a.astype(np.float64), low, high)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(a.min()), float(a.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    return _stretch(a, low, high)


def _stretch(a: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - low) * (255.0 / (high - low))).astype(np.uint8)


# ------------------------------------------------------------------------------------- Pillow's globals


class _PilSettings:
    """Pillow limits for the duration of a load, shared by concurrent loads that ask for the same limit.

    While any load runs: `Image.MAX_IMAGE_PIXELS = max_pixels` (so Pillow's own checks on frames and tiles use
    our limit), `ImageFile.LOAD_TRUNCATED_IMAGES = False` and `DecompressionBombWarning` is an error. The last
    load to finish restores what was there before. Loads with a different limit wait for their turn.
    """

    _FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._limit: int | None = None
        self._saved: tuple[Any, bool, bool] | None = None

    @contextlib.contextmanager
    def applied(self, max_pixels: int | None) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0 or self._limit == max_pixels)
            if self._users == 0:
                self._enter(max_pixels)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    self._exit()
                    self._cond.notify_all()

    def _enter(self, max_pixels: int | None) -> None:
        had_filter = self._FILTER in warnings.filters
        self._saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, had_filter)
        self._limit = max_pixels
        Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        if not had_filter:
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

    def _exit(self) -> None:
        assert self._saved is not None
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, had_filter = self._saved
        self._saved = None
        if not had_filter:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(self._FILTER)
            mutated = getattr(warnings, "_filters_mutated", None)
            if mutated is not None:
                mutated()


_PIL_SETTINGS = _PilSettings()

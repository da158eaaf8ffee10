"""Safe image loading: every image that enters VILA-HD (processor, chat, data) goes through `load_image`.

What it guarantees, whatever the source:
- an RGB `PIL.Image.Image`, fully decoded (a truncated file fails here, not deep inside a training step);
- the pixel limit is checked from the header *before* decoding, so a decompression bomb costs nothing;
- EXIF orientation applied; the first frame of animated / multi-page files;
- every failure is an `ImageLoadError` whose message names the culprit (path or description) and the reason,
  whatever a decoder raised on malformed data (tests/processing/test_fuzz_images.py feeds it thousands of mutated files);
- files and bytes are decoded only in `ACCEPTED_FORMATS`: raster formats Pillow decodes itself. Never EPS / PS
  (Pillow hands those to Ghostscript, an interpreter) nor the rarely used formats whose decoders see little use;
  open such a file with Pillow yourself and pass the image if you trust it;
- a path must name a regular file: a FIFO or a device would block or never end, a symlink loop is an error.

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
import functools
import io
import os
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vila_hd.errors import VilaHDError

__all__ = ["ACCEPTED_FORMATS", "DEFAULT_MAX_PIXELS", "ImageLoadError", "PixelLimitError", "load_image"]

# Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS): about 4K x 4K x 11, far above any training resolution.
DEFAULT_MAX_PIXELS = 178_956_970

# Pillow format names tried when decoding files and bytes (a PIL image passed in is taken whatever its format).
# (JPEG covers MPO, PPM covers PGM / PBM / PFM.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "DIB", "PPM", "ICO", "AVIF", "JPEG2000")

_ALPHA_MODES = {"RGBA", "LA", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Errors Pillow raises for corrupt or truncated data during open / load.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageLoadError(VilaHDError):
    """An image could not be loaded; the message names the image and the reason."""


class PixelLimitError(ImageLoadError):
    """An image with more pixels than the loader's ``max_pixels`` (found before decoding). The message names
    the option generically; :meth:`naming` words it for the option a caller exposes (a command-line flag)."""

    def __init__(self, name: str, size: tuple[int, int] | None, max_pixels: int | None):
        self.name, self.size, self.max_pixels = name, size, max_pixels
        super().__init__(self.naming("max_pixels"))

    def __reduce__(self):  # picklable (data-loader workers send errors to the main process)
        return type(self), (self.name, self.size, self.max_pixels)

    def naming(self, option: str) -> str:
        what = f"{self.size[0]} x {self.size[1]} = {self.size[0] * self.size[1]} pixels" if self.size else "more pixels"
        limit = f"max_pixels={self.max_pixels}" if option == "max_pixels" else f"{option} {self.max_pixels}"
        return f"{self.name} has {what}, above the limit {limit}; raise {option} if you trust this file"


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
    try:
        mode = os.stat(name).st_mode
        if stat.S_ISDIR(mode):
            raise ImageLoadError(f"{name}: is a directory, not an image file")
        if not stat.S_ISREG(mode):  # a FIFO would block and a device may never end
            raise ImageLoadError(f"{name}: not a regular file (a pipe, socket or device)")
        with open(name, "rb") as f:
            return _decode(f, name, max_pixels)
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: not found") from None
    except PermissionError as e:
        raise ImageLoadError(f"{name}: cannot read ({e.strerror})") from None
    except OSError as e:  # a symlink loop, a name too long, an I/O error...
        raise ImageLoadError(f"{name!r}: cannot open ({e.strerror or e})") from None
    except ValueError as e:
        if isinstance(e, ImageLoadError):
            raise
        raise ImageLoadError(f"{name!r}: not a usable path ({e})") from None


def _decode(fp: Any, name: str, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the header size, decode the first frame fully, orient and convert."""
    with _PIL_SETTINGS.applied(max_pixels):
        try:
            im = Image.open(fp, formats=_open_formats())
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: {_unidentified_reason(fp)}") from None
        except _BOMB_ERRORS as e:
            raise _pil_bomb_error(e, name, max_pixels) from None
        except Exception as e:  # decoders raise many types on malformed headers; the file is the culprit
            raise ImageLoadError(f"{name}: cannot read image header ({_describe(e)})") from None
        _check_size(im.size, name, max_pixels)
        _load_first_frame(im, name, max_pixels)
        _check_size(im.size, name, max_pixels)  # some formats learn their final size while decoding
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
        except Exception as e:
            raise ImageLoadError(f"{name}: cannot decode image ({_describe(e)})") from None
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
        raise PixelLimitError(name, (width, height), max_pixels)


def _pil_bomb_error(e: BaseException, name: str, max_pixels: int | None) -> PixelLimitError:
    """Pillow refused a frame or header itself (it checks with our limit while a load runs)."""
    # Pillow's message has only the pixel count; its check function holds the size. Best effort, for the message.
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    size = tb.tb_frame.f_locals.get("size") if tb is not None else None
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        size = None
    return PixelLimitError(name, size, max_pixels)


def _describe(e: BaseException) -> str:
    """The decoder's message, with the exception type where it says more than "corrupt data"."""
    return str(e) if isinstance(e, _DECODE_ERRORS) else f"{type(e).__name__}: {e}"


def _unidentified_reason(fp: Any) -> str:
    """Why Pillow recognised nothing: an empty file, a format we refuse, or an unknown one."""
    try:
        pos = fp.tell()
        fp.seek(0, os.SEEK_END)
        empty = fp.tell() == 0
        fp.seek(0)
        head = fp.read(16)
        fp.seek(pos)
    except (OSError, AttributeError, ValueError):
        return "unrecognised image format"
    if empty:
        return "unrecognised image format (the file is empty)"
    refused = _refused_format(head)
    if refused:
        return (
            f"{refused} images are not accepted (accepted: {', '.join(ACCEPTED_FORMATS)}); convert the file, or "
            "open it with Pillow yourself and pass the image if you trust it"
        )
    return "unrecognised image format"


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this Pillow build can open (AVIF and JPEG 2000 are optional)."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def _refused_format(head: bytes) -> str | None:
    """The name of a registered format outside ACCEPTED_FORMATS whose signature check accepts ``head``. Only
    the formats' cheap prefix checks run; none of their decoders."""
    Image.init()
    for format_name in Image.ID:
        if format_name in ACCEPTED_FORMATS:
            continue
        _, accept = Image.OPEN[format_name]
        try:
            if accept and accept(head):
                return format_name
        except Exception:  # a signature check that chokes on 16 bytes recognises nothing
            continue
    return None


def _load_first_frame(im: Image.Image, name: str, max_pixels: int | None) -> None:
    # Image.open leaves animated / multi-page files on their first frame; load() decodes all of it, so a
    # truncated file fails here (verify() would let it through).
    try:
        im.load()
    except _BOMB_ERRORS as e:
        raise _pil_bomb_error(e, name, max_pixels) from None
    except Exception as e:  # decoders raise many types on malformed data; the file is the culprit
        raise ImageLoadError(
            f"{name}: cannot decode image, the file is corrupt or truncated ({_describe(e)})"
        ) from None


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
    try:
        return _convert_to_rgb(im)
    except Exception as e:  # an odd mode, or transparency data that does not fit the mode
        raise ImageLoadError(f"{name}: cannot convert mode {im.mode} to RGB ({_describe(e)})") from None


def _convert_to_rgb(im: Image.Image) -> Image.Image:
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
    return im.convert("RGB")


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


# The conversions below work on blocks of about this many values, so that their float64 / uint32 temporaries cost a
# few MB whatever the image size: peak memory stays a small multiple of the decoded image (tests/processing/test_fuzz_images.py).
_BLOCK_VALUES = 1 << 20


def _blocks(a: np.ndarray) -> Iterator[slice]:
    """Slices of ``a``'s rows holding about _BLOCK_VALUES values each."""
    rows = max(1, _BLOCK_VALUES // max(1, a[:1].size))
    for start in range(0, a.shape[0], rows):
        yield slice(start, start + rows)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    # round(v / 257) in integers: (v + 128) // 257 maps 0 -> 0, 65535 -> 255, 257 * k -> k.
    out = np.empty(a.shape, dtype=np.uint8)
    for rows in _blocks(a):
        out[rows] = (a[rows].astype(np.uint32) + 128) // 257
    return out


def _int32_to_uint8(a: np.ndarray) -> np.ndarray:
    low, high = int(a.min()), int(a.max())
    if low >= 0 and high <= 65535:
        return _uint16_to_uint8(a)
    return _scale(a, low, 255.0 / (high - low) if high > low else 0.0)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    # NaN and infinities count as 0, for the range as for the values.
    low, high = np.inf, -np.inf
    for rows in _blocks(a):
        block = a[rows]
        finite = np.isfinite(block)
        if not finite.all():
            low, high, block = min(low, 0.0), max(high, 0.0), block[finite]
        if block.size:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    if low >= 0.0 and high <= 1.0:
        return _scale(a, 0.0, 255.0)
    return _scale(a, low, 255.0 / (high - low) if high > low else 0.0)


def _scale(a: np.ndarray, offset: float, factor: float) -> np.ndarray:
    """``rint((a - offset) * factor)`` as uint8 (the range is known to land in [0, 255]); non-finite values count as 0."""
    out = np.empty(a.shape, dtype=np.uint8)
    for rows in _blocks(a):
        block = np.nan_to_num(a[rows].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        out[rows] = np.rint((block - offset) * factor)
    return out


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

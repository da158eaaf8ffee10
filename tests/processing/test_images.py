"""vila_hd.images.load_image: every source kind, every mode, and every way a file can be bad."""

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vila_hd.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

WHITE = (255, 255, 255)
RED = (255, 0, 0)


def _save(tmp_path, im: Image.Image, name: str, **kwargs) -> str:
    path = tmp_path / name
    im.save(path, **kwargs)
    return str(path)


def _rgb_at(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def _close(a, b, tol=2) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ modes


def test_error_type_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)
    assert DEFAULT_MAX_PIXELS == 178_956_970


def test_rgb_png_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(a), "rgb.png")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (11, 7)
    np.testing.assert_array_equal(np.asarray(out), a)


def test_mode_1(tmp_path):
    im = Image.new("1", (5, 4), 0)
    im.putpixel((1, 1), 1)
    out = load_image(_save(tmp_path, im, "bw.png"))
    assert out.size == (5, 4)
    assert _rgb_at(out) == (0, 0, 0) and _rgb_at(out, (1, 1)) == WHITE


def test_mode_l(tmp_path):
    out = load_image(_save(tmp_path, Image.new("L", (6, 3), 100), "gray.png"))
    assert out.size == (6, 3) and _rgb_at(out) == (100, 100, 100)


def test_mode_p_without_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    out = load_image(_save(tmp_path, im, "pal.png"))
    assert _rgb_at(out) == RED


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_mode_p_with_transparency_goes_on_white(tmp_path, ext):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((3, 3), 1)
    out = load_image(_save(tmp_path, im, f"pal_t.{ext}", transparency=0))
    assert _rgb_at(out) == WHITE  # the transparent index
    assert _rgb_at(out, (3, 3)) == RED


def test_mode_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image(_save(tmp_path, im, "rgba.png"))
    assert _rgb_at(out, (0, 0)) == WHITE
    assert _rgb_at(out, (1, 0)) == RED
    assert _close(_rgb_at(out, (2, 0)), (127, 127, 127))


def test_mode_la_composited_on_white(tmp_path):
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (50, 255))
    out = load_image(_save(tmp_path, im, "la.png"))
    assert _rgb_at(out, (0, 0)) == WHITE and _rgb_at(out, (1, 0)) == (50, 50, 50)


def test_rgb_with_transparency_key_goes_on_white(tmp_path):
    im = Image.new("RGB", (2, 1), (0, 255, 0))
    im.putpixel((1, 0), RED)
    out = load_image(_save(tmp_path, im, "trns.png", transparency=(0, 255, 0)))
    assert _rgb_at(out, (0, 0)) == WHITE and _rgb_at(out, (1, 0)) == RED


def test_mode_cmyk(tmp_path):
    out = load_image(_save(tmp_path, Image.new("CMYK", (4, 2), (255, 0, 0, 0)), "cmyk.tif"))
    assert out.size == (4, 2) and _rgb_at(out) == (0, 255, 255)


def test_mode_cmyk_jpeg(tmp_path):
    out = load_image(_save(tmp_path, Image.new("CMYK", (16, 16), (0, 0, 0, 255)), "cmyk.jpg"))
    assert out.size == (16, 16) and _close(_rgb_at(out), (0, 0, 0), tol=8)


def test_mode_lab_tiff(tmp_path):
    out = load_image(_save(tmp_path, Image.new("LAB", (3, 3), (255, 128, 128)), "lab.tif"))
    assert _close(_rgb_at(out), WHITE, tol=3)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("YCbCr", (255, 128, 128), WHITE),
        ("HSV", (0, 255, 255), RED),
        ("LAB", (0, 128, 128), (0, 0, 0)),
        ("PA", (1, 255), RED),
        ("PA", (1, 0), WHITE),
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("RGBa", (128, 0, 0, 128), (255, 127, 127)),
        ("La", (0, 0), WHITE),
    ],
)
def test_in_memory_modes(mode, value, expected):
    im = Image.new(mode, (3, 2), value)
    if mode == "PA":
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6), "RGB")
    out = load_image(im)
    assert out.size == (3, 2)
    assert _close(_rgb_at(out), expected), (mode, _rgb_at(out))


def test_16_bit_png_divides_by_257(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = load_image(_save(tmp_path, im, "gray16.png"))
    assert [p[0] for p in np.asarray(out)[0]] == [0, 100, 255]


def test_16_bit_big_endian_in_memory():
    im = Image.new("I;16B", (2, 2), 65535)
    assert _rgb_at(load_image(im)) == WHITE


def test_mode_i_in_16_bit_range_divides_by_257(tmp_path):
    im = Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32))
    assert im.mode == "I"
    out = load_image(_save(tmp_path, im, "int32.tif"))
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0, 10, 255])


def test_mode_i_outside_16_bit_range_is_stretched():
    im = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    out = load_image(im)
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0, 128, 255])


def test_mode_f_unit_range_scales_by_255(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert im.mode == "F"
    out = load_image(_save(tmp_path, im, "float.tif"))
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0, 128, 255])


def test_mode_f_other_range_is_stretched_and_nan_is_zero():
    im = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(im))[0, :, 0], [0, 128, 255, 128])


# --------------------------------------------------------------------------------------- orientation, frames


def _oriented_jpeg(tmp_path, orientation: int) -> str:
    im = Image.new("RGB", (40, 20), WHITE)
    im.paste(RED, (0, 0, 10, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(tmp_path, im, f"exif{orientation}.jpg", exif=exif.tobytes(), quality=95)


def test_exif_orientation_6_rotates(tmp_path):
    out = load_image(_oriented_jpeg(tmp_path, 6))
    assert out.size == (20, 40)
    # orientation 6 = rotate 90 degrees clockwise for display: stored top-left ends up top-right
    assert _close(_rgb_at(out, (15, 4)), RED, tol=20)
    assert _close(_rgb_at(out, (4, 4)), WHITE, tol=20)


def test_exif_orientation_on_pil_input_leaves_caller_image_alone(tmp_path):
    with Image.open(_oriented_jpeg(tmp_path, 6)) as im:
        out = load_image(im)
        assert out.size == (20, 40)
        assert im.size == (40, 20)


def test_animated_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    out = load_image(str(path))
    assert out.size == (8, 6) and _rgb_at(out) == RED


@pytest.mark.parametrize("ext", ["png", "webp", "tif"])
def test_multi_frame_formats_take_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / f"multi.{ext}"
    kwargs = {"lossless": True} if ext == "webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], **kwargs)
    out = load_image(path)
    assert out.size == (8, 6) and _close(_rgb_at(out), RED)
    # the result is detached from the (closed) file
    assert out.copy().getpixel((0, 0)) == out.getpixel((0, 0))


# -------------------------------------------------------------------------------------------- bad files


def test_truncated_jpeg_is_an_error_naming_the_path(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = tmp_path / "cut.jpg"
    Image.fromarray(a).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        im.verify()  # the reason for load(): verify() does not notice
    with pytest.raises(ImageLoadError, match="truncated") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_file_fails_even_if_someone_set_load_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="unrecognised image format") as err:
        load_image(path)
    assert str(path) in str(err.value) and "empty" in str(err.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="unrecognised image format") as err:
        load_image(str(path))
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(ImageLoadError, match="not found") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory") as err:
        load_image(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_garbage_bytes_name_the_source():
    with pytest.raises(ImageLoadError, match=r"<5 bytes>: unrecognised image format"):
        load_image(b"hello")


def test_unsupported_source_type():
    with pytest.raises(ImageLoadError, match="int"):
        load_image(42)


# ------------------------------------------------------------------------------------------ pixel limits


@pytest.fixture
def big_png(tmp_path) -> str:
    return _save(tmp_path, Image.new("RGB", (2000, 2000), RED), "big.png")


@pytest.mark.parametrize("max_pixels", [1_000_000, 3_000_000])  # above and below Pillow's 2x error threshold
def test_pixel_limit(big_png, max_pixels):
    with pytest.raises(ImageLoadError, match=f"max_pixels={max_pixels}") as err:
        load_image(big_png, max_pixels=max_pixels)
    assert big_png in str(err.value) and "4000000 pixels" in str(err.value)
    assert load_image(big_png, max_pixels=4_000_000).size == (2000, 2000)
    assert load_image(big_png, max_pixels=None).size == (2000, 2000)


def test_pixel_limit_leaves_pillow_globals_alone(big_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # someone set a tiny global limit
    filters_before = list(warnings.filters)
    assert load_image(big_png).size == (2000, 2000)  # our limit is the one that counts
    with pytest.raises(ImageLoadError):
        load_image(big_png, max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert list(warnings.filters) == filters_before


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def test_header_only_bomb_is_refused_before_decoding():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 8-bit gray pixels
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    png += _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b"")
    with pytest.raises(ImageLoadError, match="above the limit max_pixels=") as err:
        load_image(png)
    assert "raise max_pixels if you trust this file" in str(err.value)


def test_pixel_limit_on_in_memory_sources_reports_the_size():
    with pytest.raises(ImageLoadError, match=r"30 x 20 = 600 pixels.*max_pixels=100"):
        load_image(Image.new("RGB", (30, 20)), max_pixels=100)
    with pytest.raises(ImageLoadError, match=r"30 x 20 = 600 pixels"):
        load_image(np.zeros((20, 30, 3), np.uint8), max_pixels=100)


def test_concurrent_loads_with_different_limits(big_png, tmp_path):
    small = _save(tmp_path, Image.new("RGB", (10, 10), RED), "small.png")

    def job(i: int):
        limit = 1_000_000 if i % 2 else None
        try:
            return load_image(big_png if i % 3 == 0 else small, max_pixels=limit).size
        except ImageLoadError:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(12)))
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result == ("refused" if i % 2 else (2000, 2000))
        else:
            assert result == (10, 10)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 and ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------------------------------------- other source kinds


def test_bytes_and_file_like_sources(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (9, 5), RED), "x.png")
    data = open(path, "rb").read()
    for source in (data, bytearray(data), io.BytesIO(data)):
        out = load_image(source)
        assert out.size == (9, 5) and _rgb_at(out) == RED
    with open(path, "rb") as f:
        assert load_image(f).size == (9, 5)
        assert not f.closed  # the caller's file stays the caller's


def test_file_like_error_names_the_file(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"not a jpeg at all")
    with open(path, "rb") as f, pytest.raises(ImageLoadError, match="bad.jpg: unrecognised image format"):
        load_image(f)


def test_pil_rgb_passthrough_keeps_size_and_pixels():
    im = Image.new("RGB", (123, 45), (1, 2, 3))
    out = load_image(im)
    assert out.size == (123, 45) and _rgb_at(out) == (1, 2, 3)


def test_pil_lazy_image_is_fully_decoded(tmp_path):
    path = _save(tmp_path, Image.new("L", (8, 8), 7), "lazy.png")
    with Image.open(path) as im:
        out = load_image(im)
    assert out.mode == "RGB" and _rgb_at(out) == (7, 7, 7)


# ----------------------------------------------------------------------------------------- numpy arrays


def test_numpy_uint8_hwc_and_copy_semantics():
    a = np.zeros((4, 6, 3), np.uint8)
    a[..., 0] = 255
    out = load_image(a)
    assert out.size == (6, 4) and _rgb_at(out) == RED
    a[:] = 0
    assert _rgb_at(out) == RED  # not a view of the caller's array


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1)])
def test_numpy_gray(shape):
    out = load_image(np.full(shape, 77, np.uint8))
    assert out.size == (6, 4) and _rgb_at(out) == (77, 77, 77)


def test_numpy_rgba_on_white():
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)
    out = load_image(a)
    assert _rgb_at(out, (0, 0)) == RED and _rgb_at(out, (1, 1)) == WHITE


def test_numpy_float_uint16_bool():
    assert _rgb_at(load_image(np.full((2, 3, 3), 0.5, np.float32))) == (128, 128, 128)
    assert _rgb_at(load_image(np.ones((2, 3), np.float64))) == WHITE
    assert _rgb_at(load_image(np.full((2, 3), 65535, np.uint16))) == WHITE
    assert _rgb_at(load_image(np.full((2, 3, 3), 257 * 9, np.uint16))) == (9, 9, 9)
    b = np.zeros((2, 3), bool)
    b[0, 1] = True
    out = load_image(b)
    assert _rgb_at(out, (0, 0)) == (0, 0, 0) and _rgb_at(out, (1, 0)) == WHITE


@pytest.mark.parametrize("shape", [(4, 6, 2), (4, 6, 5), (10,), (1, 4, 6, 3), (0, 5, 3)])
def test_numpy_bad_shapes_name_the_shape(shape):
    with pytest.raises(ImageLoadError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        load_image(np.zeros(shape, np.uint8))


def test_numpy_bad_values_and_dtypes():
    with pytest.raises(ImageLoadError, match=r"\[0, 1\], got values in \[0, 255\]"):
        load_image(np.linspace(0.0, 255.0, 12, dtype=np.float32).reshape(2, 2, 3))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageLoadError, match="int64"):
        load_image(np.zeros((2, 2, 3), np.int64))


# ---------------------------------------------------------------------------------------- torch tensors


def test_torch_chw_and_hwc_uint8():
    chw = torch.zeros(3, 5, 7, dtype=torch.uint8)
    chw[0] = 255
    out = load_image(chw)
    assert out.size == (7, 5) and _rgb_at(out) == RED
    out = load_image(chw.permute(1, 2, 0))
    assert out.size == (7, 5) and _rgb_at(out) == RED


def test_torch_float_bf16_grad_and_gray():
    t = torch.full((3, 4, 6), 0.5, requires_grad=True)
    assert _rgb_at(load_image(t)) == (128, 128, 128)
    assert _rgb_at(load_image(torch.ones(3, 4, 6, dtype=torch.bfloat16))) == WHITE
    out = load_image(torch.full((1, 4, 6), 0.2))
    assert out.size == (6, 4) and _rgb_at(out) == (51, 51, 51)
    assert load_image(torch.zeros(4, 6, dtype=torch.uint8)).size == (6, 4)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 3, 5, 7), (5, 7, 6)])
def test_torch_bad_shapes(shape):
    with pytest.raises(ImageLoadError, match="torch tensor of shape"):
        load_image(torch.zeros(shape, dtype=torch.uint8))

"""Image input fuzzing: mutated JPEG / PNG / WebP / TIFF / GIF / BMP / PPM / ICO files, truncations, bombs and
odd paths through ``load_image`` and the PS3 image processor.

The property: every case ends in a finite (3, S, S) tensor in [-1, 1], or an ``ImageLoadError`` whose message names
the source. Never another exception type, a hang (each case runs under an alarm), a crash of the process or memory
beyond what ``max_pixels`` allows (a child process fuzzes under an address-space limit and reports its peak RSS).

The default run tries a few hundred cases; ``pytest --reliability-full`` (``python -m tests.reliability``) tries
thousands. The counts go to docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import testpaths
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vila_hd.images import ImageLoadError, load_image
from vila_hd.ps3.image_processing import PS3ImageProcessor

SIZE = 32  # processor output side: the decode is what is fuzzed, not the resize
FUZZ_MAX_PIXELS = 1 << 22  # 4.2 M pixels: mutated headers may claim anything up to this
CASE_SECONDS = 10.0  # one decode of a <= 4 M pixel image takes milliseconds; 10 s means a hang
TESTS = testpaths.TESTS_DIR
ROOT = os.path.dirname(TESTS)
HERE = os.path.dirname(os.path.abspath(__file__))  # this module, which the child process imports


# --- the seed corpus --------------------------------------------------------------------------------------------
def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(height: int = 24, width: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new("RGB", (20, 12), c).convert(mode) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]


@functools.cache
def seed_corpus() -> dict[str, bytes]:
    """Small valid files, one per format / mode / feature the loader handles."""
    rgb = _noise()
    gray16 = Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257)
    floats = Image.fromarray(np.asarray(rgb)[..., 0].astype(np.float32) / 200.0)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette_trns = rgb.convert("P")
    red, blue, green = _frames()
    corpus = {
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_gray": _encode(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_exif_rotated": _encode(rgb, "JPEG", exif=exif),
        "png": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png_palette_transparent": _encode(palette_trns, "PNG", transparency=3),
        "png_gray": _encode(rgb.convert("L"), "PNG"),
        "png_16bit": _encode(gray16, "PNG"),
        "png_1bit": _encode(rgb.convert("1"), "PNG"),
        "png_la": _encode(rgb.convert("LA"), "PNG"),
        "apng": _encode(red, "PNG", save_all=True, append_images=[blue, green], duration=10),
        "webp": _encode(rgb, "WEBP", quality=80),
        "webp_lossless_rgba": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp_animated": _encode(red, "WEBP", save_all=True, append_images=[blue, green], lossless=True),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_lzw": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff_deflate": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff_jpeg": _encode(rgb, "TIFF", compression="jpeg"),
        "tiff_packbits": _encode(rgb, "TIFF", compression="packbits"),
        "tiff_cmyk": _encode(rgb.convert("CMYK"), "TIFF"),
        "tiff_16bit": _encode(gray16, "TIFF"),
        "tiff_float": _encode(floats, "TIFF"),
        "tiff_multipage": _encode(red, "TIFF", save_all=True, append_images=[blue]),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "gif_transparent": _encode(palette_trns, "GIF", transparency=3),
        "gif_animated": _encode(red.convert("P"), "GIF", save_all=True, append_images=[b.convert("P") for b in (blue, green)],
                                duration=10, loop=0),
        "bmp": _encode(rgb, "BMP"),
        "ppm_16bit": _encode(gray16, "PPM"),
        "ico": _encode(rgb, "ICO"),
    }
    return corpus


SEED_NAMES = sorted(seed_corpus())


# --- mutations --------------------------------------------------------------------------------------------------
# Header fields set to these catch size / offset / count overflows.
EXTREME_WORDS = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x00",
                 b"\x00\x01\x00\x00", b"\x00\x00\x01\x00", b"\xff\xff\x00\x00", b"\x00\x00\xff\xff"]


def set_dims(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the size a PNG / GIF / BMP / JPEG / TIFF / PPM header claims (PNG CRC kept valid); other data as is."""
    out = bytearray(data)
    if out.startswith(b"\x89PNG") and len(out) >= 33:
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif out.startswith(b"GIF") and len(out) >= 10:
        out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif out.startswith(b"BM") and len(out) >= 26:
        out[18:26] = struct.pack("<ii", width, height)
    elif out.startswith(b"\xff\xd8"):
        sof = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
        if 0 < sof < len(out) - 9:
            out[sof + 5 : sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif out.startswith(b"II*\x00") and len(out) >= 8:
        ifd = struct.unpack_from("<I", out, 4)[0]
        count = struct.unpack_from("<H", out, ifd)[0] if ifd + 2 <= len(out) else 0
        for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(out) - 11), 12):
            tag, kind = struct.unpack_from("<HH", out, entry)
            if tag in (256, 257):
                value = width if tag == 256 else height
                out[entry + 8 : entry + 12] = struct.pack("<I" if kind == 4 else "<HH", *(
                    (value,) if kind == 4 else (value & 0xFFFF, 0)))
    elif out[:2] in (b"P5", b"P6"):
        fields = bytes(out).split(maxsplit=4)
        if len(fields) == 5:
            return b"%s\n%d %d\n%s\n%s" % (fields[0], width, height, fields[3], fields[4])
    return bytes(out)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply mutation operations (see ``OPS`` / ``random_ops``); positions wrap around the data length."""
    out = bytearray(data)
    corpus = seed_corpus()
    for op in ops:
        kind, pos = op[0], op[1] % (len(out) + 1)
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip" and out:
            out[pos % len(out)] ^= 1 << op[2]
        elif kind == "set" and out:
            out[pos % len(out)] = op[2]
        elif kind == "insert":
            out[pos:pos] = op[2]
        elif kind == "delete":
            del out[pos : pos + op[2]]
        elif kind == "word" and len(out) >= 4:  # header fields live near the start
            at = op[1] % min(len(out) - 3, 256)
            out[at : at + 4] = op[2]
        elif kind == "splice":
            other = corpus[op[2]]
            out[pos:] = other[op[3] % (len(other) + 1) :]
        elif kind == "repeat":
            chunk = bytes(out[pos : pos + op[2]])
            out[pos:pos] = chunk * op[3]
        elif kind == "dims":
            out = bytearray(set_dims(bytes(out), op[1], op[2]))
    return bytes(out)


POS = st.integers(0, 1 << 20)
# Sides around the interesting sizes: 1, the fuzz pixel limit (2048 x 2048), 16-bit and 14-bit (WebP) limits.
SIDE = st.one_of(st.integers(1, 70_000), st.sampled_from([1, 2047, 2048, 2049, 16383, 16384, 30000, 65535, 65536]))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), POS),
        st.tuples(st.just("flip"), POS, st.integers(0, 7)),
        st.tuples(st.just("set"), POS, st.integers(0, 255)),
        st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("delete"), POS, st.integers(1, 64)),
        st.tuples(st.just("word"), POS, st.sampled_from(EXTREME_WORDS)),
        st.tuples(st.just("splice"), POS, st.sampled_from(SEED_NAMES), POS),
        st.tuples(st.just("repeat"), POS, st.integers(1, 64), st.integers(2, 40)),
        st.tuples(st.just("dims"), SIDE, SIDE),
    ),
    min_size=1,
    max_size=4,
)
VIAS = ["bytes", "path", "file"]


def random_ops(rng: random.Random) -> list[tuple]:
    """The same operations as ``OPS``, drawn from a seeded ``random.Random`` (the child-process fuzzer)."""
    ops = []
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(1 << 20)
        kind = rng.choice(["truncate", "flip", "set", "insert", "delete", "word", "splice", "repeat", "dims"])
        if kind == "truncate":
            ops.append((kind, pos))
        elif kind == "flip":
            ops.append((kind, pos, rng.randrange(8)))
        elif kind == "set":
            ops.append((kind, pos, rng.randrange(256)))
        elif kind == "insert":
            ops.append((kind, pos, bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))))
        elif kind == "delete":
            ops.append((kind, pos, rng.randint(1, 64)))
        elif kind == "word":
            ops.append((kind, pos, rng.choice(EXTREME_WORDS)))
        elif kind == "splice":
            ops.append((kind, pos, rng.choice(SEED_NAMES), rng.randrange(1 << 20)))
        elif kind == "dims":  # often close to the pixel limit, where decoding costs the most memory
            width = rng.choice([1, 200, 2048, 4096, 30000, rng.randint(1, 70_000)])
            ops.append((kind, width, max(1, rng.randint(1, 2 * FUZZ_MAX_PIXELS // width))))
        else:
            ops.append((kind, pos, rng.randint(1, 64), rng.randint(2, 40)))
    return ops


# --- running one case -------------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """A case ran past CASE_SECONDS (a BaseException, so that no ``except Exception`` in the code swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the block after ``seconds`` (SIGALRM; decoders return to Python between chunks)."""
    if not hasattr(signal, "setitimer") or sys.modules["threading"].current_thread().name != "MainThread":
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Upload(io.BytesIO):
    name = "upload.bin"


@functools.cache
def processor(max_pixels: int | None = FUZZ_MAX_PIXELS) -> PS3ImageProcessor:
    return PS3ImageProcessor(image_size=SIZE, max_pixels=max_pixels)


def exercise(data: bytes, via: str, folder: str, max_pixels: int | None = FUZZ_MAX_PIXELS) -> str:
    """Preprocess ``data`` given as bytes, a path or a file object. Returns ``"tensor"`` or ``"error"`` (an
    ``ImageLoadError`` naming the source); anything else raises."""
    if via == "path":
        path = os.path.join(folder, "case.img")
        with open(path, "wb") as f:
            f.write(data)
        source, name = path, path
    elif via == "file":
        source, name = _Upload(data), _Upload.name
    else:
        source, name = data, f"<{len(data)} bytes>"
    return check_outcome(source, name, max_pixels)


def check_outcome(source, name: str, max_pixels: int | None = FUZZ_MAX_PIXELS) -> str:
    try:
        with time_limit(CASE_SECONDS):
            pixel_values = processor(max_pixels).preprocess([source])["pixel_values"]
    except ImageLoadError as err:
        assert name in str(err), f"the error does not name the source {name!r}: {err}"
        return "error"
    assert pixel_values.shape == (1, 3, SIZE, SIZE) and pixel_values.dtype == torch.float32
    assert bool(torch.isfinite(pixel_values).all())
    assert float(pixel_values.min()) >= -1.0 - 1e-5 and float(pixel_values.max()) <= 1.0 + 1e-5
    return "tensor"


# --- hypothesis: mutated files in this process ------------------------------------------------------------------
def test_mutated_files_end_in_a_tensor_or_a_typed_error(reliability, tmp_path):
    outcomes = {"tensor": 0, "error": 0}
    n = reliability.count(300, 5000)

    @settings(max_examples=n, deadline=None, database=None, derandomize=not reliability.full,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(name=st.sampled_from(SEED_NAMES), ops=OPS, via=st.sampled_from(VIAS))
    def case(name, ops, via):
        outcomes[exercise(mutate(seed_corpus()[name], ops), via, str(tmp_path))] += 1

    start = time.perf_counter()
    case()
    tried = sum(outcomes.values())
    assert tried >= n // 2 and outcomes["tensor"] and outcomes["error"], outcomes
    reliability.add("images", "hypothesis_cases", tried)
    reliability.add("images", "hypothesis_tensors", outcomes["tensor"])
    reliability.add("images", "hypothesis_errors", outcomes["error"])
    reliability.add("images", "hypothesis_seconds", round(time.perf_counter() - start, 1))


ARRAY_DTYPES = [np.uint8, np.uint16, np.bool_, np.float32, np.float64, np.int32, np.int64, np.float16, np.complex64]


def test_arbitrary_arrays_and_tensors_end_in_a_tensor_or_a_typed_error(reliability):
    outcomes = {"tensor": 0, "error": 0}

    @settings(max_examples=reliability.count(60, 1000), deadline=None, database=None,
              derandomize=not reliability.full)
    @given(array=hnp.arrays(st.sampled_from(ARRAY_DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)),
           as_tensor=st.booleans())
    def case(array, as_tensor):
        source = array
        if as_tensor and array.dtype not in (np.uint16, np.complex64):  # dtypes torch lacks / cannot hold
            source = torch.from_numpy(np.ascontiguousarray(array))
        name = "torch tensor" if isinstance(source, torch.Tensor) else "numpy array"
        outcomes[check_outcome(source, name)] += 1

    case()
    assert outcomes["tensor"] and outcomes["error"], outcomes
    reliability.add("images", "array_cases", sum(outcomes.values()))


# --- named cases from the issue ---------------------------------------------------------------------------------
def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a header-only decompression bomb."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _bomb(fmt: str) -> bytes:
    """A small file whose header claims about 4 billion pixels (65535 x 65535 where the field is 16 bits)."""
    small = Image.new("RGB", (16, 8))
    if fmt == "png":
        return _png_with_size(100_000, 100_000)
    if fmt == "gif":
        data = bytearray(_encode(small.convert("P"), "GIF"))
        data[6:10] = struct.pack("<HH", 65535, 65535)
        return bytes(data)
    if fmt == "bmp":
        data = bytearray(_encode(small, "BMP"))
        data[18:26] = struct.pack("<ii", 100_000, 100_000)
        return bytes(data)
    if fmt == "jpeg":
        data = bytearray(_encode(small, "JPEG"))
        sof = data.find(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 65535, 65535)
        return bytes(data)
    if fmt == "tiff":  # a hand-made one-strip grey TIFF: IFD entries (tag, type, count, value), 3 = SHORT, 4 = LONG
        tags = [(256, 4, 1, 100_000), (257, 4, 1, 100_000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, 100_000), (279, 4, 1, 1)]
        ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
        return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00"
    if fmt == "webp":  # VP8L: 14-bit width - 1 and height - 1 after the signature byte
        data = bytearray(_encode(small, "WEBP", lossless=True))
        at = data.find(b"VP8L") + 9
        bits = int.from_bytes(data[at : at + 4], "little")
        data[at : at + 4] = ((bits & ~((1 << 28) - 1)) | 0x3FFF | (0x3FFF << 14)).to_bytes(4, "little")
        return bytes(data)
    if fmt == "ppm":
        return b"P6\n100000 100000\n255\n" + bytes(48)
    raise ValueError(fmt)


BOMB_FORMATS = ["png", "gif", "bmp", "jpeg", "tiff", "webp", "ppm"]


@pytest.mark.parametrize("fmt", BOMB_FORMATS)
def test_decompression_bomb_headers_are_refused_before_decoding(fmt, reliability):
    data = _bomb(fmt)
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="above the limit max_pixels=") as err:
        processor().preprocess([data])
    assert time.perf_counter() - start < 1.0
    assert f"<{len(data)} bytes>" in str(err.value)
    # the default limit (179 M pixels) refuses them too: none is below a billion pixels
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_image(data)
    reliability.add("images", "bomb_headers", 1)


def _first_frame_red(pixel_values: torch.Tensor) -> bool:
    r, g, b = (pixel_values[0, :, SIZE // 2, SIZE // 2] * 0.5 + 0.5).tolist()
    return r > 0.9 and g < 0.1 and b < 0.1


@pytest.mark.parametrize("name", ["apng", "webp_animated", "gif_animated", "tiff_multipage"])
def test_animated_and_multi_page_files_give_their_first_frame(name):
    pixel_values = processor().preprocess([seed_corpus()[name]])["pixel_values"]
    assert _first_frame_red(pixel_values)


SPECIAL = {
    "1x1_png": lambda: _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    "1x1_jpeg": lambda: _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "JPEG"),
    "1x1_gif": lambda: _encode(Image.new("P", (1, 1)), "GIF"),
    "1x1_webp": lambda: _encode(Image.new("RGB", (1, 1)), "WEBP"),
    "1x1_tiff": lambda: _encode(Image.new("L", (1, 1)), "TIFF"),
    "30000x200_png": lambda: _encode(Image.new("RGB", (30000, 200), (255, 0, 0)), "PNG"),
    "200x30000_jpeg": lambda: _encode(Image.new("RGB", (200, 30000), (255, 0, 0)), "JPEG"),
    "16383x200_webp": lambda: _encode(Image.new("L", (16383, 200)), "WEBP"),  # WebP's largest side
    "16bit_png": lambda: seed_corpus()["png_16bit"],
    "16bit_tiff": lambda: seed_corpus()["tiff_16bit"],
    "float_tiff": lambda: seed_corpus()["tiff_float"],
    "cmyk_jpeg": lambda: seed_corpus()["jpeg_cmyk"],
    "cmyk_tiff": lambda: seed_corpus()["tiff_cmyk"],
    "palette_png": lambda: seed_corpus()["png_palette_transparent"],
    "palette_gif": lambda: seed_corpus()["gif_transparent"],
}


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_sizes_and_modes_give_a_tensor(name):
    pixel_values = processor(None).preprocess([SPECIAL[name]()])["pixel_values"]
    assert pixel_values.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(pixel_values).all())
    if name.startswith(("1x1_png", "1x1_jpeg", "30000", "200x")) and "webp" not in name:
        assert _first_frame_red(pixel_values)


def test_zero_byte_and_truncated_files(tmp_path, reliability):
    assert exercise(b"", "path", str(tmp_path)) == "error"
    assert exercise(b"", "bytes", str(tmp_path)) == "error"
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    outcomes = {"tensor": 0, "error": 0}
    for data in seed_corpus().values():
        for cut in sorted({1, 8, len(data) // 4, len(data) // 2, 3 * len(data) // 4, len(data) - 1}):
            outcomes[exercise(data[:cut], "bytes", str(tmp_path))] += 1
    # a JPEG cut in half is always an error (only a full decode notices; verify() would not)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(seed_corpus()["jpeg"][: len(seed_corpus()["jpeg"]) // 2])
    assert outcomes["error"] > outcomes["tensor"]
    reliability.add("images", "truncated_cases", sum(outcomes.values()) + 2)


def test_paths_that_are_not_regular_files(tmp_path, reliability):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    cases = {str(loop): "symbolic links", str(tmp_path): "directory", "/dev/zero": "not a regular file",
             str(tmp_path / "missing.png"): "not found", str(tmp_path / "nul\0.png"): "not a usable path"}
    if hasattr(os, "mkfifo"):  # a FIFO would block the loader forever if it were opened
        os.mkfifo(tmp_path / "fifo.png")
        cases[str(tmp_path / "fifo.png")] = "not a regular file"
    for path, reason in cases.items():
        with time_limit(CASE_SECONDS), pytest.raises(ImageLoadError, match=reason) as err:
            load_image(path)
        assert repr(path)[1:-1] in str(err.value) or path in str(err.value)
    reliability.add("images", "odd_paths", len(cases))


def test_formats_run_by_interpreters_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageLoadError, match="EPS images are not accepted"):
        load_image(eps)
    # a PIL image the caller opened itself is taken whatever its format
    assert load_image(Image.new("LAB", (2, 2))).mode == "RGB"


# --- a child process: crash isolation, address-space limit, peak memory -----------------------------------------
def child_main(argv: list[str]) -> None:
    """``python -c ... CASES SEED FOLDER``: fuzz with ``random_ops`` and print one JSON line of results.

    Before each case its description goes to FOLDER/current.json, so a crash of the process names the case."""
    import resource

    cases, seed, folder = int(argv[0]), int(argv[1]), argv[2]
    rng = random.Random(seed)
    exercise(seed_corpus()["png"], "bytes", folder)  # warm up: imports, plugin registration, first allocations
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (virtual + (3 << 30), resource.RLIM_INFINITY))
    outcomes, failures = {"tensor": 0, "error": 0}, []
    slowest = 0.0
    for i in range(cases):
        name, ops, via = rng.choice(SEED_NAMES), random_ops(rng), rng.choice(VIAS)
        with open(os.path.join(folder, "current.json"), "w") as f:
            json.dump({"case": i, "seed": name, "ops": repr(ops), "via": via}, f)
        start = time.perf_counter()
        try:
            outcomes[exercise(mutate(seed_corpus()[name], ops), via, folder)] += 1
        except BaseException as err:  # noqa: B036 - the report must name every failure, hangs included
            failures.append({"seed": name, "ops": repr(ops), "via": via, "error": f"{type(err).__name__}: {err}"})
        slowest = max(slowest, time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"cases": cases, **outcomes, "failures": failures[:20], "n_failures": len(failures),
                      "peak_growth_mb": round((peak_kb - baseline_kb) / 1024, 1), "slowest_s": round(slowest, 3)}))


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and RLIMIT_AS")
def test_fuzz_in_a_child_process_with_bounded_memory(tmp_path, reliability):
    cases = reliability.count(600, 30000)
    seed = random.randrange(1 << 30) if reliability.full else 1234
    code = f"import sys; sys.path[:0] = [{HERE!r}, {TESTS!r}, {ROOT!r}]; import test_fuzz_images as t; t.child_main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(cases), str(seed), str(tmp_path)],
                          capture_output=True, text=True, timeout=60 + cases * 0.2, cwd=ROOT)
    if proc.returncode != 0:
        current = (tmp_path / "current.json").read_text() if (tmp_path / "current.json").exists() else "?"
        pytest.fail(f"the fuzzing process died (code {proc.returncode}) on case {current}:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n_failures"] == 0, report["failures"]
    # Decoded images are at most FUZZ_MAX_PIXELS; the conversions keep a few copies of them (at most 8 bytes a
    # pixel for float data). A header-only bomb that got through would need gigabytes.
    bound_mb = 48 * FUZZ_MAX_PIXELS / 2**20
    assert report["peak_growth_mb"] < bound_mb, report
    assert report["slowest_s"] < CASE_SECONDS, report
    for key in ("cases", "tensor", "error"):
        reliability.add("images", f"child_{key}", report[key])
    reliability.record("images", "child_peak_growth_mb", max(report["peak_growth_mb"],
                       reliability.figures.get("images", {}).get("child_peak_growth_mb", 0)))
    reliability.record("images", "child_slowest_case_s", report["slowest_s"])
    reliability.record("images", "fuzz_max_pixels", FUZZ_MAX_PIXELS)
    reliability.record("images", "memory_bound_mb", bound_mb)

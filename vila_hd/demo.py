"""The README's main job on an embedded default: encode a generated high-resolution image with PS3 and
save the selection heatmap.

    python -m vila_hd.demo --out outputs/demo                       # tiny random-weight PS3-1.5K, CPU
    python -m vila_hd.demo --model nvidia/PS3-4K-SigLIP2 --image photo.jpg --num-look-close 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .ps3 import PS3ImageProcessor, PS3VisionModel
from .ps3.configuration import tiny_vision_config
from .visualize import save_selection


def generate_image(size: int = 1512, seed: int = 0) -> Image.Image:
    """A cluttered scene with a few small text labels: the kind of detail only high resolution resolves."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randrange(90, 160),) * 3)
    draw = ImageDraw.Draw(img)
    for _ in range(400):
        x, y = rng.randrange(size), rng.randrange(size)
        r = rng.randrange(4, size // 20)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape([x, y, x + r, y + r], fill=colour)
    for _ in range(6):
        x, y = rng.randrange(size - 120), rng.randrange(size - 20)
        draw.rectangle([x - 4, y - 4, x + 110, y + 16], fill="white")
        draw.text((x, y), "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)), fill="black")
    return img


def build_model(model: str | None, seed: int) -> tuple[PS3VisionModel, PS3ImageProcessor]:
    if model:
        return PS3VisionModel.from_pretrained(model), PS3ImageProcessor.from_pretrained(model)
    torch.manual_seed(seed)
    cfg = tiny_vision_config([378, 756, 1512])
    return PS3VisionModel(cfg), PS3ImageProcessor(image_size=cfg.ps3_scales[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vila-hd demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--model", help="PS3 checkpoint directory or hub id (default: tiny random weights)")
    parser.add_argument("--image", help="image file (default: a generated 1512x1512 scene)")
    parser.add_argument("--num-look-close", default="2", help="look-close steps, or 'all' (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.num_look_close if args.num_look_close == "all" else _int_arg(parser, args.num_look_close)

    model, processor = build_model(args.model, args.seed)
    model.eval()
    image = Image.open(args.image).convert("RGB") if args.image else generate_image(seed=args.seed)
    pixels = processor(image)["pixel_values"].to(model.dtype)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(pixels, num_look_close=steps, output_layers=[-1])
    seconds = time.perf_counter() - start

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    image.save(out_dir / "image.png")
    figure = save_selection(image, out.selection_probs, out.selection_maps, out_dir / "selection.png")
    summary = {
        "model": args.model or "tiny random-weight PS3-1.5K (width 32)",
        "image_size": list(image.size),
        "num_look_close": steps,
        "tokens": int(out.last_hidden_state.shape[1]),
        "selected_per_scale": [int(m.sum()) for m in out.selection_maps],
        "patches_per_scale": [m[0].numel() for m in out.selection_maps],
        "encode_seconds": round(seconds, 3),
        "heatmap": str(figure),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def _int_arg(parser, value: str) -> int:
    try:
        steps = int(value)
    except ValueError:
        parser.error(f"--num-look-close must be an integer or 'all', got {value!r}")
    if steps < 0:
        parser.error(f"--num-look-close must be >= 0, got {steps}")
    return steps


if __name__ == "__main__":
    main()

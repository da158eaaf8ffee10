"""PS3 pre-training step speed: samples/s, achieved TFLOP/s and MFU for PS3-1.5K and PS3-4K (SO400M).

One training step of :class:`vila_hd.train.pretrain.model.PS3ForPretraining` (random weights of the real architecture;
speed does not depend on weight values): text tower, low-res pass, GT-forced selection of one 2560-patch step per
image, high-res pass against the low-res K/V, box-masked pooling, SigLIP + selection BCE losses, backward, AdamW.
Parameters in bf16 (as under DeepSpeed bf16; the fp32 master copy and its optimizer update are not timed), batch
of random uint8 images at the model's largest scale, 25% global captions, boxes of 5-20% of the side.

FLOPs follow the trainer's convention (:func:`vila_hd.train.pretrain.loop.pretrain_flops`): 6 x params x tokens for the
trunk (729 low-res + 2560 selected tokens per image) and the text tower (64 tokens), plus attention (not halved);
gradient-checkpointing recomputation is not counted, so MFU is model FLOPs utilisation. Global-caption samples
skip the high-res step (their feature is the low-res pooled one), so their 2560 tokens are not counted. Peak:
989 TFLOP/s (H100 / H200 bf16 dense) unless ``--peak-tflops`` says otherwise.

    python bench/ps3_pretrain.py                                  # CUDA: PS3-1.5K and PS3-4K, bf16, batch 32
    python bench/ps3_pretrain.py --model PS3-4K-SigLIP --batch-size 16 32 --no-grad-checkpointing
    python bench/ps3_pretrain.py --model tiny --device cpu        # runs anywhere; numbers say nothing about GPUs

``--profile DIR``: after the timings, 2 more steps under ``torch.profiler`` (see ``bench/profiling.py``):
DIR/kernels.txt, DIR/summary.json (wall vs GPU busy time, time per kernel category), DIR/trace.json with
``--profile-trace``; with several models / batch sizes, one DIR/<model>_bs<batch> each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from vila_hd.ps3 import preset_config
from vila_hd.train.pretrain.loop import pretrain_flops
from vila_hd.train.pretrain.model import LOSS_TERMS, PS3ForPretraining, loss_counts, pretrain_loss_sums
from vila_hd.train.pretrain.synthetic import tiny_ps3_config

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Row:
    model: str
    batch_size: int
    image_size: int
    patches_per_image: int
    grad_checkpointing: bool
    step_ms: float
    forward_ms: float
    samples_per_s: float
    model_tflop_per_step: float
    achieved_tflops: float
    mfu: float | None
    peak_mem_gib: float | None
    device: str


def build(name: str, device: torch.device, dtype: torch.dtype, grad_ckpt: bool, compile_blocks: bool):
    config = tiny_ps3_config() if name == "tiny" else preset_config(name)
    with torch.device(device):
        model = PS3ForPretraining(config)
    model = model.to(dtype).train()
    model.set_gradient_checkpointing(grad_ckpt)
    if compile_blocks:
        from vila_hd.train.compile import compile_pretraining_blocks
        from vila_hd.train.config import CompileConfig

        compile_pretraining_blocks(model, CompileConfig(enabled=True))
    return model


def make_batch(model: PS3ForPretraining, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.ps3_scales[-1]
    text = model.config.text_config
    width = (torch.rand(batch, generator=g) * 0.15 + 0.05) * side
    x0 = torch.rand(batch, generator=g) * (side - width)
    y0 = torch.rand(batch, generator=g) * (side - width)
    return {
        "pixel_values": torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8).to(device),
        "input_ids": torch.randint(1, text.vocab_size, (batch, text.context_length), generator=g).to(device),
        "boxes": torch.stack([x0, y0, x0 + width, y0 + width], dim=1).to(device),
        "is_global": torch.rand(batch, generator=g) < 0.25,  # kept on the host, as the trainer does
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_one(name: str, batch_size: int, args, device: torch.device, dtype: torch.dtype,
              profile_dir: str | None = None) -> Row:
    model = build(name, device, dtype, not args.no_grad_checkpointing, args.compile)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.param_groups(3e-4), lr=5e-6, betas=(0.9, 0.95), **fused)
    batch = make_batch(model, batch_size, device)

    counts = loss_counts(batch["is_global"])  # on the host, as the trainer's collator gives them

    def total_loss():
        """The trainer's loss (term sums over their counts; weights 1), without reading values on the host."""
        sums = pretrain_loss_sums(model(**batch))
        return sum(sums[k] / max(counts[k], 1) for k in LOSS_TERMS if k in sums)

    def step():
        total_loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            total_loss()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms = median_ms(step, args.iters, args.warmup, device)
    forward_ms = median_ms(forward, args.iters, 1, device)
    if profile_dir:
        from profiling import profile_steps  # bench/ is sys.path[0] when this file runs as a script

        profile_steps(step, profile_dir, steps=2, trace=args.profile_trace, cuda=device.type == "cuda")
    flops = pretrain_flops(model)(batch)
    achieved = flops / (step_ms / 1e3) / 1e12
    peak = args.peak_tflops or _device_peak(device)
    vision = model.config.vision_config
    return Row(
        model=name, batch_size=batch_size, image_size=vision.ps3_scales[-1],
        patches_per_image=vision.low_res_token_num + (model.tokens_per_step or sum(vision.budget_each_scale)),
        grad_checkpointing=not args.no_grad_checkpointing, step_ms=round(step_ms, 2), forward_ms=round(forward_ms, 2),
        samples_per_s=round(batch_size / (step_ms / 1e3), 2), model_tflop_per_step=float(f"{flops / 1e12:.4g}"),
        achieved_tflops=float(f"{achieved:.4g}"), mfu=round(achieved / peak, 4) if peak else None,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    )


def _device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["PS3-1.5K-SigLIP", "PS3-4K-SigLIP"] if cuda else ["tiny"],
                        help="preset names (PS3-1.5K-SigLIP, PS3-4K-SigLIP, ...) or 'tiny'")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32] if cuda else [4], help="per-GPU batch(es)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--iters", type=int, default=10 if cuda else 2)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations (more memory)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each trunk and text tower block (as the recipe's compile section)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--profile", metavar="DIR", help="profile 2 extra steps; write kernels.txt, summary.json here")
    parser.add_argument("--profile-trace", action="store_true", help="with --profile: also DIR/trace.json (large)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    several = len(args.model) * len(args.batch_size) > 1
    for name in args.model:
        for batch_size in args.batch_size:
            try:
                profile_dir = args.profile
                if profile_dir and several:
                    profile_dir = os.path.join(profile_dir, f"{name}_bs{batch_size}")
                row = bench_one(name, batch_size, args, device, dtype, profile_dir)
            except torch.OutOfMemoryError:
                print(json.dumps({"model": name, "batch_size": batch_size, "error": "out of memory"}), flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(asdict(row))
            print(json.dumps(rows[-1]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

"""PS3 encoder speed: latency, peak memory and achieved TFLOP/s at several selection ratios.

Random weights of the real SO400M architecture (speed does not depend on weight values), batch 1,
next to a full-attention ViT over every patch at the same resolution. On a machine without CUDA it
runs a tiny configuration so that it stays runnable (its numbers say nothing about GPU speed).

    python bench/ps3_encoder.py                 # auto: real sizes + bf16 on CUDA, tiny + fp32 on CPU
    python bench/ps3_encoder.py --json out.json
    python bench/ps3_encoder.py --plain-kernels   # without the CUDA-graph low-res pass and the K/V merge
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from vila_hd.ps3 import PS3VisionModel, preset_config
from vila_hd.ps3.configuration import tiny_vision_config

H100_BF16_PEAK_TFLOPS = 989.0
# Selected high-res patches per ratio. 4K follows the paper's convention (look-close steps of 2560:
# 6% = 2 steps, 18% = 6, 35% = 12); 1.5K takes the fraction of its 14,580 patches.
RATIOS = {
    "PS3-4K": {"6%": 5120, "18%": 15360, "35%": 30720, "100%": "all"},
    "PS3-1.5K": {"6%": 875, "18%": 2624, "35%": 5103, "100%": "all"},
}


@dataclass
class Row:
    model: str
    ratio: str
    patches: int
    tokens: int
    latency_ms: float
    low_res_ms: float
    blocks_ms: float
    peak_mem_gib: float
    tflops: float
    blocks_tflops: float
    blocks_pct_peak: float


def block_flops(cfg, n_query: int, n_key: int) -> float:
    """Forward FLOPs of all blocks for ``n_query`` tokens attending over ``n_key`` keys."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n_query * (4 * c * c + 2 * c * i) + 4 * n_query * n_key * c
    return per_layer * cfg.num_hidden_layers


def timed(fn, iters: int, warmup: int, device) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def highres_blocks_fn(enc, low, request):
    """A closure running only the high-res transformer blocks of a look-close request (pre-embedded)."""
    plan = enc.plan(low.pixel_values, **request)
    probs = enc.selection_probs(low)
    step_maps = enc._select(probs, plan, 1)
    xs, bs, _, owners = enc._embed_steps(low.pixel_values, step_maps, plan)
    deepest = enc.config.num_hidden_layers - 1

    def run():
        for x, b, owner in zip(xs, bs, owners):
            enc._run_group(low, x, b, owner, deepest)

    groups = [(x.shape[0] * x.shape[1], x.shape[1]) for x in xs]
    return run, groups


def measure(name, model, size, request, ratio, args, device) -> Row:
    enc, cfg = model.vision_model, model.config
    x = torch.randn(1, 3, size, size, device=device, dtype=model.dtype)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    with torch.inference_mode():
        out = model(x, output_layers=[-1], **request)
        tokens = out.last_hidden_state.shape[1]
        latency = timed(lambda: model(x, output_layers=[-1], **request), args.iters, args.warmup, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        low_ms = timed(lambda: enc.encode_low_res(x), args.iters, args.warmup, device)
        low = enc.encode_low_res(x)
        run, groups = highres_blocks_fn(enc, low, request)
        blocks_ms = timed(run, args.iters, args.warmup, device)
    n_low = cfg.low_res_token_num
    hi_flops = sum(block_flops(cfg, n_q, n_low + seq) for n_q, seq in groups)
    total = hi_flops + block_flops(cfg, n_low, n_low)
    patches = tokens - n_low
    return Row(name, ratio, patches, tokens, latency, low_ms, blocks_ms, peak, total / latency / 1e9,
               hi_flops / blocks_ms / 1e9, 100 * hi_flops / blocks_ms / 1e9 / H100_BF16_PEAK_TFLOPS)


def measure_full_vit(name, model, size, args, device) -> Row | None:
    """A plain ViT over every patch at ``size`` (the same blocks, one full-attention sequence)."""
    trunk, cfg = model.vision_model.trunk, model.config
    grid = size // cfg.patch_size
    x = torch.randn(1, 3, grid * cfg.patch_size, grid * cfg.patch_size, device=device, dtype=model.dtype)

    def run():
        h = trunk.patch_embed(x)
        for blk in trunk.blocks:
            h, _ = blk(h)

    try:
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        with torch.inference_mode():
            latency = timed(run, max(1, args.iters // 4), 1, device)
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    flops = block_flops(cfg, grid * grid, grid * grid)
    return Row(name + " full-attn ViT", "100%", grid * grid, grid * grid, latency, 0.0, latency, peak,
               flops / latency / 1e9, flops / latency / 1e9, 100 * flops / latency / 1e9 / H100_BF16_PEAK_TFLOPS)


def build(name: str, real: bool, dtype, device, plain: bool = False) -> tuple[PS3VisionModel, int]:
    scales = [378, 756, 1512, 3780] if name == "PS3-4K" else [378, 756, 1512]
    cfg = preset_config(name + "-SigLIP2").vision_config if real else tiny_vision_config(scales)
    if plain:
        cfg.low_res_cuda_graph, cfg.prefix_attention = False, "concat"
    with torch.device(device):
        model = PS3VisionModel(cfg)
    return model.to(dtype).eval(), scales[-1]


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["auto", "real", "tiny"], default="auto",
                        help="real SO400M sizes (default on CUDA) or tiny widths (default on CPU)")
    parser.add_argument("--models", nargs="+", default=["PS3-1.5K", "PS3-4K"], choices=list(RATIOS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-full-vit", action="store_true", help="skip the full-attention ViT baseline")
    parser.add_argument("--plain-kernels", action="store_true",
                        help="eager low-res pass and concatenated K/V prefix (the inference kernels off)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    real = args.size == "real" or (args.size == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    kernels = "plain (eager low-res, K/V concat)" if args.plain_kernels else "CUDA-graph low-res, K/V merge (on CUDA)"
    print(f"device={device} dtype={dtype} sizes={'real SO400M' if real else 'tiny'} batch=1 kernels={kernels}")
    rows = []
    for name in args.models:
        model, size = build(name, real, dtype, device, args.plain_kernels)
        for ratio, budget in RATIOS[name].items():
            request = {"num_look_close": "all"} if budget == "all" else {"num_token_look_close": budget}
            rows.append(measure(name, model, size, request, ratio, args, device))
            print(_fmt(rows[-1]), flush=True)
        if not args.no_full_vit:
            full = measure_full_vit(name, model, size, args, device)
            if full is not None:
                rows.append(full)
                print(_fmt(full), flush=True)
                sel = next(r for r in rows if r.model == name and r.ratio == "18%")
                print(f"  {name}: 18% selection is {full.latency_ms / sel.latency_ms:.1f}x faster than the full ViT")
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


def _fmt(r: Row) -> str:
    return (f"{r.model:26s} {r.ratio:>5s} patches={r.patches:6d} tokens={r.tokens:6d} "
            f"latency={r.latency_ms:8.2f} ms (low-res {r.low_res_ms:6.2f}, high-res blocks {r.blocks_ms:8.2f}) peak={r.peak_mem_gib:6.2f} GiB "
            f"{r.tflops:7.1f} TFLOP/s (blocks {r.blocks_tflops:6.1f}, {r.blocks_pct_peak:4.1f}% of peak)")


if __name__ == "__main__":
    main()

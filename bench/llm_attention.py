"""LLM attention of a training row holding several samples: segment attention vs the masked SDPA path.

The masked path is what transformers does for a packed (or padded) row with SDPA: a dense (L x L) block-diagonal
causal mask, K/V heads repeated to the query heads, one masked SDPA call. Segment attention
(:mod:`vila_hd.model.attention`) runs one causal SDPA call per sample, with grouped-query heads and no mask. The
benchmark times forward + backward of the attention alone (one layer) for both, checks that they agree on every
sample token, and prints the times, the speed-up and the attention FLOPs each one does.

    python bench/llm_attention.py                                   # CUDA: Qwen2-1.5B heads, 4 x 2048 tokens
    python bench/llm_attention.py --samples 4 --sample-len 512      # CPU: smaller rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vila_hd.model.attention import segment_attention, segment_table  # noqa: E402


def masked_attention(q, k, v, spans, length):
    """transformers' packed-row SDPA path: block-diagonal causal mask, K/V repeated to the query heads."""
    mask = torch.zeros(length, length, dtype=torch.bool, device=q.device)
    for start, end in spans:
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
    mask[~mask.any(1)] = True  # padding rows attend somewhere (their output is ignored)
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask[None, None])
    return out.transpose(1, 2)


def timed(fn, q, k, v, iters: int, warmup: int) -> float:
    """Median ms of forward + backward."""
    times = []
    for i in range(warmup + iters):
        for t in (q, k, v):
            t.grad = None
        _sync(q.device)
        start = time.perf_counter()
        fn(q, k, v).float().square().sum().backward()
        _sync(q.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--samples", type=int, default=4, help="samples packed into the row")
    parser.add_argument("--sample-len", type=int, default=2048 if cuda else 512, help="tokens per sample")
    parser.add_argument("--padding", type=int, default=64, help="padding tokens after the samples")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if min(args.samples, args.sample_len, args.heads, args.kv_heads, args.head_dim, args.iters) < 1:
        parser.error("--samples, --sample-len, --heads, --kv-heads, --head-dim and --iters must be >= 1")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spans = [(i * args.sample_len, (i + 1) * args.sample_len) for i in range(args.samples)]
    length = spans[-1][1] + args.padding
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(heads):
        return torch.randn(1, heads, length, args.head_dim, generator=g).to(device, dtype).requires_grad_()

    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    table = segment_table([spans])
    module = torch.nn.Module()
    seg = lambda q, k, v: segment_attention(module, q, k, v, None, segments=table)[0]  # noqa: E731
    masked = lambda q, k, v: masked_attention(q, k, v, spans, length)  # noqa: E731
    with torch.no_grad():
        a, b = seg(q, k, v), masked(q, k, v)
        inside = spans[-1][1]
        err = float((a[:, :inside].float() - b[:, :inside].float()).abs().max())
    ms_masked = timed(masked, q, k, v, args.iters, args.warmup)
    ms_seg = timed(seg, q, k, v, args.iters, args.warmup)
    # Attention FLOPs done (forward + backward = 3x forward; 4 x heads x dim per query-key pair).
    per_pair = 3 * 4 * args.heads * args.head_dim
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "row": f"{args.samples} x {args.sample_len} + {args.padding} padding = {length} tokens",
        "heads": f"{args.heads} q / {args.kv_heads} kv x {args.head_dim}",
        "masked_ms": round(ms_masked, 3), "segments_ms": round(ms_seg, 3), "speedup": round(ms_masked / ms_seg, 2),
        "masked_gflop": round(per_pair * length * length / 1e9, 2),
        "segments_gflop": round(per_pair * sum((e - s) ** 2 for s, e in spans) / 1e9, 2),
        "max_abs_diff_on_samples": err,
    }
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

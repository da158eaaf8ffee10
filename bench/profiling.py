"""Where the time of a training step goes: ``torch.profiler`` over a few steps, summarised for the benchmarks.

:func:`profile_steps` runs a step function a few times under :class:`torch.profiler.profile` (CPU + CUDA
activities, no shapes) and writes to a directory:

- ``kernels.txt``: the top device kernels by total self time (CPU ops by self CPU time when there is no GPU):
  total ms, calls, share of the profiled step wall time, name;
- ``summary.json`` (and a printed table): per-step wall time, GPU busy time (union of the kernel / memcpy /
  memset intervals over all streams of the device) and busy share, host syncs, and the self time grouped into
  categories by name regex (:data:`CATEGORIES`, first match wins, case-insensitive);
- ``trace.json``: the Chrome trace, only when asked (it is large).

Kernels / ops that run inside a torch ``Optimizer.step`` region (the profiler's own annotation, when it is
recorded on the same device) count as optimizer whatever their name: on CPU the AdamW update is plain
``aten::add_`` / ``aten::mul_`` ops.

Each step runs inside ``record_function("bench_profile_step_<i>")`` and ends with a device synchronise, so a
kernel belongs to the step whose host window contains its start. Only torch is needed.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

STEP_LABEL = "bench_profile_step_"
# (category, regex), tested in this order, first match wins. The "aten::..." alternatives name the CPU ops that
# play the same role when there is no GPU. Attention comes before gemm because flash / memory-efficient attention
# kernels carry "cutlass" / "sm80" in their names (and so does cudnn SDPA); cudnn convolutions land in attention.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl|allreduce|all_reduce|reduce_scatter|all_gather"),
    ("memcpy/memset", r"memcpy|memset|aten::copy_|aten::fill_|aten::zero_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|cudnn|scaled_dot_product"),
    ("norm", r"layer_norm|rms"),
    ("gemm", r"gemm|cutlass|sm90|ampere|cublas|nvjet|matmul|aten::(?:mm|addmm|bmm|baddbmm|_addmm_activation)$"),
)
OTHER = "elementwise/other"
OPTIMIZER_REGION = "Optimizer.step"
SYNC_OPS = re.compile(r"aten::_local_scalar_dense|cuda(?:Stream|Device|Event)Synchronize")


@dataclass
class Kernel:
    """One device kernel (or CPU op) occurrence: name, interval in µs (profiler clock), self time in µs."""

    name: str
    start: float
    end: float
    self_us: float
    in_optimizer: bool = False


def categorize(name: str) -> str:
    """The category of a kernel / op name (:data:`CATEGORIES`, else :data:`OTHER`)."""
    return next((cat for cat, rx in CATEGORIES if re.search(rx, name, re.IGNORECASE)), OTHER)


def category_of(kernel: Kernel) -> str:
    """Optimizer when the kernel ran in an optimizer-step region, else by name (:func:`categorize`)."""
    return "optimizer" if kernel.in_optimizer else categorize(kernel.name)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def _is_annotation(e) -> bool:
    """record_function ranges (CPU side, and their gpu_user_annotation copy on the device timeline)."""
    return (bool(getattr(e, "is_user_annotation", False)) or "annotation" in str(getattr(e, "activity_type", ""))
            or e.name.startswith(STEP_LABEL))


def collect(prof: profile, on_device: bool) -> tuple[list[Kernel], list[tuple[float, float]], list]:
    """(kernels or CPU ops, host window of each step, CPU events) from a finished profiler."""
    events = list(prof.events())
    windows = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == DeviceType.CPU and e.name.startswith(STEP_LABEL))
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not _is_annotation(e)]
    if on_device:
        kernels = [Kernel(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us())
                   for e in events if e.device_type != DeviceType.CPU and not _is_annotation(e)]
    else:
        kernels = [Kernel(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total)
                   for e in cpu if not getattr(e, "is_python_function", False)]
    regions = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith(OPTIMIZER_REGION)
               and (e.device_type != DeviceType.CPU) == on_device]
    for k in kernels:
        k.in_optimizer = any(a <= k.start and k.end <= b for a, b in regions)
    return kernels, windows, cpu


def _in_step(start: float, windows: list[tuple[float, float]]) -> int | None:
    return next((i for i, (a, b) in enumerate(windows) if a <= start <= b), None)


def summarize(kernels: list[Kernel], windows: list[tuple[float, float]], cpu: list, wall_ms: list[float],
              on_device: bool) -> dict:
    """The ``summary.json`` content: per-step wall / busy / syncs and the per-category self time."""
    steps = len(wall_ms)
    per_step: list[list[Kernel]] = [[] for _ in range(steps)]
    for k in kernels:
        i = _in_step(k.start, windows)
        if i is not None and i < steps:
            per_step[i].append(k)
    busy = [union_us([(k.start, k.end) for k in ks]) / 1e3 for ks in per_step] if on_device else None
    syncs = [0] * steps
    for e in cpu:
        i = _in_step(e.time_range.start, windows)
        if i is not None and i < steps and SYNC_OPS.search(e.name):
            syncs[i] += 1
    total_wall = sum(wall_ms)
    cats: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES} | {OTHER: 0.0}
    for k in kernels:
        cats[category_of(k)] += k.self_us / 1e3
    total_self = sum(cats.values())
    return {
        "device": torch.cuda.get_device_name() if on_device else "cpu",
        "time_source": "device kernels, memcpy, memset (all streams)" if on_device else "CPU ops, self CPU time",
        "steps": steps,
        "step_wall_ms": [round(w, 3) for w in wall_ms],
        "step_gpu_busy_ms": [round(b, 3) for b in busy] if busy else None,
        "step_busy_share": [round(b / w, 4) for b, w in zip(busy, wall_ms)] if busy else None,
        "step_host_syncs": syncs,
        "host_sync_regex": SYNC_OPS.pattern,
        "self_ms_per_step": round(total_self / steps, 3),
        "self_share_of_wall": round(total_self / total_wall, 4) if total_wall else None,
        "categories": {c: {"ms_per_step": round(ms / steps, 3),
                           "share_of_self": round(ms / total_self, 4) if total_self else 0.0,
                           "share_of_wall": round(ms / total_wall, 4) if total_wall else 0.0}
                       for c, ms in cats.items()},
        "category_regexes": dict(CATEGORIES) | {OTHER: "(no match above)"},
        "category_rule": f"inside an {OPTIMIZER_REGION} region: optimizer; else the first match in the order "
                         "listed, case-insensitive",
    }


def top_kernels(kernels: list[Kernel], total_wall_ms: float, n: int = 40) -> list[str]:
    """Lines of ``kernels.txt``: the ``n`` names with the largest total self time."""
    totals: dict[str, list[float]] = {}
    for k in kernels:
        t = totals.setdefault(k.name, [0.0, 0])
        t[0] += k.self_us / 1e3
        t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    lines = [f"{'total_ms':>10} {'calls':>7} {'step_%':>7}  name"]
    for name, (ms, calls) in rows:
        share = 100 * ms / total_wall_ms if total_wall_ms else 0.0
        lines.append(f"{ms:10.3f} {int(calls):7d} {share:7.2f}  {name[:110]}")
    return lines


def format_summary(summary: dict) -> str:
    """The printed table of a :func:`summarize` result."""
    lines = [f"profile ({summary['device']}; {summary['time_source']}):"]
    for i, wall in enumerate(summary["step_wall_ms"]):
        busy = summary["step_gpu_busy_ms"]
        extra = f"  gpu busy {busy[i]:9.2f} ms ({100 * summary['step_busy_share'][i]:5.1f}%)" if busy else ""
        lines.append(f"  step {i}: wall {wall:9.2f} ms{extra}  host syncs {summary['step_host_syncs'][i]}")
    lines.append(f"  self time per step {summary['self_ms_per_step']:.2f} ms "
                 f"({100 * (summary['self_share_of_wall'] or 0):.1f}% of wall), by category:")
    for cat, v in summary["categories"].items():
        lines.append(f"    {cat:<18} {v['ms_per_step']:9.2f} ms  {100 * v['share_of_self']:5.1f}% of self  "
                     f"{100 * v['share_of_wall']:5.1f}% of wall   /{summary['category_regexes'][cat]}/")
    return "\n".join(lines)


def profile_steps(step: Callable[[], object], out_dir: str, steps: int = 2, trace: bool = False,
                  cuda: bool | None = None) -> dict:
    """Run ``step`` ``steps`` times under the profiler; write kernels.txt, summary.json (trace.json when
    ``trace``) to ``out_dir``, print the summary table and return the summary. ``cuda``: whether the step
    runs on the GPU (default: whether one is available)."""
    on_device = torch.cuda.is_available() if cuda is None else cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    wall_ms = []
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(steps):
            with record_function(f"{STEP_LABEL}{i}"):
                if on_device:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if on_device:
                    torch.cuda.synchronize()
                wall_ms.append((time.perf_counter() - start) * 1e3)
    kernels, windows, cpu = collect(prof, on_device)
    summary = summarize(kernels, windows, cpu, wall_ms, on_device)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.txt"), "w") as f:
        f.write("\n".join(top_kernels(kernels, sum(wall_ms))) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if trace:
        prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
    print(format_summary(summary), flush=True)
    print(f"profile written to {out_dir}", flush=True)
    return summary

"""CUDA-graph replay of PS3's low-res pass at inference.

The low-res pass (729 tokens through every block) is too small to fill a GPU: at batch 1 its time is
kernel-launch overhead. Captured once per input shape, dtype, autocast state and weight layout, it is
replayed with one launch. The replay's outputs are copied out of the graph's memory (one copy per
dtype), so a returned :class:`~vila_hd.ps3.vision.LowResOutput` stays valid after later calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


def graph_usable(module: torch.nn.Module, pixel_values: torch.Tensor) -> bool:
    """Replay only where nothing can differ from eager: CUDA input, no autograd, eval mode, not compiling."""
    return (
        pixel_values.is_cuda
        and not torch.is_grad_enabled()
        and not module.training
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    flat: list[torch.Tensor]  # one buffer per dtype, written by the graph
    layout: list[tuple[int, int, int, tuple[int, ...]]]  # (buffer, start, numel, shape) per output tensor
    template: Callable[[list[torch.Tensor]], object]  # rebuilds the output object from its tensors


class GraphCache:
    """Least-recently-used CUDA graphs of ``fn(pixel_values) -> tensors`` (at most ``max_graphs``).

    ``fn`` returns ``(tensors, rebuild)``: the outputs as a flat list and a function rebuilding the
    result object from a list of the same tensors.
    """

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._weights_key: tuple = ()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def __deepcopy__(self, memo) -> GraphCache:  # graphs belong to one set of weights: copies start empty
        return GraphCache(self.max_graphs)

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs, "_graphs": OrderedDict(), "_weights_key": ()}

    def run(self, fn, pixel_values: torch.Tensor, weights: list[torch.Tensor]):
        weights_key = tuple((w.data_ptr(), w.dtype) for w in weights)
        if weights_key != self._weights_key:  # moved or re-created weights: earlier graphs read stale memory
            self.clear()
            self._weights_key = weights_key
        key = self._key(pixel_values)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(fn, pixel_values)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured.static_input.copy_(pixel_values)
        captured.graph.replay()
        flat = [buf.clone() for buf in captured.flat]
        tensors = [flat[b][start : start + n].view(shape) for b, start, n, shape in captured.layout]
        return captured.template(tensors)

    @staticmethod
    def _key(pixel_values: torch.Tensor) -> tuple:
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device, autocast

    @staticmethod
    def _capture(fn, pixel_values: torch.Tensor) -> _Captured:
        static_input = pixel_values.clone()
        side = torch.cuda.Stream(pixel_values.device)
        side.wait_stream(torch.cuda.current_stream(pixel_values.device))
        with torch.cuda.stream(side):  # warm-up: lets cuBLAS/cuDNN pick kernels and allocate workspaces
            for _ in range(2):
                fn(static_input)
        torch.cuda.current_stream(pixel_values.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tensors, template = fn(static_input)
            flat, layout = _pack(tensors)
        return _Captured(graph, static_input, flat, layout, template)


def _pack(tensors: list[torch.Tensor]):
    """Copy ``tensors`` into one flat buffer per dtype; returns the buffers and where each tensor lies."""
    dtypes = list(dict.fromkeys(t.dtype for t in tensors))
    layout, parts = [], {d: [] for d in dtypes}
    offsets = dict.fromkeys(dtypes, 0)
    for t in tensors:
        b = dtypes.index(t.dtype)
        layout.append((b, offsets[t.dtype], t.numel(), tuple(t.shape)))
        offsets[t.dtype] += t.numel()
        parts[t.dtype].append(t.reshape(-1))
    return [torch.cat(parts[d]) for d in dtypes], layout

"""Count the operations that make the host wait for the GPU, on any device (CPU included).

A CUDA step is fast only if the host can queue kernels ahead of the GPU. Some operators cannot return before
the device has computed their input: reading a value (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``),
operators whose *output shape* depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), and tensors made from Python data on the device
(``torch.tensor(data, device=...)``, ``new_tensor``: a blocking copy). On CUDA each of them is a host sync.

:func:`count_host_syncs` records these operators at the ATen dispatch level, so the count does not depend on
the device: a test on CPU shows how many syncs the same code makes on a GPU (kernels inside libraries that sync
internally, e.g. NCCL or DeepSpeed's overflow checks, are not seen).

    with count_host_syncs() as syncs:
        loss = step(batch)
    print(syncs.total, syncs.by_op)
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs", "count_host_syncs", "SYNCING_OPS"]

_aten = torch.ops.aten
# Operators that always sync on CUDA (their result shape or value needs the device data).
SYNCING_OPS = frozenset({
    _aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor,  # syncs unless output_size is given
    _aten.equal.default,  # torch.equal returns a Python bool
    _aten.is_nonzero.default,
})
# index / index_put with boolean masks call nonzero internally.
_MASK_INDEXING = frozenset({_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                            _aten._index_put_impl_.default})


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw: total and per-operator counts."""

    by_op: Counter = field(default_factory=Counter)
    by_site: Counter = field(default_factory=Counter)  # "file:line" of the calling code (``where=True``)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def _syncs(func, args, kwargs) -> bool:
    if func in SYNCING_OPS:
        return not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None)
    if func in _MASK_INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    return False


def _call_site() -> str:
    """The innermost stack frame outside torch (and this module)."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()[:-3]):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno}"
    return "?"


class _Recorder(TorchDispatchMode):
    def __init__(self, record: HostSyncs, where: bool):
        super().__init__()
        self.record, self.where = record, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.count(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def count(self, name: str) -> None:
        self.record.by_op[name] += 1
        if self.where:
            self.record.by_site[_call_site()] += 1


class _FunctionRecorder(TorchFunctionMode):
    """What the ATen level does not show on a CPU: ``Tensor.tolist`` (on CUDA a copy to the host), and tensors
    made from Python data *on a given device* (``torch.tensor(data, device=d)``, ``t.new_tensor(data)``): on a GPU
    that is a blocking copy from the host, which waits for the queued work."""

    def __init__(self, record: _Recorder):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist:
            self.record.count("tolist")
        elif func is torch.Tensor.new_tensor or (func in (torch.tensor, torch.as_tensor) and _python_data_to_device(
                args, kwargs)):
            self.record.count("tensor_from_python")
        return func(*args, **kwargs)


def _python_data_to_device(args, kwargs) -> bool:
    data = args[0] if args else kwargs.get("data")
    return kwargs.get("device") is not None and not torch.is_tensor(data)


@contextmanager
def count_host_syncs(where: bool = False) -> Iterator[HostSyncs]:
    """Record the syncing operators run inside the block (forward and, if it runs inside, backward);
    ``where=True`` also counts them by calling line (slower: one stack walk per sync)."""
    record = HostSyncs()
    recorder = _Recorder(record, where)
    with recorder, _FunctionRecorder(recorder):
        yield record

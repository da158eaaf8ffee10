"""The host-sync counter sees what would make the host wait for a GPU, on the CPU."""

from __future__ import annotations

import torch

from vila_hd.host_syncs import count_host_syncs


def test_counts_reads_and_data_dependent_shapes():
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    with count_host_syncs() as syncs:
        x.sum().item()
        int(x.max())
        bool(mask.any())
        x.tolist()
        mask.nonzero()
        x[mask]
        torch.masked_select(x, mask)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.unique(x)
    assert syncs.by_op == {"_local_scalar_dense": 3, "tolist": 1, "nonzero": 1, "index": 1, "masked_select": 1,
                           "repeat_interleave": 1, "_unique2": 1}
    assert syncs.total == 9


def test_ignores_what_stays_on_the_device():
    x = torch.randn(4, 8, requires_grad=True)
    idx = torch.tensor([0, 2])
    with count_host_syncs() as syncs:
        y = (x * 2).softmax(-1)
        y = y[idx] + y.topk(2, dim=-1).values.sum()
        torch.sort(x, dim=1, stable=True)
        torch.repeat_interleave(idx, torch.tensor([1, 2]), output_size=3)
        x.masked_fill(x > 0, 0.0)
        y.sum().backward()
    assert syncs.total == 0


def test_where_names_the_calling_line():
    x = torch.ones(3)
    with count_host_syncs(where=True) as syncs:
        x.sum().item()
    (site,) = syncs.by_site
    assert site.endswith(f"test_host_syncs.py:{test_where_names_the_calling_line.__code__.co_firstlineno + 3}")


def test_tensors_made_from_python_data_on_a_device_count():
    x = torch.ones(3)
    with count_host_syncs() as syncs:
        torch.tensor([1, 2], device=x.device)
        torch.as_tensor([3], device=x.device)
        x.new_tensor([1.0])
        torch.tensor([1, 2])  # on the host: no copy
        torch.as_tensor(x, device=x.device)  # already a tensor
    assert syncs.by_op == {"tensor_from_python": 3}

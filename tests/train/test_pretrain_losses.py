"""SigLIP loss against a direct computation (1 and 2 processes) and the selection BCE."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerances import assert_fp_close

from vila_hd.train.pretrain.losses import selection_bce, siglip_loss

N, DIM, SCALE, BIAS = 6, 8, 7.5, -3.0


def direct_siglip(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """The SigLIP paper's formula written out element by element: sum_ij log(1 + exp(-z_ij * l_ij)) / |B|."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            logit = scale * float(img[i] @ txt[j]) + bias
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total / img.shape[0]


def features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    proj = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return x, y, proj


def run_batch(x, y, proj, scale_param, bias_param):
    """Features from a shared 'tower' (proj) so that gradients reach parameters every rank holds."""
    img = F.normalize(x @ proj, dim=-1)
    txt = F.normalize(y @ proj.T, dim=-1)
    return siglip_loss(img, txt, scale_param.exp(), bias_param)


def test_siglip_loss_equals_direct_computation():
    x, y, proj = features()
    img, txt = F.normalize(x @ proj, dim=-1), F.normalize(y @ proj.T, dim=-1)
    ours = siglip_loss(img, txt, torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64))
    assert_fp_close(ours.double(), direct_siglip(img, txt, SCALE, BIAS))
    with pytest.raises(ValueError, match="differ"):
        siglip_loss(img, txt[:3], torch.tensor(1.0), torch.tensor(0.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y, proj = features()
        proj = proj.clone().requires_grad_(True)
        scale = torch.tensor(math.log(SCALE), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        part = slice(rank * N // world, (rank + 1) * N // world)
        loss = run_batch(x[part], y[part], proj, scale, bias)
        loss.backward()
        grads = torch.cat([proj.grad.flatten(), scale.grad.view(1), bias.grad.view(1)])
        dist.all_reduce(grads)  # what a data-parallel engine does, then divides by the world size
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss / world, "grads": grads / world}, os.path.join(out_dir, "result.pt"))
        bad = siglip_loss(torch.ones(rank + 1, 2), torch.ones(rank + 1, 2), torch.tensor(1.0), torch.tensor(0.0))
        del bad
    except ValueError as e:  # the unequal-batch check raises on every rank
        if rank == 0:
            torch.save(str(e), os.path.join(out_dir, "error.pt"))
    finally:
        dist.destroy_process_group()


def test_siglip_loss_two_processes_equals_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    x, y, proj = features()
    proj = proj.clone().requires_grad_(True)
    scale = torch.tensor(math.log(SCALE), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    img, txt = F.normalize(x @ proj, dim=-1), F.normalize(y @ proj.T, dim=-1)
    assert_fp_close(result["loss"], direct_siglip(img.detach(), txt.detach(), SCALE, BIAS))
    run_batch(x, y, proj, scale, bias).backward()
    expected = torch.cat([proj.grad.flatten(), scale.grad.view(1), bias.grad.view(1)])
    assert_fp_close(result["grads"], expected)
    assert "same batch size on every rank, got [1, 2]" in torch.load(tmp_path / "error.pt")


def test_selection_bce_counts_local_captions_only():
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(3, 4, 4, generator=g).clamp(0.01, 0.99), torch.rand(3, 8, 8, generator=g).clamp(0.01, 0.99)]
    gt = torch.zeros(3, 16, 16)
    gt[:, 2:9, 4:12] = 1
    is_global = torch.tensor([False, True, False])
    loss = selection_bce(probs, gt, is_global)
    expected = 0.0
    for p in probs:
        target = (F.adaptive_avg_pool2d(gt[:, None], p.shape[-2:])[:, 0] > 0).float()
        terms = -(target * p.log() + (1 - target) * (1 - p).log())
        expected += terms[[0, 2]].mean() / len(probs)
    assert_fp_close(loss, expected)
    # all-global batch: zero, but still connected to the probabilities
    leaf = [p.clone().requires_grad_(True) for p in probs]
    zero = selection_bce(leaf, gt, torch.ones(3, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and leaf[0].grad is not None

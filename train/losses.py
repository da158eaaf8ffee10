"""Loss terms as *sums*; the trainer divides each by its global count (all ranks, all micro-batches).

Returning sums and normalising once per optimizer step makes the gradient independent of how tokens are
spread over micro-batches and ranks (a micro-batch with 10 target tokens weighs 10x less than one with 100,
as in a single big batch) -- see :func:`normalized_total`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over positions whose target is not ``-100``.

    ``logits`` (..., V) and ``targets`` (...) are already aligned (``targets`` = the token each position
    predicts)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def target_positions(target_ids: torch.Tensor) -> torch.Tensor:
    """(2, N) row / column of every target token (not ``-100``), row-major; ``(0, 0)`` when there is none, so the
    LM head always runs (ZeRO-3 lockstep)."""
    found = (target_ids != IGNORE_INDEX).nonzero().T
    return found.contiguous() if found.numel() else torch.zeros(2, 1, dtype=torch.long, device=target_ids.device)


def box_maps(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 4) normalised boxes (x1, y1, x2, y2) -> (N, h, w) 0/1 maps: 1 where a patch overlaps the box.

    NaN boxes give all-zero maps."""
    h, w = grid
    dev = boxes.device
    x0 = torch.arange(w, device=dev, dtype=torch.float32) / w
    y0 = torch.arange(h, device=dev, dtype=torch.float32) / h
    b = torch.nan_to_num(boxes.float(), nan=-1.0)
    x_in = (b[:, 0:1] < x0 + 1.0 / w) & (b[:, 2:3] > x0)  # (N, w)
    y_in = (b[:, 1:2] < y0 + 1.0 / h) & (b[:, 3:4] > y0)  # (N, h)
    return (y_in[:, :, None] & x_in[:, None, :]).float()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(N, h, w) -> (N,) soft Dice loss 1 - (2|P.T| + eps) / (|P| + |T| + eps)."""
    p, t = probs.flatten(1), target.flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def selection_loss(probs: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """Per image (N,): mean over high-res scales of [BCE + Dice] between the selection probabilities and
    the box maps (reference §4). Images without a box get a loss that is computed (so every rank runs the
    same operations) but is meant to be masked out by the caller."""
    per_scale = []
    for p in probs:
        p = p.float().clamp(1e-6, 1.0 - 1e-6)
        target = box_maps(boxes, tuple(p.shape[-2:]))
        bce = F.binary_cross_entropy(p, target, reduction="none").flatten(1).mean(1)
        per_scale.append(bce + dice_loss(p, target))
    return torch.stack(per_scale).mean(0)


def normalized_total(sums: dict[str, torch.Tensor], counts: dict[str, float], weights: dict[str, float],
                     scale: float = 1.0) -> torch.Tensor:
    """``scale * sum_k weights[k] * sums[k] / max(counts[k], 1)``.

    The trainer passes the *global* counts of the optimizer step and ``scale = world_size * grad_accum`` so
    that DeepSpeed's averaging over ranks and accumulation steps yields d(total)/d(theta) exactly."""
    total = None
    for name, value in sums.items():
        w = float(weights.get(name, 1.0))
        term = value * (w / max(float(counts.get(name, 0)), 1.0))
        total = term if total is None else total + term
    return total * scale

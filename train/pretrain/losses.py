"""Losses of PS3 pre-training: SigLIP sigmoid loss with cross-rank negatives, box BCE of the selection scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["selection_bce", "siglip_loss"]


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid contrastive loss of this rank's images against the texts of every rank.

    ``logits = logit_scale * img @ txt.T + logit_bias`` (features already L2-normalised, ``logit_scale`` already
    exponentiated); label +1 for the matching pair, -1 otherwise; the sum of ``-log sigmoid(label * logit)`` over
    the local rows divided by the local batch size (the SigLIP paper's normalisation).

    In a distributed run the text features of all ranks are gathered with an autograd-aware all-gather, so each
    rank's text features also receive the gradients of the other ranks' negatives. The mean of the rank losses
    then equals the single-process loss of the whole global batch, and so do its gradients once the data-parallel
    engine averages them. Every rank must hold the same number of samples (use ``drop_last``).
    ``reduction="sum"`` returns the sum over the local rows (for trainers that normalise by a global count).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} differ"
        )
    n = image_features.shape[0]
    texts, offset = text_features, 0
    if group is not None or (dist.is_available() and dist.is_initialized()):
        world = dist.get_world_size(group)
        if world > 1:
            _check_equal_batches(n, world, group, text_features.device)
            texts = _GatherWithGrad.apply(text_features, group)
            offset = dist.get_rank(group) * n
    dtype = torch.promote_types(image_features.dtype, torch.float32)  # bf16 features: the loss in fp32
    logits = logit_scale.to(dtype) * image_features.to(dtype) @ texts.to(dtype).T + logit_bias.to(dtype)
    labels = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    labels[rows, rows + offset] = 1.0
    total = -F.logsigmoid(labels * logits).sum()
    return total / n if reduction == "mean" else total


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (n, d) tensor; the backward sums the gradients of all ranks for the local slice.

    Written with all_gather / all_reduce only (gloo has no reduce_scatter), which also keeps clear of the
    deprecated ``torch.distributed.nn`` wrappers.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.n = group, tensor.shape[0]
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def _check_equal_batches(n: int, world: int, group, device) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], device=device), group=group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(f"siglip_loss needs the same batch size on every rank, got {sizes} (use drop_last=True)")


def selection_bce(
    probs: Sequence[torch.Tensor],
    gt_maps: torch.Tensor,
    is_global: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCE between (B, h, w) selection probabilities and the box map, per sample the mean over the grid and over
    the high-res scales; ``mean`` (default) or ``sum`` over the samples with a local caption.

    The GT map is area-resized to each grid and binarised (``> 0``), as the reference does. Global-caption samples
    do not count; without any local caption the result is a zero that still depends on ``probs``, so that every
    selection parameter keeps a gradient (data-parallel engines require it).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # Every sample is computed and global ones are masked out: no data-dependent shapes, no host syncs, and an
    # all-global batch still yields a (zero) loss connected to every selection parameter.
    local = (~is_global.view(-1).bool()).float()
    gt = gt_maps.unsqueeze(1).float()
    per_sample = 0.0
    for p in probs:
        target = (F.interpolate(gt, size=tuple(p.shape[-2:]), mode="area").squeeze(1) > 0).float()
        bce = F.binary_cross_entropy(p.float(), target, reduction="none")
        per_sample = per_sample + bce.flatten(1).mean(1) / len(probs)
    total = (per_sample * local).sum()
    return total / local.sum().clamp(min=1.0) if reduction == "mean" else total

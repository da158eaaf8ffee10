"""Which samples each rank reads at each optimizer step: a pure function of (seed, step), so the data
position of a run is just its step count (exact resume needs no sampler state).

Epoch ``e`` is a permutation of the dataset drawn from ``seed + e``; global batch ``s`` of the epoch is the
slice ``[s * G, (s + 1) * G)`` of it (``G`` = micro x world x accumulation samples), and rank ``r``'s
micro-batch ``j`` is the part ``[(j * world + r) * micro, ... + micro)`` of that slice. The same global step
holds the same samples whatever the world size, as long as the global batch size is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int = 0):
        self.num_samples = int(num_samples)
        self.micro = int(micro_batch_size)
        self.grad_accum = int(grad_accum)
        self.world = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.global_batch = self.micro * self.world * self.grad_accum
        if self.num_samples < self.global_batch:
            raise ValueError(f"the data holds {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch} (micro {self.micro} x world {self.world} x accumulation "
                             f"{self.grad_accum}); lower batch.global_batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def micro_batches(self, start_step: int, total_steps: int) -> Iterator[list[int]]:
        """This rank's micro-batches (lists of sample indices) for steps ``start_step .. total_steps - 1``,
        ``grad_accum`` per step, in order."""
        perm, perm_epoch = None, -1
        for step in range(start_step, total_steps):
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(epoch), epoch
            base = in_epoch * self.global_batch
            for j in range(self.grad_accum):
                first = base + (j * self.world + self.rank) * self.micro
                yield perm[first:first + self.micro].tolist()

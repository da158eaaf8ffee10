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

from vila_hd.errors import ConfigError


def check_enough_samples(num_samples: int, micro_batch_size: int, world_size: int, grad_accum: int) -> None:
    """Refuse data that does not fill one global batch (micro x world x accumulation samples)."""
    global_batch = micro_batch_size * world_size * grad_accum
    if num_samples < global_batch:
        raise ConfigError(f"the data holds {num_samples} samples, fewer than one global batch of {global_batch} "
                          f"(micro {micro_batch_size} x world {world_size} x accumulation {grad_accum}); lower "
                          "batch.global_batch_size (finetune-lora: --global-batch-size) or add data")


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
        check_enough_samples(self.num_samples, self.micro, self.world, self.grad_accum)

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

"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of each group's peak."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based; a picklable callable, so a
    ``LambdaLR`` built on it round-trips through checkpoints)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps = max(int(warmup_steps), 0)
        self.total_steps = max(int(total_steps), 1)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :class:`WarmupCosine` to every parameter group (each keeps its own peak)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))

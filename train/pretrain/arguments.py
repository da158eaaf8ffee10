"""The arguments of ``vila-hd pretrain`` (and of ``python -m vila_hd.train.pretrain.loop``), apart from the
loop so that listing the command imports no torch."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from vila_hd.arguments import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="recipe YAML (configs/ps3/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set batch.micro_batch_size=16 (repeatable)")
    parser.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    parser.add_argument("--until", type=int, default=None, help="stop after this step (with a checkpoint)")


def command(run: Callable[[argparse.Namespace], int]) -> Command:
    """``vila-hd pretrain`` running ``run`` (the loop's :func:`~vila_hd.train.pretrain.loop.pretrain`, or a
    function that imports it when called)."""
    return Command("pretrain", help="PS3 localized contrastive pre-training", add_arguments=add_arguments, run=run,
                   description="PS3 localized contrastive pre-training (run under torchrun / deepspeed for several "
                   "GPUs).")

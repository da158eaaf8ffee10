"""Recipes shipped with the package (``vila_hd.configs``): stage, dataset, demo and PS3 pre-training YAML, and
the DeepSpeed JSON configs. Read them with :func:`path` (``importlib.resources``), never through a source-tree
path, so that they are found after a plain ``pip install``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(*parts: str) -> Path:
    """The installed file ``parts`` (e.g. ``path("stages", "lora.yaml")``), whether or not it exists."""
    root = resources.files(__name__)
    return Path(str(root.joinpath(*parts)))

"""Recipes shipped with the package (``vila_hd.configs``): stage, dataset, demo and PS3 pre-training YAML, and
the DeepSpeed JSON configs. Read them with :func:`path` (``importlib.resources``), never through a source-tree
path, so that they are found after a plain ``pip install``; :func:`find` lets a command take a shipped
recipe by the name the docs use (``configs/stages/sft.yaml``, ``stages/sft.yaml``, ``sft``) from any folder."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path, PurePosixPath


def path(*parts: str) -> Path:
    """The installed file ``parts`` (e.g. ``path("stages", "lora.yaml")``), whether or not it exists."""
    root = resources.files(__name__)
    return Path(str(root.joinpath(*parts)))


def find(path_or_name: str | os.PathLike, folder: str) -> str:
    """``path_or_name`` as given when it exists (a user's own file always wins); else the recipe shipped in
    ``folder`` (``stages``, ``ps3``, ...) that it names: ``configs/<folder>/x.yaml`` (the repository path the
    docs use, from any directory), ``<folder>/x.yaml``, ``x.yaml`` or ``x``. Returned unchanged when neither
    exists, so that the caller's open names what the user wrote."""
    given = os.fspath(path_or_name)
    parts = PurePosixPath(given.replace(os.sep, "/")).parts
    if os.path.exists(given) or os.path.isabs(given) or ".." in parts or not parts:
        return given
    parts = parts[1:] if parts[0] == "configs" else parts
    candidates = [path(*parts)] if parts else []
    if len(parts) == 1:
        name = parts[0] if parts[0].endswith((".yaml", ".yml", ".json")) else f"{parts[0]}.yaml"
        candidates.append(path(folder, name))
    return str(next((c for c in candidates if c.is_file()), given))

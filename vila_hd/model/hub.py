"""Resolve a local directory or a Hugging Face Hub id to a local directory (safetensors only)."""

from __future__ import annotations

import os

# Weights are read from safetensors only; pickled formats are never downloaded.
_METADATA = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_PATTERNS = {
    "processor": _METADATA + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA],
    "config": ["config.json"],
    "model": _METADATA
    + ["*.safetensors"]
    + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA + ["*.safetensors"]],
}


def resolve_model_dir(
    path_or_id: str | os.PathLike,
    kind: str = "model",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    **_unused,
) -> str:
    """Return ``path_or_id`` if it is a local directory, else download the files of ``kind``
    (``model`` / ``processor`` / ``config``) of that Hub repository and return the snapshot directory."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; expected a checkpoint directory or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path,
            allow_patterns=_PATTERNS[kind],
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except Exception as err:  # the hub client raises many types; the message is what matters
        raise OSError(f"{path!r} is neither a local directory nor a downloadable Hub repository: {err}") from err

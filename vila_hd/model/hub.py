"""Where checkpoints come from: a local directory or a Hugging Face Hub id, never confused; weights from
safetensors only.

- :func:`locate`: an existing local path (``~`` expanded) is used as is. Anything else must be shaped like a Hub
  id (``owner/name``): a missing ``./x``, ``/abs/x``, ``~/x`` or ``x/y/z`` is a ``FileNotFoundError`` raised
  without asking the Hub (a typo in a path must not turn into a download attempt).
- :func:`resolve_model_dir`: a local directory, or a snapshot of a Hub repository holding only metadata and
  ``*.safetensors`` (pickled ``.bin`` / ``.pt`` files are never downloaded).
- :func:`safetensors_only`: the ``from_pretrained`` keyword arguments that make transformers read safetensors and
  nothing else; :func:`refuse_pickled_weights` names a directory that only has pickles. Unpickling a file can
  run any code it carries, so a checkpoint with ``pytorch_model.bin`` only is refused with a message.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Weights are read from safetensors only; pickled formats are never downloaded.
_METADATA = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_PATTERNS = {
    "processor": _METADATA + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA],
    "config": ["config.json"],
    "model": _METADATA
    + ["*.safetensors"]
    + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA + ["*.safetensors"]],
}
# The Hub's repository id rule: owner/name, letters, digits, '-', '_', '.'; no '--' or '..', no leading '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_hub_id(value: str) -> bool:
    """``owner/name`` as the Hub spells repository ids (a string, not an existing local path)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value


def locate(path_or_id: str | os.PathLike, what: str = "checkpoint") -> tuple[str, bool]:
    """``(path, True)`` for an existing local path (``~`` expanded), ``(hub_id, False)`` for a Hub id.

    Raises:
        FileNotFoundError: neither an existing path nor shaped like a Hub id; nothing was downloaded.
    """
    path = os.fspath(path_or_id)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    local = os.path.expanduser(path)
    if os.path.exists(local):
        return local, True
    if not is_hub_id(path):
        raise FileNotFoundError(
            f"{what} {path} does not exist (and it is not a Hub id owner/name: nothing was downloaded)"
        )
    return path, False


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
    (``model`` / ``processor`` / ``config``) of that Hub repository and return the snapshot directory.
    A local-looking path that does not exist is an error (see :func:`locate`), never a download."""
    path, local = locate(path_or_id)
    if local:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is a file; expected a checkpoint directory or a Hub id")
        return path
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


def safetensors_only(kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs with ``use_safetensors=True``; asking for pickles is refused."""
    if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
        raise ValueError(
            f"{what}: weights are loaded from safetensors only; use_safetensors=False / weights_only=False would "
            "unpickle files, which can run any code they carry"
        )
    return {**kwargs, "use_safetensors": True}


def refuse_pickled_weights(directory: str, what: str = "checkpoint") -> None:
    """Raise if ``directory`` has pickled weight files but no ``*.safetensors`` (checked before transformers
    would report a missing ``model.safetensors`` less clearly)."""
    if not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise OSError(
            f"{what} {directory} has only pickled weights ({', '.join(pickled)}); VILA-HD loads safetensors only, "
            "because unpickling can run any code a file carries. Convert them on a machine you trust "
            "(safetensors.torch.save_file(torch.load(f, weights_only=True), ...))."
        )

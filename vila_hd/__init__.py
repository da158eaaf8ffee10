"""VILA-HD: high-resolution multimodal LLMs on the PS3 vision encoder.

Public names are imported lazily so that ``import vila_hd`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "VilaHDConfig": "vila_hd.model",
    "VilaHDForConditionalGeneration": "vila_hd.model",
    "VilaHDProcessor": "vila_hd.processing",
    "load": "vila_hd.api",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vila_hd' has no attribute {name!r}")

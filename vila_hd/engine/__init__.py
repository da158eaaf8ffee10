"""The generation engine behind ``vila-hd chat``, ``vila-hd infer``, ``vila-hd serve`` and :func:`vila_hd.load`.

- :mod:`~vila_hd.engine.options`: :class:`GenerationOptions` (per-answer settings) and :class:`ServingLimits`
  (what one request may cost: pixels per image, images per prompt, new tokens, prompt tokens after image
  expansion), enforced by the engine for chat, infer and the Python API alike; a request over a limit raises
  :class:`LimitExceeded` naming the limit, the value and the setting that raises it.
- :mod:`~vila_hd.engine.conversation`: :class:`Conversation`, messages (with ``<image>`` placeholders) and the
  images they refer to.
- :mod:`~vila_hd.engine.results`: :class:`GenerationResult`, :class:`GenerationStats`, :class:`ImageSelection`.
- :mod:`~vila_hd.engine.streaming`: :class:`Generation` (a streamed answer) and :class:`IncrementalText`.
- :mod:`~vila_hd.engine.engine`: :class:`Engine`, ``generate`` / ``stream`` / ``generate_batch`` /
  ``selection``; :meth:`Engine.from_pretrained` loads with :func:`vila_hd.loading.load_pretrained`.

The public names are importable from ``vila_hd.engine`` itself.
"""

import importlib

# Public name -> the submodule that defines it; imported on first use, so that importing a light submodule
# (``vila_hd.engine.options``) does not load torch through the engine.
_PUBLIC = {
    "Conversation": "conversation",
    "Engine": "engine",
    "Generation": "streaming",
    "GenerationOptions": "options",
    "GenerationResult": "results",
    "GenerationStats": "results",
    "ImageSelection": "results",
    "IncrementalText": "streaming",
    "LimitExceeded": "options",
    "ServingLimits": "options",
}

__all__ = [
    "Conversation",
    "Engine",
    "Generation",
    "GenerationOptions",
    "GenerationResult",
    "GenerationStats",
    "ImageSelection",
    "IncrementalText",
    "LimitExceeded",
    "ServingLimits",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"vila_hd.engine.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'vila_hd.engine' has no attribute {name!r}")

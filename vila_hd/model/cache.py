"""The LLM's KV cache across transformers versions: the output field, the forward keyword, a new cache, crop.

transformers renamed ``past_key_values`` to ``cache`` (5.2x), in model outputs and in ``forward``'s keywords;
these helpers use the name the installed version expects, so callers (the model, eval's likelihood scoring)
never spell either.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover
    DynamicCache = None

# The cache field of model outputs in this version (its ``generate`` reads only the current name).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwarg(module: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); pass the name this version expects."""
    return "cache" if accepts(module, "cache") else "past_key_values"


def accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes the keyword ``name`` (its signature read once per class)."""
    cls = type(module)
    cache = cls.__dict__.get("_vila_hd_params")
    if cache is None:
        cache = set(inspect.signature(module.forward).parameters)
        cls._vila_hd_params = cache
    return name in cache


def call_with_cache(module: nn.Module, cache, **kwargs):
    """``module(**kwargs)`` with ``cache`` under this version's keyword; ``None`` values and a
    ``logits_to_keep`` the module does not take are left out."""
    if cache is not None:
        kwargs[cache_kwarg(module)] = cache
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "logits_to_keep" in kwargs and not accepts(module, "logits_to_keep"):
        kwargs.pop("logits_to_keep")
    return module(**kwargs)


def cache_of(output):
    """The KV cache of a model output (``None`` when it has none)."""
    # Only this version's field: reading the other name goes through transformers' deprecation shim (and warns).
    return output.get(CACHE_FIELD)


def new_cache(text_config):
    """An empty ``DynamicCache`` for an LLM with ``text_config``."""
    try:
        return DynamicCache(config=text_config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions (a negative argument removes that many, in every version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)

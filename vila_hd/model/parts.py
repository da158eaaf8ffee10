"""A parameter's trainable part, from its name: the parts :class:`VilaHDForConditionalGeneration` declares
(:attr:`~vila_hd.model.modeling.VilaHDForConditionalGeneration.PARTS`), read through peft's wrappers too.

peft renames what it wraps: the whole model sits under ``base_model.model.``, a fully trained module
(``modules_to_save``) holds its trained copy under ``modules_to_save.default.`` and its frozen original under
``original_module.``, and a LoRA layer's matrices are ``lora_*`` beside the layer's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from vila_hd.model.modeling import VilaHDForConditionalGeneration

# The parts a recipe may name (in matching order) -> the module paths that make each.
PARTS: dict[str, tuple[str, ...]] = VilaHDForConditionalGeneration.PARTS
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ParamPlace:
    """Where a parameter sits: its part (``None``: in no part, never trained) and how peft holds it:
    ``"lora"`` (a LoRA matrix on a layer of the part), ``"copy"`` (the trained copy of a fully trained
    module), ``"original"`` (that module's frozen original) or ``None`` (the model's own parameter)."""

    part: str | None
    peft: str | None = None


def place_of(name: str) -> ParamPlace:
    """The part and peft role of the parameter called ``name`` (in the model or in its ``PeftModel``)."""
    if ".lora_" in name:
        role = "lora"
    elif ".modules_to_save." in name:
        role = "copy"
    elif ".original_module." in name:
        role = "original"
    else:
        role = None
    return ParamPlace(part_of(name), role)


def part_of(name: str) -> str | None:
    """The part a parameter (or module) belongs to: the first in PARTS order whose paths hold it; ``None`` for
    the never-trained ones. Names may carry peft's prefix and wrappers (see the module docstring)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    if _under(name, VilaHDForConditionalGeneration.NEVER_TRAINED):
        return None
    return next((part for part, paths in PARTS.items() if _under(name, paths)), None)


def _under(name: str, paths: tuple[str, ...]) -> bool:
    return any(name == path or name.startswith(path + ".") for path in paths)

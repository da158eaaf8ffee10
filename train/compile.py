"""Regional ``torch.compile`` for training: every transformer block compiled on its own, in place.

As in torchtitan, the repeated blocks (the LLM's decoder layers, PS3's trunk blocks) are compiled one by
one with ``module.compile(...)`` instead of compiling the whole model: the blocks of a stack share their
code, so the compiled graph is reused across them (one compilation per distinct call signature, not per
layer), and everything between the blocks (data-dependent patch selection, packing, index_put) stays eager.

It composes with gradient checkpointing -- HF's non-reentrant checkpointing wraps the decoder layer's
``forward``, which the compiled ``__call__`` traces; PS3 checkpoints the compiled block from outside -- and
with DeepSpeed ZeRO-2, which wraps the whole step module and hooks gradients, not block forwards.

Blocks are found by the module structure (``language_model.base_model.layers`` and
``vision_tower.vision_model.trunk.blocks``), which LoRA layers injected by peft leave in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The VILA-HD model inside a PeftModel (peft injects LoRA layers in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def llm_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the LLM (``<causal LM>.base_model.layers``)."""
    decoder = _unwrap(model).language_model.base_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} has no `layers` ModuleList: cannot find the decoder layers")
    return layers


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of PS3's trunk."""
    return _unwrap(model).vision_tower.vision_model.trunk.blocks


def compile_kwargs(settings: Any) -> dict[str, Any]:
    """``torch.compile`` keyword arguments of a :class:`~vila_hd.train.config.CompileConfig`."""
    return {"backend": settings.backend, "mode": settings.mode, "dynamic": settings.dynamic}


def _compile_all(blocks: nn.ModuleList, kwargs: dict[str, Any]) -> str:
    for block in blocks:
        block.compile(**kwargs)
    names = sorted({type(b).__name__ for b in blocks})
    return f"{len(blocks)} x {'/'.join(names)}"


def compile_blocks(model: nn.Module, settings: Any) -> list[str]:
    """Compile (in place) the LLM's decoder layers and / or PS3's trunk blocks as ``settings.llm`` /
    ``settings.vision`` ask; returns one line per compiled stack, e.g. ``"llm: 28 x Qwen2DecoderLayer"``.

    Call it after gradient checkpointing is set up and before the model first runs. ``settings.recompile_limit``
    (when set) raises torch's per-code-object recompile limit for the whole process."""
    stacks = {}
    if settings.llm:
        stacks["llm"] = llm_blocks(model)
    if settings.vision:
        stacks["vision"] = vision_blocks(model)
    return compile_stacks(stacks, settings)


def compile_pretraining_blocks(model: nn.Module, settings: Any) -> list[str]:
    """The same for PS3 pre-training (:class:`~vila_hd.train.pretrain.model.PS3ForPretraining`): ``settings.vision``
    compiles the PS3 trunk's blocks, ``settings.llm`` the text tower's."""
    stacks = {}
    if settings.llm:
        stacks["text"] = model.text_model.transformer.resblocks
    if settings.vision:
        stacks["vision"] = model.vision_model.trunk.blocks
    return compile_stacks(stacks, settings)


def describe(compiled: list[str], settings: Any) -> str:
    """The line a run prints about what :func:`compile_blocks` / :func:`compile_pretraining_blocks` compiled."""
    return f"torch.compile ({settings.backend}, mode={settings.mode}): {'; '.join(compiled)}"


def compile_stacks(stacks: dict[str, nn.ModuleList], settings: Any) -> list[str]:
    """Compile every block of each named stack; one summary line per stack."""
    if getattr(settings, "recompile_limit", None) is not None:
        torch._dynamo.config.recompile_limit = settings.recompile_limit
    kwargs = compile_kwargs(settings)
    return [f"{name}: {_compile_all(blocks, kwargs)}" for name, blocks in stacks.items()]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile(...)`` was called on this module."""
    return getattr(module, "_compiled_call_impl", None) is not None

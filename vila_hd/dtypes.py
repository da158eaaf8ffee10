"""The one home of dtype names (no project imports): ``"bf16"``, ``"float32"``, ... -> :class:`torch.dtype`.

:data:`DTYPES` maps every accepted name to its dtype; :data:`CHOICES` are the names the command line offers
(``--dtype``; the module is imported for them without torch); :func:`resolve_dtype` turns a name, a dtype or
``None`` / ``"auto"`` (bf16 on a GPU that supports it, fp16 on older ones, fp32 elsewhere) into a dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Accepted name -> the torch attribute it stands for.
NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
         "float16": "float16", "fp16": "float16"}
CHOICES = ("bfloat16", "float16", "float32")  # what --dtype offers (besides auto, where a command has it)


def __getattr__(name: str):
    if name == "DTYPES":  # built on first use, so that the CLI reads CHOICES without importing torch
        import torch

        return {key: getattr(torch, value) for key, value in NAMES.items()}
    raise AttributeError(f"module 'vila_hd.dtypes' has no attribute {name!r}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bf16 on a GPU that supports it (fp16 on older ones) and fp32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(NAMES)} or 'auto'")
        return getattr(torch, NAMES[dtype])
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_kwargs(dtype: torch.dtype | str | None) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword for this transformers version (``dtype`` from 5.0, ``torch_dtype``
    before), or nothing for ``None``."""
    if dtype is None:
        return {}
    import transformers

    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {name: dtype}

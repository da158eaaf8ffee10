"""The one home of dtype names (no project imports): ``"bf16"``, ``"float32"``, ... -> :class:`torch.dtype`.

:data:`DTYPES` maps every accepted name to its dtype; :func:`resolve_dtype` turns a name, a dtype or
``None`` / ``"auto"`` (bf16 on a GPU that supports it, fp16 on older ones, fp32 elsewhere) into a dtype.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bf16 on a GPU that supports it (fp16 on older ones) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
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

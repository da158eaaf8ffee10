"""The one definition of VILA-HD's 4-bit quantisation, shared by QLoRA training and 4-bit serving.

Both quantise the LLM the way the QLoRA paper does (Dettmers et al., 2023): NF4 weights, *double quantisation*
(the per-block scales are quantised too, ~0.4 bit per weight saved) and matmuls in the model's compute dtype.
Serving an adapter trained with QLoRA on the same NF4 weights it was trained against keeps its answers; the two
sites used to differ in double quantisation. The vision tower, the projector (with the prompt head) and the LM
head are never quantised.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from vila_hd.errors import ConfigError

# Modules kept in the compute dtype (bitsandbytes' llm_int8_skip_modules applies to 4-bit loading too).
UNQUANTISED_MODULES = ("vision_tower", "mm_projector", "lm_head")


def nf4_kwargs(compute_dtype: torch.dtype) -> dict[str, Any]:
    """The ``BitsAndBytesConfig`` arguments: NF4 + double quantisation + ``compute_dtype`` matmuls."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype,
        "llm_int8_skip_modules": list(UNQUANTISED_MODULES),
    }


def nf4_config(compute_dtype: torch.dtype):
    """``transformers.BitsAndBytesConfig`` of :func:`nf4_kwargs` (building it does not need bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**nf4_kwargs(compute_dtype))


def require_four_bit_support(setting: str, device: torch.device | None = None) -> None:
    """Raise naming ``setting`` (the flag or key that asked for 4 bits) unless bitsandbytes and a CUDA device are
    there (``device``: the target device; None: any visible GPU)."""
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if importlib.util.find_spec("bitsandbytes") is None:
        missing = "bitsandbytes is not installed: pip install bitsandbytes"
    elif not on_cuda:
        missing = f"the device is {device}" if device is not None else "no CUDA GPU is visible"
    else:
        return
    raise ConfigError(f"{setting} needs bitsandbytes and a CUDA GPU ({missing})")

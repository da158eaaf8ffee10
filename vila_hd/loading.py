"""The one loader: :func:`load_pretrained` turns a checkpoint directory or Hub id into ``(model, processor)``
ready for generation; chat, infer, the API, the server, evaluation and training all load through it.

The format is decided from the directory itself:

- ``adapter_config.json``: a LoRA adapter; its base checkpoint is ``base_model_name_or_path`` (a path
  relative to the adapter works too), and it is applied on that base (merged unless asked not to, never on
  a 4-bit model). An adapter may also be given on its own with ``adapter=`` on top of a base checkpoint.
- ``config.json`` in VILA's layout (``llm/``, ``vision_tower/``, ``mm_projector/``): read with the VILA
  layout reader (no conversion on disk; no 4-bit).
- ``config.json`` of our single directory: ``VilaHDForConditionalGeneration.from_pretrained`` from the
  safetensors shards, created on the meta device and filled on the target device (no second full copy
  in CPU memory), optionally with the LLM quantised to NF4 (:mod:`vila_hd.model.quantization`).

Device and dtype: CUDA + bf16 when a GPU is present (fp16 on a GPU without bf16), else CPU + fp32; names
are those of :mod:`vila_hd.dtypes`. The safety checks of every loader apply: custom code (``auto_map``,
``trust_remote_code``) and pickled-only weights are refused (:mod:`vila_hd.hub`), for the model and for an
adapter (before peft would read it).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch

from vila_hd.dtypes import resolve_dtype
from vila_hd.hub import refuse_unsafe_adapter, resolve_checkpoint

ADAPTER_CONFIG = "adapter_config.json"


def load_pretrained(
    model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    load_4bit: bool = False,
    merge_adapter: bool = True,
    **hub_kwargs: Any,
):
    """Load ``(model, processor)`` for inference (eval mode, generation defaults set from the processor).

    Args:
        model: checkpoint directory or Hub id, in our layout or VILA's (decided by its ``config.json``);
            a LoRA adapter directory works too (its base is read from ``adapter_config.json``).
        adapter: a LoRA adapter directory or Hub id to apply on ``model``.
        dtype: ``"auto"`` / ``None`` (bf16 on a GPU, fp32 on CPU), a :class:`torch.dtype` or a name of
            :data:`vila_hd.dtypes.DTYPES` (``"bf16"``, ``"float32"``, ...).
        device: default CUDA when a GPU is present, else CPU.
        device_map: e.g. ``"auto"`` to spread the model over every visible GPU (and CPU) with accelerate.
        load_4bit: quantise the LLM to 4 bits with bitsandbytes (needs a CUDA GPU); vision tower and
            projector stay in ``dtype``.
        merge_adapter: fold the LoRA weights into the base (faster); never done on a 4-bit model.
        hub_kwargs: passed to the Hub download of a Hub id (e.g. ``revision``, ``cache_dir``).
    """
    model_dir = resolve_checkpoint(model, "model", **hub_kwargs)
    adapter_dir = resolve_checkpoint(adapter, "adapter", **hub_kwargs) if adapter is not None else None
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        raise ValueError(f"adapter {adapter_dir} is not a LoRA adapter directory (it has no {ADAPTER_CONFIG})")
    if is_adapter_dir(model_dir):
        if adapter_dir is not None:
            raise ValueError(
                f"{model_dir} is itself an adapter; give its base as --model and it as --adapter, "
                "or the adapter alone as --model"
            )
        adapter_dir, model_dir = model_dir, resolve_checkpoint(adapter_base(model_dir), "base model", **hub_kwargs)

    target = choose_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    base = _load_base(model_dir, target, torch_dtype, device_map, load_4bit)
    processor = _load_processor(adapter_dir, model_dir)
    if adapter_dir is not None:
        base = _apply_adapter(base, adapter_dir, merge=merge_adapter and not load_4bit)
    base.set_generation_defaults(processor)
    return base.eval(), processor


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT (LoRA) adapter directory is one with ``adapter_config.json``."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(adapter_dir: str) -> str:
    """The base checkpoint an adapter was trained on (``base_model_name_or_path`` of its config)."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"adapter {adapter_dir} does not name its base model (base_model_name_or_path in "
            f"{ADAPTER_CONFIG}); pass the base with --model and the adapter with --adapter"
        )
    if not os.path.isdir(base) and os.path.isdir(os.path.join(adapter_dir, base)):
        base = os.path.join(adapter_dir, base)  # a path relative to the adapter
    return base


def _load_base(model_dir: str, device: torch.device, dtype: torch.dtype, device_map, load_4bit: bool):
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.vila_layout import is_vila_checkpoint

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json; it is not a VILA-HD checkpoint")
    if is_vila_checkpoint(model_dir):
        if load_4bit:
            raise ValueError(
                f"--load-4bit needs our single-directory layout; convert {model_dir} first with "
                "`vila-hd convert --to hf SRC DST`"
            )
        from vila_hd.model.modeling import load_vila_model

        return load_vila_model(model_dir, dtype=dtype, device=device_map or device)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map or {"": str(device)}}
    if load_4bit:
        kwargs["quantization_config"] = _four_bit_config(device, dtype)
    # Weights are created on the meta device and filled from the safetensors shards on their target
    # device: no second full copy in CPU memory.
    return VilaHDForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True, **kwargs)


def _four_bit_config(device: torch.device, dtype: torch.dtype):
    """The NF4 settings QLoRA trains with (:mod:`vila_hd.model.quantization`: one definition for both)."""
    from vila_hd.model.quantization import nf4_config, require_four_bit_support

    require_four_bit_support("--load-4bit", device)
    return nf4_config(dtype)


def _load_processor(adapter_dir: str | None, model_dir: str):
    from vila_hd.processing import PROCESSOR_CONFIG, VilaHDProcessor

    if adapter_dir is not None and os.path.isfile(os.path.join(adapter_dir, PROCESSOR_CONFIG)):
        return VilaHDProcessor.from_pretrained(adapter_dir)  # saved with the adapter (e.g. new tokens)
    return VilaHDProcessor.from_pretrained(model_dir)


def _apply_adapter(model, adapter_dir: str, merge: bool):
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(f"loading the adapter {adapter_dir} needs peft (pip install peft)") from err
    refuse_unsafe_adapter(adapter_dir)  # before peft would unpickle adapter_model.bin (weights-only)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not ours
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = PeftModel.from_pretrained(model, adapter_dir, trust_remote_code=False)
    # peft injects the LoRA layers in place: the unwrapped model runs with them (merged or not).
    return wrapped.merge_and_unload() if merge else wrapped.get_base_model()

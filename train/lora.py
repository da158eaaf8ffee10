"""LoRA for VILA-HD with peft: set-up, adapter checkpoints in PEFT format, loading and merging.

- LoRA on every linear layer of the LLM (``lm_head`` excepted), optionally on PS3's linear layers too;
- the projector, prompt head and selection modules, when trainable, are trained fully through peft's
  ``modules_to_save``: they are saved *inside* the adapter (``adapter_model.safetensors``), so any
  checkpoint's ``adapter/`` directory loads with plain ``PeftModel.from_pretrained`` -- in chat and eval
  (which recognise an adapter by its ``adapter_config.json``) and in :func:`merge_adapter`;
- QLoRA (``quantize: 4bit``) loads the LLM in 4 bits with bitsandbytes (a CUDA GPU is required), with the NF4
  settings of :mod:`vila_hd.model.quantization` (NF4 + double quantisation), the same ones 4-bit serving uses.

An adapter directory holds ``adapter_config.json`` (``base_model_name_or_path`` = the base checkpoint),
``adapter_model.safetensors`` and the processor files (tokenizer, chat template, image processor).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from torch import nn

from vila_hd.train.config import LoraConfig as LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
FULLY_TRAINED_MODULES = {
    "projector": ["mm_projector"],
    "prompt_head": ["mm_projector"],
    "selection": ["selection_feature_proj", "highres_selection_feature_module", "prompt_proj_for_highres"],
}


def lora_targets(model: nn.Module, vision_tower: bool) -> list[str]:
    """Full names of the linear layers that get LoRA: the ``llm`` part's except its head, and the
    ``vision_tower`` part's (PS3's trunk blocks) if asked."""
    from vila_hd.model.parts import part_of

    parts = ("llm", "vision_tower") if vision_tower else ("llm",)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and part_of(name) in parts and not name.endswith("lm_head"):
            names.append(name)
    if not names:
        raise ValueError("no linear layer found for LoRA (is this a VILA-HD model?)")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings, trainable_parts: list[str]):
    """Inject LoRA layers (in place) and wrap fully trained parts; returns the ``PeftModel``.

    The VILA-HD model keeps working as before (``peft_model.get_base_model()`` is ``model``)."""
    from peft import LoraConfig, get_peft_model

    save = sorted({m for part in trainable_parts for m in FULLY_TRAINED_MODULES.get(part, [])})
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings.vision_tower),
        modules_to_save=save or None,
        bias="none",
    )
    with peft_quietly():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_quietly():
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: drop that FutureWarning (nothing for
    the user to change), and only it, around our peft calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def in_adapter(name: str) -> bool:
    """Whether an adapter file holds the tensor called ``name``: a LoRA matrix or a fully trained module's copy."""
    from vila_hd.model.parts import place_of

    return place_of(name).peft in ("lora", "copy")


def save_adapter(peft_model, out_dir: str, processor, base_model: str, state_dict: dict | None = None) -> None:
    """Write the adapter in PEFT format (plus the processor) to ``out_dir``; ``state_dict`` (full tensors)
    is given under ZeRO-3, where the module's own tensors are partitioned."""
    os.makedirs(out_dir, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = os.path.abspath(base_model)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    peft_model.save_pretrained(out_dir, **kwargs)
    if processor is not None:
        processor.save_pretrained(out_dir)


def adapter_state_names(peft_model) -> list[str]:
    """Names (in the PeftModel) of the parameters an adapter file holds: LoRA and modules_to_save copies."""
    return [n for n, _ in peft_model.named_parameters() if in_adapter(n)]


def load_base_model(path: str, dtype: torch.dtype | None = None):
    """A VILA-HD checkpoint (our layout or VILA's) and its processor, on the CPU (fp32 unless ``dtype``), with
    :func:`vila_hd.loading.load_pretrained`."""
    from vila_hd.loading import load_pretrained

    return load_pretrained(path, dtype=dtype, device="cpu")


def adapter_base(adapter_dir: str) -> str | None:
    """The base checkpoint an adapter directory names (``base_model_name_or_path``; not checked to exist)."""
    import json

    from vila_hd.errors import naming_file

    if not os.path.exists(adapter_dir):
        raise FileNotFoundError(f"adapter {adapter_dir} does not exist")
    config_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{adapter_dir} is not an adapter directory (no {ADAPTER_CONFIG})")
    with naming_file(config_file), open(config_file) as f:
        config = json.load(f)
    return config.get("base_model_name_or_path") if isinstance(config, dict) else None


def load_adapter_model(adapter_dir: str, dtype: torch.dtype | None = None, merge: bool = False):
    """``(model, processor)`` for an adapter directory: its base (``base_model_name_or_path``) with the
    adapter applied (merged into the weights when ``merge``); the processor saved with the adapter wins."""
    from peft import PeftModel

    from vila_hd.hub import refuse_unsafe_adapter
    from vila_hd.processing import PROCESSOR_CONFIG, VilaHDProcessor

    base = adapter_base(adapter_dir)
    refuse_unsafe_adapter(adapter_dir)  # before the base is loaded, and before peft would unpickle a .bin
    if not base or not os.path.exists(base):
        raise FileNotFoundError(f"the base model of adapter {adapter_dir} ({base!r}, base_model_name_or_path in "
                                f"{ADAPTER_CONFIG}) does not exist")
    model, processor = load_base_model(base, dtype)
    if os.path.isfile(os.path.join(adapter_dir, PROCESSOR_CONFIG)):
        processor = VilaHDProcessor.from_pretrained(adapter_dir)
    with peft_quietly():
        wrapped = PeftModel.from_pretrained(model, adapter_dir, trust_remote_code=False)
    model = wrapped.merge_and_unload() if merge else wrapped
    return model, processor


def merge_adapter(adapter_dir: str, out_dir: str, dtype: torch.dtype | None = None, force: bool = False) -> str:
    """Fold an adapter into its base and write a plain VILA-HD checkpoint (safetensors + processor).

    ``out_dir`` may never be the adapter's base checkpoint or the adapter itself (resolved real paths), and
    must be a folder, empty or absent unless ``force`` (then an earlier checkpoint's weights there are deleted
    before writing); all is checked before anything is loaded."""
    check_merge_output(adapter_dir, out_dir, force)
    model, processor = load_adapter_model(adapter_dir, dtype=dtype, merge=True)
    os.makedirs(out_dir, exist_ok=True)
    remove_old_weights(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def check_merge_output(adapter_dir: str, out_dir: str, force: bool = False) -> None:
    """Refuse an output folder that would overwrite the base, the adapter or (without ``force``) other files."""
    from vila_hd.errors import VilaHDError

    base = adapter_base(adapter_dir)
    real_out = os.path.realpath(out_dir)
    if base and real_out == os.path.realpath(base):
        raise VilaHDError(f"--out {out_dir} is the adapter's base checkpoint ({base}, base_model_name_or_path in "
                          f"{ADAPTER_CONFIG}); merging would overwrite it: choose another --out")
    if real_out == os.path.realpath(adapter_dir):
        raise VilaHDError(f"--out {out_dir} is the adapter directory itself; choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise VilaHDError(f"--out {out_dir} is a file; expected a folder to write the merged checkpoint into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --force to write into it)")


def remove_old_weights(out_dir: str) -> None:
    """Delete an earlier checkpoint's weights (``*.safetensors`` shards and their index) from ``out_dir``, so
    that ``--force`` never leaves a stray shard of a bigger earlier merge beside the new checkpoint."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if (name.endswith(".safetensors") or name == "model.safetensors.index.json") and os.path.isfile(path):
            os.remove(path)


def four_bit_config(dtype: torch.dtype):
    """bitsandbytes config for QLoRA: :func:`vila_hd.model.quantization.nf4_config`, as 4-bit serving uses."""
    from vila_hd.model.quantization import nf4_config, require_four_bit_support

    require_four_bit_support("lora.quantize=4bit (QLoRA)")
    return nf4_config(dtype)

"""Initialise PS3 pre-training from SigLIP / SigLIP2 (transformers ``SiglipModel``) or PS3 checkpoints; export.

SigLIP -> PS3 (reference spec §1, §8):

* vision: the trunk keys come from :func:`vila_hd.ps3.convert_siglip.siglip_to_ps3`; the PS3 additions (selection
  projection, high-res ConvNet, prior prompt, position residuals) keep their fresh initialisation.
* text: ``embeddings.token_embedding`` -> ``token_embedding``, ``embeddings.position_embedding`` ->
  ``positional_embedding``, per layer ``layer_norm1/2`` -> ``ln_1/2``, ``self_attn.{q,k,v}_proj`` -> the fused
  ``attn.in_proj_{weight,bias}``, ``self_attn.out_proj`` -> ``attn.out_proj``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``,
  ``final_layer_norm`` -> ``ln_final``, ``head`` -> ``text_projection``. transformers' SigLIP text tower pools the
  last position after the final norm without a mask, as PS3's does with ``pool_type='last'`` and
  ``no_causal_mask``; the prompt projection stays freshly initialised.
* activation: transformers' SigLIP runs ``gelu_pytorch_tanh`` in both towers while the PS3 reference (timm /
  open_clip) uses exact GELU for SigLIP v1. A model initialised from a transformers checkpoint takes the
  checkpoint's activation (``vision_config.hidden_act`` and ``text_config.act_kwargs``) so that its features equal
  the checkpoint's; the exported config records it.
* ``logit_scale`` / ``logit_bias`` come from the checkpoint.

Only ``SiglipModel`` checkpoints (model_type ``siglip``; the fixed-resolution SigLIP2 releases use it too) are
read. NaFlex ``Siglip2Model`` checkpoints have another patch embedding and position table and are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vila_hd.ps3 import PS3Config
from vila_hd.ps3.convert_siglip import siglip_to_ps3

from .model import PS3ForPretraining

__all__ = [
    "export_ps3",
    "init_from_ps3",
    "init_from_siglip",
    "load_safetensors_dir",
    "siglip_text_to_ps3",
]

_SCALARS = ("logit_scale", "logit_bias")  # scalars in the reference's checkpoints, (1,) in the model
_TANH_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh")
_TEXT_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TEXT_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TEXT_SIMPLE = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "head.weight": "text_projection.weight",
    "head.bias": "text_projection.bias",
}


# --- reading checkpoints -------------------------------------------------------------------------------------------
def load_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        hint = f" (found {others}: only safetensors checkpoints are read)" if others else ""
        raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    return json.loads(file.read_text())


# --- SigLIP -> PS3 -------------------------------------------------------------------------------------------------
def siglip_text_to_ps3(state_dict: Mapping[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """transformers ``SiglipTextModel`` / ``SiglipModel`` text keys -> PS3 ``text_model.*`` keys.

    ``prefix`` precedes ``embeddings.`` (``text_model.`` in ``SiglipModel`` checkpoints); detected when None.
    """
    if prefix is None:
        prefix = "text_model." if any(k.startswith("text_model.embeddings.") for k in state_dict) else ""
    src = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key in _TEXT_SIMPLE:
            out["text_model." + _TEXT_SIMPLE[key]] = value
        elif match := _TEXT_LAYER.match(key):
            idx, name, kind = int(match[1]), match[2], match[3]
            block = f"text_model.transformer.resblocks.{idx}."
            if name in _TEXT_LAYER_NAMES:
                out[block + f"{_TEXT_LAYER_NAMES[name]}.{kind}"] = value
            elif name == "self_attn.q_proj":
                parts = [src[f"encoder.layers.{idx}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[block + f"attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio that open_clip's ``int(width * mlp_ratio)`` turns back into ``hidden`` (4 decimals when possible)."""
    for ratio in (round(hidden / width, 4), hidden / width, (hidden + 0.5) / width):
        if int(width * ratio) == hidden:
            return ratio
    raise ValueError(f"no mlp_ratio reproduces intermediate_size={hidden} at width={width}")


def ps3_config_for_siglip(
    siglip: Mapping[str, Any], base: PS3Config, hidden_act: str | None = None, text_act_kwargs: dict | None = None
) -> PS3Config:
    """``base`` with its backbone and text-tower sizes checked / taken from a ``SiglipModel`` config.json.

    The activations are the checkpoint's unless ``hidden_act`` / ``text_act_kwargs`` say otherwise (e.g. ``"gelu"``
    / ``{}`` for the reference's exact-GELU SigLIP v1 architecture, whose features then differ slightly from the
    checkpoint's).
    """
    model_type = siglip.get("model_type")
    if model_type != "siglip":
        hint = " (NaFlex Siglip2Model checkpoints are not supported; use a fixed-resolution release)" if model_type == "siglip2" else ""
        raise ValueError(f"expected a SiglipModel checkpoint (model_type 'siglip'), got model_type={model_type!r}{hint}")
    vis, txt = siglip["vision_config"], siglip["text_config"]
    config = PS3Config(vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict())
    v = config.vision_config
    grid = vis["image_size"] // vis["patch_size"]
    checks = {
        "hidden_size": (v.hidden_size, vis["hidden_size"]),
        "num_hidden_layers": (v.num_hidden_layers, vis["num_hidden_layers"]),
        "num_attention_heads": (v.num_attention_heads, vis["num_attention_heads"]),
        "intermediate_size": (v.intermediate_size, vis["intermediate_size"]),
        "patch_size": (v.patch_size, vis["patch_size"]),
        "low-res grid (ps3_scales[0] // patch_size vs image_size // patch_size)": (v.low_res_grid, grid),
    }
    bad = {name: pair for name, pair in checks.items() if pair[0] != pair[1]}
    if bad:
        detail = ", ".join(f"{name}: PS3 {ours} vs SigLIP {theirs}" for name, (ours, theirs) in bad.items())
        raise ValueError(f"the SigLIP vision tower does not match the PS3 backbone: {detail}")
    v.hidden_act = hidden_act or vis.get("hidden_act", "gelu_pytorch_tanh")
    v.layer_norm_eps = vis.get("layer_norm_eps", 1e-6)
    t = config.text_config
    t.width, t.heads, t.layers = txt["hidden_size"], txt["num_attention_heads"], txt["num_hidden_layers"]
    t.mlp_ratio = _mlp_ratio(txt["hidden_size"], txt["intermediate_size"])
    t.vocab_size, t.context_length = txt["vocab_size"], txt["max_position_embeddings"]
    t.output_dim = txt.get("projection_size") or txt["hidden_size"]
    t.prompt_proj_dim = v.hidden_size
    t.pool_type, t.no_causal_mask, t.proj_bias, t.embed_cls = "last", True, True, False
    t.final_ln_after_pool, t.ls_init_value = False, None
    t.act_kwargs = {"approximate": "tanh"} if txt.get("hidden_act", "gelu_pytorch_tanh") in _TANH_ACTS else {}
    if text_act_kwargs is not None:
        t.act_kwargs = dict(text_act_kwargs)
    t.norm_kwargs = {"eps": txt.get("layer_norm_eps", 1e-6)}
    return config


def init_from_siglip(
    path: str | os.PathLike,
    base: PS3Config,
    hidden_act: str | None = None,
    text_act_kwargs: dict | None = None,
    **model_kwargs,
) -> PS3ForPretraining:
    """A :class:`PS3ForPretraining` whose trunk, text tower and logit scalars come from a ``SiglipModel`` directory.

    ``base`` gives the PS3 geometry and selection modules (a preset or recipe); its backbone must match the
    checkpoint (checked), its text-tower shape and (unless ``hidden_act`` / ``text_act_kwargs`` are given) its
    activations are taken from the checkpoint. ``model_kwargs`` go to :class:`PS3ForPretraining`.
    """
    siglip = _read_config(path)
    config = ps3_config_for_siglip(siglip, base, hidden_act, text_act_kwargs)
    state = load_safetensors_dir(path)
    model = PS3ForPretraining(config, **model_kwargs)
    mapped = {"vision_model." + k: v for k, v in siglip_to_ps3(state, prefix="vision_model.").items()}
    mapped.update(siglip_text_to_ps3(state, prefix="text_model."))
    for name in ("logit_scale", "logit_bias"):
        if name in state:
            mapped[name] = state[name].reshape(1)
    own = model.state_dict()
    expected = {
        k for k in own
        if k.startswith(("vision_model.trunk.", "text_model.")) and not k.startswith("text_model.prompt_proj.")
    }
    missing = sorted(expected - set(mapped))
    unknown = sorted(set(mapped) - set(own))
    if missing or unknown:
        raise ValueError(f"{path}: SigLIP checkpoint does not cover the PS3 towers: missing {missing[:8]}, unknown {unknown[:8]}")
    _copy_into(model, mapped, str(path))
    return model


def init_from_ps3(path: str | os.PathLike, **model_kwargs) -> PS3ForPretraining:
    """A :class:`PS3ForPretraining` from a PS3 checkpoint directory in the official layout (ours or the reference's).

    ``logit_scale`` / ``logit_bias`` are read when the checkpoint has them (the reference saves them), else the
    SigLIP initial values are kept.
    """
    raw = _read_config(path)
    if raw.get("model_type") != "ps3":
        raise ValueError(f"{path}/config.json: expected model_type 'ps3' (vision + text), got {raw.get('model_type')!r}")
    config = PS3Config(**{k: v for k, v in raw.items() if k in ("vision_config", "text_config")})
    state = load_safetensors_dir(path)
    model = PS3ForPretraining(config, **model_kwargs)
    own = model.state_dict()
    tensors = {k: (v.reshape(1) if k in _SCALARS else v) for k, v in state.items()}
    missing = sorted(set(own) - set(tensors) - {"logit_scale", "logit_bias"})
    unknown = sorted(set(tensors) - set(own))
    if missing or unknown:
        raise ValueError(f"{path}: not a PS3 vision+text checkpoint: missing {missing[:8]}, unexpected {unknown[:8]}")
    _copy_into(model, tensors, str(path))
    return model


def _copy_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch: {bad[:8]}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


# --- export --------------------------------------------------------------------------------------------------------
def export_ps3(
    model: PS3ForPretraining,
    out_dir: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the official PS3 checkpoint layout: ``config.json`` (model_type ``ps3``), ``model.safetensors``
    (``vision_model.*``, ``text_model.*``, scalar ``logit_scale`` / ``logit_bias``), ``preprocessor_config.json`` and
    ``tokenizer_config.json`` (when the text config names a tokenizer).

    It loads with ``PS3Model`` / ``PS3VisionModel`` / ``PS3TextModel.from_pretrained`` and with the reference's
    key names. ``state_dict`` replaces the model's own (a consolidated ZeRO-3 state dict). The directory appears
    atomically: everything is written to a temporary sibling first.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in (state_dict or model.state_dict()).items()}
    tensors.update({k: tensors[k].reshape(()) for k in _SCALARS if k in tensors})
    expected = set(model.state_dict())
    if set(tensors) != expected:
        raise ValueError(
            f"state_dict keys differ from the model's: missing {sorted(expected - set(tensors))[:8]}, "
            f"unexpected {sorted(set(tensors) - expected)[:8]}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_official_config(model.config), indent=2, sort_keys=True) + "\n")
        size = model.config.vision_config.ps3_scales[-1]
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic", "resize_mode": "squash",
        }, indent=2) + "\n")
        text = model.config.text_config
        if text.hf_tokenizer_name:
            tok = {"tokenizer_name": text.hf_tokenizer_name, "context_length": text.context_length,
                   **text.tokenizer_kwargs}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _official_config(config: PS3Config) -> dict[str, Any]:
    vision = config.vision_config.to_dict()
    text = config.text_config.to_dict()
    vision["architectures"], text["architectures"] = ["PS3VisionModel"], ["PS3TextModel"]
    out = {"architectures": ["PS3Model"], "model_type": "ps3", "vision_config": vision, "text_config": text}
    import transformers

    out["transformers_version"] = transformers.__version__
    return out


"""Key mapping between transformers' SigLIP vision tower and PS3's timm-named trunk.

The two hold the same network: transformers splits q/k/v and stores the position table as an
embedding, timm fuses qkv and stores a (1, N, C) table; the MAP head uses ``nn.MultiheadAttention``
(``in_proj``) in transformers and separate ``q``/``kv`` projections in timm.
"""

from __future__ import annotations

import re

import torch

_HF = "vision_model."
_PS3 = "trunk."
_SIMPLE = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_LAYER = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def siglip_to_ps3(state_dict: dict[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """transformers ``SiglipVisionModel`` (or ``SiglipModel``) state dict -> PS3 ``trunk.*`` keys.

    ``prefix`` is what precedes ``embeddings.``/``encoder.`` (``vision_model.`` in hub checkpoints and
    transformers 4.x, empty in transformers 5's ``SiglipVisionModel``); detected when None.
    """
    if prefix is None:
        prefix = _HF if any(k.startswith(_HF + "embeddings.") for k in state_dict) else ""
    src = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key in _SIMPLE:
            out[_PS3 + _SIMPLE[key]] = value
        elif key == "embeddings.position_embedding.weight":
            out[_PS3 + "pos_embed"] = value.unsqueeze(0)
        elif key == "head.attention.in_proj_weight" or key == "head.attention.in_proj_bias":
            kind = key.rsplit("_", 1)[-1]
            q, k, v = value.chunk(3, dim=0)
            out[f"{_PS3}attn_pool.q.{kind}"] = q
            out[f"{_PS3}attn_pool.kv.{kind}"] = torch.cat([k, v], dim=0)
        elif match := _LAYER_RE.match(key):
            _map_layer(out, int(match[1]), match[2], match[3], value, src)
    return out


def _map_layer(out, idx: int, name: str, kind: str, value, src) -> None:
    base = f"{_PS3}blocks.{idx}."
    if name in _LAYER:
        out[base + f"{_LAYER[name]}.{kind}"] = value
    elif name == "self_attn.q_proj":
        parts = [src[f"encoder.layers.{idx}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
        out[base + f"attn.qkv.{kind}"] = torch.cat(parts, dim=0)


def ps3_to_siglip(state_dict: dict[str, torch.Tensor], prefix: str = _HF) -> dict[str, torch.Tensor]:
    """PS3 ``trunk.*`` keys (optionally under ``vision_model.``) -> transformers ``SiglipVisionModel`` keys."""
    src = {k.split(_PS3, 1)[1]: v for k, v in state_dict.items() if _PS3 in k}
    inverse = {v: k for k, v in _SIMPLE.items()}
    inverse_layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key in inverse:
            out[prefix + inverse[key]] = value
        elif key == "pos_embed":
            out[prefix + "embeddings.position_embedding.weight"] = value[0]
        elif key.startswith("attn_pool.q."):
            kind = key.rsplit(".", 1)[-1]
            k, v = src[f"attn_pool.kv.{kind}"].chunk(2, dim=0)
            out[f"{prefix}head.attention.in_proj_{kind}"] = torch.cat([value, k, v], dim=0)
        elif match := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            idx, name, kind = int(match[1]), match[2], match[3]
            layer = f"{prefix}encoder.layers.{idx}."
            if name in inverse_layer:
                out[layer + f"{inverse_layer[name]}.{kind}"] = value
            elif name == "attn.qkv":
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[layer + f"self_attn.{part}_proj.{kind}"] = chunk
    return out

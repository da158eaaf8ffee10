"""Writing the VILA checkpoint layout (``llm/``, ``vision_tower/``, ``mm_projector/`` + a top ``config.json``)
from a :class:`~vila_hd.model.VilaHDForConditionalGeneration` and its processor. The layout, and reading it:
:mod:`vila_hd.model.vila_layout`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors.torch import save_file

from vila_hd.hub import CheckpointError
from vila_hd.model.vila_layout import SUBDIRS, read_json

VILA_PROJECTOR_NAMES = {
    "mlp_downsample_2x2": "mlp_downsample_2x2_fix",
    "mlp_downsample_3x3": "mlp_downsample_3x3_fix",
    "linear": "linear",
}


# --- export ------------------------------------------------------------------------------------------
def with_legacy_rope(llm_cfg: dict[str, Any]) -> dict[str, Any]:
    """``llm_cfg`` plus the RoPE fields the transformers versions VILA pins (4.46, 4.56) read: ``rope_theta``
    and ``rope_scaling`` (they ignore transformers 5's ``rope_parameters`` and would use theta 10000)."""
    params = llm_cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return llm_cfg
    out = dict(llm_cfg)
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    out["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **scaling}  # 4.46+ read rope_type
    return out


def vila_top_config(model) -> dict[str, Any]:
    """The VILA top-level ``config.json`` for ``model``."""
    cfg = model.config
    vision, text = model.vision_tower.config, model.language_model.config
    projector = {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": VILA_PROJECTOR_NAMES[cfg.projector_type],
    }
    dtype = next(model.language_model.parameters()).dtype
    return {
        "architectures": ["LlavaTopDownLlamaModel"],
        "model_type": "llava_topdown_llama",
        "llm_cfg": with_legacy_rope(text.to_dict()),
        "vision_tower_cfg": vision.to_dict(),
        "mm_projector_cfg": projector,
        "hidden_size": text.hidden_size,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "ps3": True,
        "look_close_mode": cfg.look_close_mode,
        "num_look_close": cfg.num_look_close,
        "num_token_look_close": cfg.num_token_look_close,
        "top_down_prompt_head_type": cfg.prompt_head_type or "linear",
        "high_res_pos_embed": cfg.high_res_pos_embed,
        "mm_low_res_token_num": vision.low_res_token_num,
        "mm_scale_num": len(vision.ps3_scales),
        "model_dtype": str(dtype),
    }


def export_vila_checkpoint(model, processor, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` (+ its processor's tokenizer, template and image processor) in the VILA layout; the
    shards of ``llm/`` and ``vision_tower/`` hold at most ``max_shard_size`` (bytes, or e.g. ``"5GB"``)."""
    from vila_hd.templates import write_chat_template

    out_dir = os.fspath(out_dir)
    if model.config.look_close_mode == "after_prompt" and model.mm_projector.top_down_prompt_head is None:
        raise CheckpointError("a top-down (after_prompt) model needs a prompt head to be exported to VILA")
    os.makedirs(out_dir, exist_ok=True)
    llm_dir, vision_dir, proj_dir = (os.path.join(out_dir, d) for d in SUBDIRS)
    model.language_model.save_pretrained(llm_dir, safe_serialization=True, max_shard_size=max_shard_size)
    llm_config = os.path.join(llm_dir, "config.json")
    legacy = with_legacy_rope(read_json(llm_config))
    with open(llm_config, "w") as f:
        json.dump(legacy, f, indent=2)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(llm_dir)
    write_chat_template(llm_dir, processor.chat_template)
    model.vision_tower.save_pretrained(vision_dir, safe_serialization=True, max_shard_size=max_shard_size)
    processor.image_processor.save_pretrained(vision_dir)
    os.makedirs(proj_dir, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.mm_projector.state_dict().items()}
    if model.config.look_close_mode != "after_prompt":  # VILA has no head on bottom-up models
        state = {k: v for k, v in state.items() if not k.startswith("top_down_prompt_head.")}
    save_file(state, os.path.join(proj_dir, "model.safetensors"), metadata={"format": "pt"})
    top = vila_top_config(model)
    with open(os.path.join(proj_dir, "config.json"), "w") as f:
        json.dump(top["mm_projector_cfg"], f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(top, f, indent=2, default=str)

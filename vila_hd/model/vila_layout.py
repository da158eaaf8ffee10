"""Reading the VILA checkpoint layout (``llm/``, ``vision_tower/``, ``mm_projector/`` + a top ``config.json``)
into :class:`~vila_hd.model.VilaHDForConditionalGeneration`: the one detection of the format
(:func:`is_vila_checkpoint`), its configuration and its weights. (Its processor: ``vila_hd.processing``;
writing the layout: ``vila_hd.compat.vila_checkpoint``.)

Layout (what the released ``nvidia/VILA-HD-*`` repositories hold)::

    config.json     model_type "llava_topdown_llama", llm_cfg, vision_tower_cfg, mm_projector_cfg,
                    hidden_size, mm_hidden_size, mm_vision_select_layer, ps3, look_close_mode,
                    num_look_close, num_token_look_close, top_down_prompt_head_type, high_res_pos_embed,
                    mm_low_res_token_num, mm_scale_num
    llm/            HF causal LM + tokenizer (chat template, <image>)
    vision_tower/   PS3 vision checkpoint (vision_model.* keys) + preprocessor_config.json
    mm_projector/   config.json + model.safetensors (layers.1/2/4, top_down_prompt_head.*, ...)

The layout is recognised from ``config.json`` fields, never from a path. Vision configs may name the
scales ``s3_scales`` (VILA's pre-June-2025 name) or ``ps3_scales``. Weights are read from safetensors
only; missing, unexpected or mis-shaped tensors raise an error that names them. The model is assembled from
these pieces by :func:`vila_hd.model.modeling.load_vila_model` (what ``from_pretrained`` calls on this layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file

from vila_hd.dtypes import dtype_kwargs
from vila_hd.hub import CheckpointError

VILA_MODEL_TYPES = ("llava_topdown_llama", "llava_llama", "llava")
SUBDIRS = ("llm", "vision_tower", "mm_projector")


# --- detection and configuration ---------------------------------------------------------------------
def read_json(path: str) -> dict[str, Any]:
    """The JSON object of ``path``."""
    with open(path) as f:
        return json.load(f)


def is_vila_config(top: dict[str, Any]) -> bool:
    """True when a top-level ``config.json`` describes a VILA model (by ``model_type`` or its sub-config
    fields): the one test of the format, for local directories and Hub ids alike."""
    return top.get("model_type") in VILA_MODEL_TYPES or all(k in top for k in ("llm_cfg", "vision_tower_cfg"))


def is_vila_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path/config.json`` describes a VILA model (:func:`is_vila_config`)."""
    cfg = os.path.join(path, "config.json")
    return os.path.exists(cfg) and is_vila_config(read_json(cfg))


def check_layout(path: str) -> dict[str, Any]:
    """The top ``config.json`` of the VILA checkpoint ``path``, after checking the layout (and refusing custom
    code)."""
    from vila_hd.hub import refuse_custom_code

    if not os.path.isdir(path):
        raise FileNotFoundError(f"VILA checkpoint directory {path} does not exist")
    refuse_custom_code(path, "VILA checkpoint")  # before any transformers Auto* call reads llm/
    if not is_vila_checkpoint(path):
        raise CheckpointError(f"{path} is not a VILA checkpoint (config.json model_type not in {VILA_MODEL_TYPES})")
    missing = [d for d in SUBDIRS if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise CheckpointError(f"VILA checkpoint {path} lacks the sub-directories {missing}")
    return read_json(os.path.join(path, "config.json"))


def read_vision_config(vision_dir: str):
    """PS3 vision config of ``vision_dir`` (a ``ps3_vision_model`` or full ``ps3`` config; ``s3_scales`` ok)."""
    from vila_hd.errors import ConfigError
    from vila_hd.ps3 import PS3VisionConfig

    file = os.path.join(vision_dir, "config.json")
    data = read_json(file)
    if data.get("model_type") == "ps3" or "vision_config" in data:
        data = dict(data.get("vision_config") or {})
    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        return PS3VisionConfig(**data)
    except ConfigError as err:  # (an unknown backbone without its sizes): name the file
        raise ConfigError(f"{file}: {err}") from err


def read_vila_config(path: str | os.PathLike):
    """Translate a VILA checkpoint's configuration into a :class:`VilaHDConfig` (no weights read)."""
    from transformers import AutoConfig

    from vila_hd.model.configuration import VilaHDConfig

    path = os.fspath(path)
    top = check_layout(path)
    if not top.get("ps3", False):
        raise CheckpointError(
            f"{path}: config.json has ps3={top.get('ps3')!r}; only PS3 (VILA-HD) models are supported"
        )
    text_config = AutoConfig.from_pretrained(os.path.join(path, "llm"), trust_remote_code=False)
    vision_config = read_vision_config(os.path.join(path, "vision_tower"))
    proj_cfg_path = os.path.join(path, "mm_projector", "config.json")
    proj_cfg = read_json(proj_cfg_path) if os.path.exists(proj_cfg_path) else {}
    projector_type = proj_cfg.get("mm_projector_type") or (top.get("mm_projector_cfg") or {}).get("mm_projector_type")
    if projector_type is None:
        raise CheckpointError(f"{path}: no mm_projector_type in mm_projector/config.json or config.json")
    _check_sizes(path, top, text_config, vision_config)
    mode = top.get("look_close_mode") or "after_image"
    # VILA builds the prompt head only for top-down models.
    head = top.get("top_down_prompt_head_type", "linear") if mode == "after_prompt" else None
    tokens = top.get("num_token_look_close")
    steps = None if tokens is not None else top.get("num_look_close", 1)
    return VilaHDConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=projector_type,
        prompt_head_type=head,
        high_res_pos_embed=bool(top.get("high_res_pos_embed", False)),
        look_close_mode=mode,
        num_look_close=steps,
        num_token_look_close=tokens,
        vision_feature_layer=int(top.get("mm_vision_select_layer", -2)),
    )


def _check_sizes(path: str, top: dict, text_config, vision_config) -> None:
    expected = {
        "hidden_size": text_config.hidden_size,
        "mm_hidden_size": vision_config.hidden_size,
        "mm_low_res_token_num": vision_config.low_res_token_num,
        "mm_scale_num": len(vision_config.ps3_scales),
    }
    bad = [
        f"{k}={top[k]} (the sub-checkpoints give {v})"
        for k, v in expected.items()
        if top.get(k) is not None and top[k] != v
    ]
    if bad:
        raise CheckpointError(f"{path}: config.json disagrees with llm/ and vision_tower/: {', '.join(bad)}")


def read_vila_tokenizer(path: str, config) -> tuple[Any, str]:
    """The tokenizer of ``llm/`` and its chat template (``llm/``'s template file, the tokenizer's own, or the
    fallback of the LLM's family)."""
    from transformers import AutoTokenizer

    from vila_hd.templates import fallback_chat_template, read_chat_template

    llm_dir = os.path.join(path, "llm")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
    template = read_chat_template(llm_dir) or getattr(tokenizer, "chat_template", None)
    return tokenizer, template or fallback_chat_template(config.text_config)


# --- loading -----------------------------------------------------------------------------------------
def _check_part(part: str, info: dict[str, Any], path: str, allow_missing_keys, allow_unexpected_keys) -> None:
    """Raise on the part's missing / unexpected / mis-shaped tensors, named as keys of the combined model
    (``language_model.*``, ``vision_tower.*``, ``mm_projector.*``: the patterns of our single-directory format)."""
    from vila_hd.hub import check_loading_info

    prefix = _PART_PREFIX[part]
    named = {
        "missing_keys": [prefix + k for k in info.get("missing_keys") or ()],
        "unexpected_keys": [prefix + k for k in info.get("unexpected_keys") or ()],
        "mismatched_keys": [(prefix + e[0], *e[1:]) if isinstance(e, (tuple, list)) else prefix + str(e)
                            for e in info.get("mismatched_keys") or ()],
    }
    check_loading_info(named, f"VILA checkpoint {path} ({part}/)", allow_missing_keys, allow_unexpected_keys)


_PART_PREFIX = {"llm": "language_model.", "vision_tower": "vision_tower.", "mm_projector": "mm_projector."}


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load the tensors of ``state`` that fit ``module``; returns the loading report (missing, unexpected and
    mis-shaped keys) for :func:`_check_part` to judge."""
    own = module.state_dict()
    bad = {k for k in own.keys() & state.keys() if state[k].shape != own[k].shape}
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(bad)]
    fitting = {k: v for k, v in state.items() if k in own and k not in bad}
    module.load_state_dict(fitting, strict=False)
    return {"missing_keys": sorted(set(own) - set(state)), "unexpected_keys": sorted(set(state) - set(own)),
            "mismatched_keys": mismatched}


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory's ``*.safetensors`` files (single or sharded); refuses pickles."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {pickled}; only safetensors are loaded)" if pickled else ""
        raise CheckpointError(f"{directory} has no .safetensors weights{hint}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    return state


def read_vila_checkpoint(path: str) -> tuple[Any, Any, str]:
    """``(config, tokenizer, chat template)`` of the VILA checkpoint ``path``, after refusing pickled weights
    and custom code; ``config.image_token_id`` is the tokenizer's."""
    from vila_hd.hub import refuse_pickled_weights
    from vila_hd.templates import image_token_id

    for part in ("llm", "vision_tower"):  # mm_projector: read_safetensors_dir refuses pickles itself
        refuse_pickled_weights(os.path.join(path, part), "VILA checkpoint part")
    config = read_vila_config(path)
    tokenizer, template = read_vila_tokenizer(path, config)
    config.image_token_id = image_token_id(tokenizer, config.image_token)
    return config, tokenizer, template


def load_vila_parts(path: str, config, dtype, device, attn_implementation: str,
                    allow_missing_keys: Sequence[str] = (), allow_unexpected_keys: Sequence[str] = ()):
    """``(llm, vision_tower)`` of the VILA checkpoint ``path``, placed as :func:`_part_device_maps` says and
    checked by :func:`_check_part`; ``config`` takes their configurations."""
    from transformers import AutoModelForCausalLM

    from vila_hd.hub import quiet_load_report
    from vila_hd.ps3 import PS3VisionModel

    llm_map, vision_map = _part_device_maps(device)
    with quiet_load_report():  # judged by _check_part, named as keys of the combined model
        llm, info = AutoModelForCausalLM.from_pretrained(
            os.path.join(path, "llm"),
            output_loading_info=True,
            use_safetensors=True,
            trust_remote_code=False,
            ignore_mismatched_sizes=True,  # (mis-shaped tensors: named by _check_part, not raised by transformers)
            attn_implementation=attn_implementation,
            **dtype_kwargs(dtype),
            **llm_map,
        )
    _check_part("llm", info, path, allow_missing_keys, allow_unexpected_keys)
    if vision_map is None:  # an accelerate strategy: follow the LLM's input embeddings
        vision_map = {"device_map": {"": str(llm.get_input_embeddings().weight.device)}}
    vision, info = PS3VisionModel.from_pretrained(
        os.path.join(path, "vision_tower"),
        config=config.vision_config,
        output_loading_info=True,
        use_safetensors=True,
        allow_missing_keys=[".*"],  # judged below under the combined model's names
        allow_unexpected_keys=[".*"],
        ignore_mismatched_sizes=True,
        **dtype_kwargs(dtype),
        **vision_map,
    )
    _check_part("vision_tower", info, path, allow_missing_keys, allow_unexpected_keys)
    config.text_config = llm.config
    config.vision_config = vision.config
    return llm, vision


def load_vila_projector(projector: torch.nn.Module, path: str, allow_missing_keys: Sequence[str] = (),
                        allow_unexpected_keys: Sequence[str] = ()) -> None:
    """Fill ``projector`` from ``mm_projector/`` (checked by :func:`_check_part`)."""
    info = load_state_checked(projector, read_safetensors_dir(os.path.join(path, "mm_projector")))
    _check_part("mm_projector", info, path, allow_missing_keys, allow_unexpected_keys)


_ACCELERATE_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _part_device_maps(device) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``from_pretrained`` placement kwargs for the LLM and the vision tower (None: follow the LLM)."""
    if device is None or isinstance(device, dict):
        return {}, {}
    if isinstance(device, str) and device in _ACCELERATE_STRATEGIES:
        return {"device_map": device}, None
    on = {"device_map": {"": str(torch.device(device))}}
    return on, on

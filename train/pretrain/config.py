"""PS3 pre-training recipes: typed sections, YAML loading with unknown-key errors, ``--set`` overrides.

The optimizer, batch, checkpoint and logging sections are the MLLM stages' own (:mod:`vila_hd.train.config`), and so are
the YAML builder and the override syntax. A recipe (see ``configs/ps3/``)::

    output_dir: outputs/ps3_pretrain/ps3_1.5k_siglip
    init: {source: siglip, path: google/siglip-so400m-patch14-384, preset: PS3-1.5K-SigLIP}
    model: {select_with_gt: true, pool_gt_token_only: true, train_only_selection: false}
    data: {train: data/boxes.jsonl, global_caption_prob: 0.25, caption_cleanup: [sentence_masking]}
    loss: {bottomup_weight: 1.0, topdown_weight: 1.0}
    lr: 5.0e-6
    optim: {weight_decay: 3.0e-4, betas: [0.9, 0.95], warmup_steps: 1500}
    batch: {micro_batch_size: 32, global_batch_size: 8192}
    deepspeed: zero2                      # a name in configs/deepspeed/, a JSON path, or an inline mapping
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from vila_hd import configs
from vila_hd.train.config import (
    BatchConfig,
    CheckpointConfig,
    CompileConfig,
    LoggingConfig,
    OptimConfig,
    apply_overrides,
    build_section,
    checked_field,
)

__all__ = [
    "PS3DataConfig",
    "PS3InitConfig",
    "PS3LossConfig",
    "PS3ModelConfig",
    "PretrainConfig",
    "SyntheticDataConfig",
    "load_pretrain_config",
    "pretrain_config_from_dict",
]

INIT_SOURCES = ("siglip", "ps3", "random")


@dataclass
class PS3InitConfig:
    """Where the weights come from: ``siglip`` (a transformers ``SiglipModel`` directory or Hub id: trunk, text
    tower and logit scalars), ``ps3`` (a PS3 checkpoint in the official layout, e.g. a previous run's ``final``)
    or ``random``. ``preset`` gives the PS3 geometry for ``siglip`` / ``random`` (a released name such as
    ``PS3-4K-SigLIP``, or ``tiny``); ``vision_overrides`` / ``text_overrides`` replace config fields. From SigLIP
    the activations follow the checkpoint unless ``vision_overrides.hidden_act`` / ``text_overrides.act_kwargs``
    are given (``gelu`` / ``{}``: the reference's exact-GELU SigLIP v1 architecture)."""

    source: str = "siglip"
    path: str | None = None
    preset: str = "PS3-1.5K-SigLIP"
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    text_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.source not in INIT_SOURCES:
            raise ValueError(f"init.source must be one of {INIT_SOURCES}, got {self.source!r}")
        if self.source != "random" and not self.path:
            raise ValueError(f"init.source={self.source!r} needs init.path (a directory or Hub id)")


@dataclass
class PS3ModelConfig:
    logit_scale: float = 10.0  # initial exp(logit_scale) when not read from the init checkpoint
    logit_bias: float = -10.0
    select_with_gt: bool = True  # GT-box patches first, the rest of the step by top-down probability
    pool_gt_token_only: bool = True  # box-masked attention pooling for local captions
    tokens_per_step: int | None = None  # patches of the one look-close step (default: max_select_num, 2560)
    train_only_selection: bool = False  # freeze all but the selection modules (no contrastive branch)
    gradient_checkpointing: bool = True


@dataclass
class SyntheticDataConfig:
    """Generate a synthetic box-caption set (and its word tokenizer) under ``<output_dir>/synthetic``."""

    num_images: int = 64
    size: int = 448
    seed: int = 0


@dataclass
class PS3DataConfig:
    train: str | list[str] | None = None  # JSONL file(s) of box-caption records
    hf_dataset: str | None = None  # or: a `datasets` directory (save_to_disk) or Hub dataset name
    hf_split: str = "train"
    image_root: str | None = None  # relative image paths (default: each JSONL's directory)
    tokenizer: str | None = None  # default: the text config's hf_tokenizer_name
    global_caption_prob: float = 0.25
    crop_scale: tuple[float, float] = (0.9, 1.0)
    caption_cleanup: list[str] = field(default_factory=list)
    num_workers: int = 4
    max_pixels: int | None = 178_956_970
    synthetic: SyntheticDataConfig | None = None

    def validate(self) -> None:
        sources = [self.train is not None, self.hf_dataset is not None, self.synthetic is not None]
        if sum(sources) != 1:
            raise ValueError("data needs exactly one of: train (JSONL), hf_dataset, synthetic")


@dataclass
class PS3LossConfig:
    bottomup_weight: float = 1.0  # BCE of bottom-up selection probabilities vs the box map
    topdown_weight: float = 1.0  # BCE of top-down selection probabilities vs the box map


@dataclass
class PretrainConfig:
    output_dir: str = "outputs/ps3_pretrain"
    init: PS3InitConfig = field(default_factory=PS3InitConfig)
    model: PS3ModelConfig = field(default_factory=PS3ModelConfig)
    data: PS3DataConfig = field(default_factory=PS3DataConfig)
    loss: PS3LossConfig = field(default_factory=PS3LossConfig)
    lr: float = 5e-6
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp32
    deepspeed: str | dict[str, Any] = "zero2"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Regional torch.compile (off by default): `vision` = the PS3 trunk's blocks, `llm` = the text tower's.
    compile: CompileConfig = field(default_factory=CompileConfig)

    def validate(self) -> None:
        self.init.validate()
        self.data.validate()
        self.compile.validate()
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.batch.micro_batch_size < 1:
            raise ValueError("batch.micro_batch_size must be >= 1")
        if not 0.0 <= self.data.global_caption_prob <= 1.0:
            raise ValueError(f"data.global_caption_prob must lie in [0, 1], got {self.data.global_caption_prob}")
        if self.model.pool_gt_token_only and not self.model.select_with_gt:
            raise ValueError("model.pool_gt_token_only needs model.select_with_gt")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "init": PS3InitConfig,
    "model": PS3ModelConfig,
    "loss": PS3LossConfig,
    "optim": OptimConfig,
    "batch": BatchConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "compile": CompileConfig,
}


def pretrain_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> PretrainConfig:
    """Build and validate a :class:`PretrainConfig`; unknown keys are errors naming their full path."""
    data = apply_overrides(dict(data or {}), overrides)
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS:
            kwargs[name] = build_section(_SECTIONS[name], value, name)
        elif name == "data":
            section = dict(value or {})
            synthetic = section.pop("synthetic", None)
            built = build_section(PS3DataConfig, section, "data")
            if synthetic is not None:
                built.synthetic = build_section(SyntheticDataConfig, synthetic, "data.synthetic")
            built.crop_scale = tuple(float(v) for v in built.crop_scale)
            kwargs[name] = built
        else:
            kwargs[name] = checked_field(PretrainConfig, name, value, name)
    config = PretrainConfig(**kwargs)
    config.validate()
    return config


def load_pretrain_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a PS3 pre-training YAML (a path, or a shipped recipe's name: :func:`vila_hd.configs.find`) and apply
    ``--set key=value`` overrides; errors name the file and the key."""
    path = configs.find(path, "ps3")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    try:
        return pretrain_config_from_dict(data, overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None

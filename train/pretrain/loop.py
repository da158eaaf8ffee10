"""A PS3 pre-training run from its recipe: ``setup -> Trainer.train -> export``.

Everything around the model is the MLLM stages' machinery, reused as is: :class:`vila_hd.train.trainer.Trainer` (the
DeepSpeed loop: ZeRO, bf16, gradient clipping, warm-up + cosine, loss normalised by global counts, logs, MFU),
:mod:`vila_hd.train.checkpoint` (atomic checkpoints, exact resume, keep-last-N), :class:`vila_hd.train.data.sampler.StepSampler`
and :class:`vila_hd.train.stage.StageData` (the data position is the step count), :class:`vila_hd.train.flops.FlopsModel` (MFU) and
:func:`vila_hd.train.trainer.consolidated_state_dict` (ZeRO-3 gathering for the export). This module adds the PS3 pieces:
the training forward (:class:`PS3PretrainStep`), the box-caption data, and the export in the official PS3 layout
to ``<output_dir>/final``.

    vila-hd pretrain configs/ps3/tiny_demo.yaml                  # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 -m vila_hd.train.pretrain.loop configs/ps3/ps3_4k_siglip.yaml
    deepspeed --num_gpus 8 --module vila_hd.train.pretrain.loop configs/ps3/ps3_4k_siglip.yaml --set batch.micro_batch_size=16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vila_hd.ps3 import PS3Config, PS3Tokenizer, preset_config
from vila_hd.train.data.sampler import StepSampler

from .arguments import command
from .config import PretrainConfig, load_pretrain_config
from .data import BoxCaptionDataset, collate_box_caption
from .init import export_ps3, init_from_ps3, init_from_siglip
from .model import PS3ForPretraining, loss_counts, pretrain_loss_sums

__all__ = [
    "EpochKeyedSampler",
    "PS3PretrainStep",
    "PretrainRun",
    "build_model",
    "build_pretrain_data",
    "collate_for_trainer",
    "pretrain",
    "pretrain_flops",
    "pretrain_main",
    "run_pretrain",
]


# --- the training forward --------------------------------------------------------------------------------------------
class PS3PretrainStep(nn.Module):
    """What DeepSpeed wraps: ``forward(batch)`` -> per-term loss sums (the trainer normalises them)."""

    def __init__(self, model: PS3ForPretraining):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch["pixel_values"], batch["input_ids"], batch["boxes"], batch["is_global"])
        return pretrain_loss_sums(out)


# --- model -----------------------------------------------------------------------------------------------------------
def base_config(config: PretrainConfig) -> PS3Config:
    """The PS3 geometry of the recipe: ``init.preset`` (``tiny`` or a released name) with the overrides applied."""
    init = config.init
    if init.preset == "tiny":
        from .synthetic import tiny_ps3_config

        base = tiny_ps3_config()
    else:
        base = preset_config(init.preset)
    vision = {**base.vision_config.to_dict(), **init.vision_overrides}
    text = {**base.text_config.to_dict(), **init.text_overrides}
    return PS3Config(vision_config=vision, text_config=text)


def _local_dir(path: str, what: str) -> str:
    """A local directory, or a Hub repository downloaded (config + safetensors only) by rank 0 first."""
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{what} {path!r} is not a directory (and not a Hub id owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.safetensors.index.json"]

    def download() -> str:
        try:
            return snapshot_download(path, allow_patterns=patterns)
        except Exception as e:  # offline, unknown repository, gated, ...
            raise FileNotFoundError(
                f"{what} {path!r} is not a local directory and its Hub download failed: {type(e).__name__}: {e}"
            ) from None

    local = download() if _rank() == 0 else None
    _barrier()
    return local if local is not None else download()


def build_model(config: PretrainConfig) -> PS3ForPretraining:
    """The model of the recipe's ``init`` with its ``model`` settings applied (trainable set, checkpointing)."""
    m = config.model
    kwargs = dict(logit_scale=m.logit_scale, logit_bias=m.logit_bias, select_with_gt=m.select_with_gt,
                  pool_gt_token_only=m.pool_gt_token_only, tokens_per_step=m.tokens_per_step)
    init = config.init
    if init.source == "siglip":  # explicit activation overrides win over the checkpoint's
        acts = dict(hidden_act=init.vision_overrides.get("hidden_act"), text_act_kwargs=init.text_overrides.get("act_kwargs"))
        model = init_from_siglip(_local_dir(init.path, "init.path"), base_config(config), **acts, **kwargs)
    elif init.source == "ps3":
        model = init_from_ps3(_local_dir(init.path, "init.path"), **kwargs)
    else:
        model = PS3ForPretraining(base_config(config), **kwargs)
    if m.train_only_selection:
        model.train_only_selection()
    model.set_gradient_checkpointing(m.gradient_checkpointing)
    if config.compile.enabled:
        from vila_hd.train.compile import compile_pretraining_blocks, describe

        compiled = compile_pretraining_blocks(model, config.compile)
        if _rank() == 0:
            print(describe(compiled, config.compile), flush=True)
    return model


# --- data ------------------------------------------------------------------------------------------------------------
class EpochKeyedSampler(StepSampler):
    """:class:`StepSampler` whose micro-batches hold ``(epoch, index)`` keys, so that each sample's random caption
    choice and crop depend on the epoch (DataLoader workers never see a ``set_epoch``) and resume exactly."""

    def micro_batches(self, start_step: int, total_steps: int):
        indices = super().micro_batches(start_step, total_steps)
        for step in range(start_step, total_steps):
            epoch = step // self.steps_per_epoch
            for _ in range(self.grad_accum):
                yield [(epoch, i) for i in next(indices)]


def collate_for_trainer(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stacked samples plus what the trainer reads: ``num_items`` (per loss term) and ``num_samples``."""
    batch = collate_box_caption(items)
    batch["num_items"] = loss_counts(batch["is_global"])
    batch["num_samples"] = len(items)
    return batch


def _synthetic_paths(config: PretrainConfig) -> tuple[str, str]:
    root = os.path.join(config.output_dir, "synthetic")
    return os.path.join(root, "data.jsonl"), os.path.join(root, "tokenizer")


def prepare_synthetic(config: PretrainConfig) -> None:
    """Write the synthetic set and its tokenizer once (rank 0; the others wait)."""
    jsonl, tokenizer = _synthetic_paths(config)
    if _rank() == 0 and not (os.path.isfile(jsonl) and os.path.isdir(tokenizer)):
        from .synthetic import write_dataset, write_word_tokenizer

        syn = config.data.synthetic
        write_dataset(os.path.dirname(jsonl), syn.num_images, seed=syn.seed, size=syn.size)
        write_word_tokenizer(tokenizer)
    _barrier()


def build_tokenizer(config: PretrainConfig, model: PS3ForPretraining) -> PS3Tokenizer:
    """``data.tokenizer`` (or the synthetic set's, or the text config's ``hf_tokenizer_name``) with the text
    config's context length and cleaning; the name is recorded in the exported config."""
    text = model.config.text_config
    name = config.data.tokenizer
    if name is None and config.data.synthetic is not None:
        name = _synthetic_paths(config)[1]
    name = name or text.hf_tokenizer_name
    if not name:
        raise ValueError("no tokenizer: set data.tokenizer (the text config names none)")
    extra = {k: v for k, v in (text.tokenizer_kwargs or {}).items() if k in ("clean", "strip_sep_token", "language")}
    text.hf_tokenizer_name = name
    return PS3Tokenizer(tokenizer_name=name, context_length=text.context_length, **extra)


def _records(config: PretrainConfig):
    data = config.data
    if data.synthetic is not None:
        return _synthetic_paths(config)[0]
    if data.train is not None:
        return data.train if isinstance(data.train, str) else list(data.train)
    import datasets

    if os.path.isdir(data.hf_dataset):
        loaded = datasets.load_from_disk(data.hf_dataset)
        return loaded[data.hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(data.hf_dataset, split=data.hf_split)


def build_pretrain_data(config: PretrainConfig, model: PS3ForPretraining, world: int, rank: int, grad_accum: int):
    """The trainer's data object (:class:`vila_hd.train.stage.StageData` over :class:`EpochKeyedSampler`)."""
    from vila_hd.train.stage import StageData

    if config.data.synthetic is not None:
        prepare_synthetic(config)
    tokenizer = build_tokenizer(config, model)
    dataset = BoxCaptionDataset(
        _records(config), tokenizer, model.config.vision_config.ps3_scales[-1], image_root=config.data.image_root,
        global_caption_prob=config.data.global_caption_prob, crop_scale=config.data.crop_scale,
        caption_cleanup=config.data.caption_cleanup, seed=config.seed, max_pixels=config.data.max_pixels,
    )
    sampler = EpochKeyedSampler(len(dataset), config.batch.micro_batch_size, grad_accum, world, rank, config.seed)
    return StageData(dataset, collate_for_trainer, sampler, config.data.num_workers, config.seed)


# --- FLOPs -----------------------------------------------------------------------------------------------------------
def pretrain_flops(model: PS3ForPretraining, context_length: int | None = None) -> Any:
    """``flops(batch)`` of one micro-batch, with the MLLM trainer's convention (:mod:`vila_hd.train.flops`): 6 x params x
    tokens for trained towers plus attention, for the trunk over 729 low-res + one step of selected patches per
    image and for the text tower over its context. Global-caption images skip the high-res step (all but one
    when a micro-batch holds only global captions: one runs as a dummy). In selection-only training the towers
    run forward only (factor 2) and the high-res pass is skipped. The selection ConvNet and heads (< 1%) are not
    counted."""
    from vila_hd.train.flops import FlopsModel

    vision, text = model.config.vision_config, model.config.text_config
    trunk = model.vision_model.trunk
    vis = sum(p.numel() for n, p in trunk.named_parameters() if n.startswith(("blocks.", "patch_embed.")))
    txt = sum(p.numel() for n, p in model.text_model.transformer.named_parameters())
    factor = 2.0 if not model.contrastive else 6.0
    step = model.tokens_per_step or sum(vision.budget_each_scale)
    selected = step if model.contrastive else 0

    def counting(selected: int) -> FlopsModel:
        return FlopsModel(
            llm_params=int(txt), llm_layers=text.layers, llm_width=text.width, vision_params=int(vis),
            vision_layers=vision.num_hidden_layers, vision_width=vision.hidden_size,
            low_res_patches=vision.low_res_token_num, selected_patches=selected, patches_per_step=max(step, 1),
            vision_factor=factor,
        )

    flops, low_only = counting(selected), counting(0)
    length = context_length or text.context_length

    def batch_flops(batch: dict) -> float:
        n = int(batch["pixel_values"].shape[0])
        skipped = min(int(batch["is_global"].sum()), n - 1) if selected else 0
        return flops.vision(n - skipped) + low_only.vision(skipped) + flops.llm([length] * n, factor)

    return batch_flops


# --- the run ---------------------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _deepspeed_template(spec: str | dict) -> dict:
    if isinstance(spec, dict):
        return spec
    from vila_hd.train.config import deepspeed_config_path

    with open(deepspeed_config_path(spec)) as f:
        return json.load(f)


def export_final(trainer, model: PS3ForPretraining, out_dir: str) -> None:
    """Gathered weights (ZeRO-3 partitions joined) in the official PS3 layout (all ranks call)."""
    from vila_hd.train.trainer import consolidated_state_dict

    state = consolidated_state_dict(trainer.engine, model)
    if _rank() == 0:
        keys = set(model.state_dict())
        export_ps3(model, out_dir, state_dict={k: v for k, v in state.items() if k in keys}, overwrite=True)
        print(f"exported the PS3 checkpoint to {out_dir}", flush=True)
    _barrier()


@dataclass
class PretrainRun:
    """What :func:`run_pretrain` leaves: the last logged metrics and the trained objects."""

    metrics: dict[str, Any]
    trainer: Any
    model: PS3ForPretraining


def run_pretrain(config: PretrainConfig, resume: bool = True, until: int | None = None) -> PretrainRun:
    """Train to ``max_steps`` / ``epochs`` (or stop after step ``until`` with a checkpoint, as a preempted job
    would), resuming from ``<output_dir>/checkpoints/latest`` when asked."""
    from vila_hd.train.stage import grad_accumulation
    from vila_hd.train.trainer import Trainer, TrainerHooks, TrainerSettings, init_distributed

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(config.seed)
    model = build_model(config)
    step_module = PS3PretrainStep(model).train()
    accum = grad_accumulation(config, world)
    data = build_pretrain_data(config, model, world, rank, accum)

    wd = config.optim.weight_decay
    groups = model.param_groups(wd)
    param_groups = [dict(groups[0], name="ps3", lr=config.lr), dict(groups[1], name="ps3.no_decay", lr=config.lr)]
    param_groups = [g for g in param_groups if g["params"]]
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "pretrain.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
        n_train = sum(p.numel() for g in param_groups for p in g["params"])
        n_total = sum(p.numel() for p in model.parameters())
        print(f"PS3 pre-training: {n_train:,} / {n_total:,} parameters trainable", flush=True)

    total = config.max_steps or max(1, int(round(config.epochs * data.steps_per_epoch)))
    warmup = config.optim.warmup_steps
    if warmup is None:
        warmup = int(round(config.optim.warmup_ratio * total))
    weights = {"siglip": 1.0, "bce_bottomup": config.loss.bottomup_weight, "bce_topdown": config.loss.topdown_weight,
               "topdown_box_recall": 0.0}  # a metric riding on the loss channel (weight 0: no gradient)
    settings = TrainerSettings(
        output_dir=config.output_dir, deepspeed_config=_deepspeed_template(config.deepspeed),
        micro_batch_size=config.batch.micro_batch_size, grad_accum=accum, total_steps=total, warmup_steps=warmup,
        min_lr_ratio=config.optim.min_lr_ratio, betas=tuple(config.optim.betas), eps=config.optim.eps,
        max_grad_norm=config.optim.max_grad_norm, precision=config.precision, loss_weights=weights,
        required_items=("siglip",) if model.contrastive else ("bce_topdown",),
        checkpoint_every=config.checkpoint.every_steps, keep_last=config.checkpoint.keep_last,
        log_every=config.logging.every_steps, tensorboard=config.logging.tensorboard, wandb=config.logging.wandb,
        wandb_project=config.logging.wandb_project, progress_bar=config.logging.progress_bar,
        peak_tflops=config.logging.peak_tflops, hidden_size=model.config.vision_config.hidden_size,
        run_config=config.to_dict(),
    )
    hooks = TrainerHooks(flops=pretrain_flops(model))
    if config.checkpoint.export_final:
        hooks.export = lambda trainer, out_dir: export_final(trainer, model, out_dir)
    trainer = Trainer(step_module, param_groups, data, settings, hooks)
    return PretrainRun(trainer.train(resume=resume, until=until), trainer, model)


def pretrain(args: argparse.Namespace) -> int:
    """``vila-hd pretrain CONFIG [--set key=value ...] [--no-resume] [--until N]``: run the recipe; exit code 0."""
    config = load_pretrain_config(args.config, args.overrides)
    metrics = run_pretrain(config, resume=not args.no_resume, until=args.until).metrics
    if _rank() == 0 and metrics:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}), flush=True)
    return 0


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """``vila-hd pretrain`` on its own (``torchrun -m vila_hd.train.pretrain.loop CONFIG ...``): the exit code."""
    return command(pretrain).main(argv)


if __name__ == "__main__":
    from vila_hd.arguments import guarded

    sys.exit(guarded(pretrain_main))

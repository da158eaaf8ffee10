"""One VILA-HD training stage from its recipe: ``setup -> Trainer.train -> export``.

:func:`run_stage` loads the init (previous stage, base checkpoints or a tiny preset), freezes everything
but the trainable parts (one optimizer group per part, each with its own learning rate; optionally LoRA),
builds the data mixture, wraps the model in :class:`~vila_hd.train.model_step.VilaHDTrainStep` and hands it to the
generic :class:`~vila_hd.train.trainer.Trainer`. The final export is a Hugging Face checkpoint in
``<output_dir>/final`` (ZeRO-3 weights gathered) or, for LoRA, an adapter directory there.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vila_hd.compat import datasets as ds
from vila_hd.model.parts import PARTS, place_of
from vila_hd.train.config import StageConfig, read_deepspeed_config
from vila_hd.train.data.sampler import check_enough_samples

# --- model ------------------------------------------------------------------------------------------


def _dtype(config: StageConfig) -> torch.dtype:
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def load_init(config: StageConfig):
    """``(model, processor)`` of the stage's init."""
    init = config.init
    dtype = _dtype(config)
    if init.model is not None:
        from vila_hd.train.lora import load_base_model

        if config.lora is not None and config.lora.quantize == "4bit":
            from vila_hd.loading import load_pretrained
            from vila_hd.model.quantization import require_four_bit_support

            require_four_bit_support("lora.quantize=4bit (QLoRA)")  # names the recipe's setting, not --load-4bit
            # bitsandbytes' own placement of a 4-bit model: the current CUDA device
            model, processor = load_pretrained(init.model, dtype=dtype, device=f"cuda:{torch.cuda.current_device()}",
                                               load_4bit=True)
        else:
            model, processor = load_base_model(init.model, dtype)
    elif init.preset is not None:
        from vila_hd.builder import build_tiny_model
        from vila_hd.model.tiny import TINY_PRESETS

        if init.preset not in TINY_PRESETS:
            raise ValueError(f"init.preset must be a tiny preset {sorted(TINY_PRESETS)} (random weights); start real "
                             "models from checkpoints (init.model or init.ps3 + init.llm)")
        model, processor = build_tiny_model(init.preset, seed=config.seed, **init.model_overrides)
        model = model.to(dtype)
    else:
        from vila_hd.builder import build_vila_hd

        model, processor = build_vila_hd(init.ps3, init.llm, dtype=dtype, seed=config.seed, **init.model_overrides)
    if init.attn_implementation:
        model.language_model.set_attn_implementation(init.attn_implementation)
    return model, processor


def load_init_processor(config: StageConfig):
    """The processor of the stage's init without loading weights (for ``data check``)."""
    init = config.init
    if init.model is not None:
        from vila_hd.processing import VilaHDProcessor

        return VilaHDProcessor.from_pretrained(init.model)
    if init.preset is not None:
        from vila_hd.builder import build_tiny_processor

        return build_tiny_processor(init.preset, **init.model_overrides)
    from transformers import AutoConfig, AutoTokenizer

    from vila_hd.hub import resolve_model_dir
    from vila_hd.model.configuration import VilaHDConfig
    from vila_hd.model.vila_layout import read_vision_config
    from vila_hd.processing import VilaHDProcessor

    llm = resolve_model_dir(init.llm, kind="processor")  # metadata only; refuses a directory naming custom code
    tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=False)
    if tokenizer.convert_tokens_to_ids("<image>") in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    overrides = {k: v for k, v in init.model_overrides.items() if k in VilaHDConfig.__init__.__code__.co_varnames}
    overrides.pop("max_select_num", None)
    vision = read_vision_config(resolve_model_dir(init.ps3, kind="model"))
    if "max_select_num" in init.model_overrides:
        vision.max_select_num = init.model_overrides["max_select_num"]
    cfg = VilaHDConfig(vision_config=vision, text_config=AutoConfig.from_pretrained(llm, trust_remote_code=False),
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **overrides)
    return VilaHDProcessor.from_config(cfg, tokenizer)


def set_trainable(model: torch.nn.Module, config: StageConfig) -> list[dict[str, Any]]:
    """Freeze all but the stage's trainable parts; one optimizer group per (part, decay / no decay).

    With LoRA (``model`` is then the PeftModel) the LoRA matrices take the learning rate of the part they sit
    in (``llm`` or ``vision_tower``), the fully trained copies (``modules_to_save``) their own part's."""
    rates = config.learning_rates
    groups: dict[tuple[str, bool], list] = defaultdict(list)
    lora = config.lora is not None
    for name, param in model.named_parameters():
        place = place_of(name)
        part = place.part
        if lora:
            train = (place.peft == "lora" and (part in rates or part == "vision_tower")) or \
                    (place.peft == "copy" and part in rates)
            if place.peft == "lora" and part not in rates:
                part = "llm" if "llm" in rates else next(iter(rates), None)
        else:
            train = part in rates
        param.requires_grad_(bool(train) and part is not None)
        if param.requires_grad:
            decay = param.ndim >= 2 and config.optim.weight_decay > 0
            groups[(part, decay)].append(param)
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({"name": part if decay or config.optim.weight_decay == 0 else f"{part}.no_decay",
                    "params": params, "lr": rates[part], "weight_decay": config.optim.weight_decay if decay else 0.0})
    return out


def trainable_summary(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Part -> (trainable, total) parameter counts, each parameter once: peft's frozen ``original_module`` of a
    fully trained module (``modules_to_save``) is left out, its trained copy is what the user's model holds."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        place = place_of(name)
        if place.peft == "original":
            continue
        key = place.part or "never"
        out[key][1] += p.numel()
        if p.requires_grad:
            out[key][0] += p.numel()
    return {k: (v[0], v[1]) for k, v in out.items()}


def enable_gradient_checkpointing(model, config: StageConfig) -> None:
    gc = config.gradient_checkpointing
    if gc.get("llm", False):
        llm = model.language_model
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision_trained = "vision_tower" in config.learning_rates or (config.lora is not None and config.lora.vision_tower)
    if gc.get("vision_tower", False) and vision_trained:
        model.vision_tower.vision_model.gradient_checkpointing = True


def apply_compile(model, config: StageConfig) -> list[str]:
    """Regional ``torch.compile`` of the transformer blocks when ``compile.enabled`` (after gradient
    checkpointing is set up); returns what was compiled (nothing when disabled)."""
    if not config.compile.enabled:
        return []
    from vila_hd.train.compile import compile_blocks

    return compile_blocks(model, config.compile)


# --- data -------------------------------------------------------------------------------------------
def open_registry(config: StageConfig) -> dict[str, ds.DatasetEntry]:
    registry: dict[str, ds.DatasetEntry] = {}
    if config.data.registry:
        registry.update(ds.load_registry(config.data.registry))
    for name, spec in config.data.datasets.items():
        registry[name] = ds.make_entry(name, spec, os.getcwd())
    if not registry:
        raise ValueError("the stage names no data: set data.registry and/or data.datasets")
    return registry


def open_mixture(config: StageConfig) -> ds.Mixture:
    registry = open_registry(config)
    mixture = config.data.mixture or "+".join(registry)
    return ds.build_mixture(registry, mixture, seed=config.data.seed)


class StageData:
    """The stage's micro-batches for the trainer (``steps_per_epoch``, ``micro_batches``)."""

    def __init__(self, dataset, collator, sampler, num_workers: int, seed: int):
        self.dataset, self.collator, self.sampler = dataset, collator, sampler
        self.num_workers = num_workers
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batches(self, start_step: int, total_steps: int):
        sampler = self.sampler

        class _Batches:
            def __iter__(self):
                return sampler.micro_batches(start_step, total_steps)

        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Batches(), collate_fn=self.collator, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
        )
        return iter(loader)


def build_data(config: StageConfig, processor, world: int, rank: int, grad_accum: int,
               mixture: ds.Mixture | None = None) -> StageData:
    from vila_hd.model.token_layout import image_token_layout
    from vila_hd.train.data.collate import Collator
    from vila_hd.train.data.dataset import SampleEncoder, TrainingDataset
    from vila_hd.train.data.sampler import StepSampler

    encoder = SampleEncoder(processor, config.data.max_length, config.look_close.kwargs(), uint8_pixels=True)
    dataset = TrainingDataset(mixture if mixture is not None else open_mixture(config), encoder)
    size = tuple(processor.image_processor.image_size)
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id
    low_res = image_token_layout(processor.layout, size, **config.look_close.kwargs()).num_low_res_tokens
    collator = Collator(pad, size, config.data.max_length, packing=config.data.packing,
                        image_token_id=processor.image_token_id, low_res_tokens=low_res)
    sampler = StepSampler(len(dataset), config.batch.micro_batch_size, grad_accum, world, rank, config.seed)
    return StageData(dataset, collator, sampler, loader_workers(config.data.num_workers), config.seed)


def loader_workers(configured: int | None) -> int:
    """DataLoader workers: the recipe's, or min(4, the CPU cores this process may use) when it sets none."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


def grad_accumulation(config: StageConfig, world: int) -> int:
    micro = config.batch.micro_batch_size * world
    target = config.batch.global_batch_size or micro
    if target % micro:
        raise ValueError(f"batch.global_batch_size={target} is not a multiple of micro_batch_size x world size "
                         f"({config.batch.micro_batch_size} x {world})")
    return target // micro


# --- export -----------------------------------------------------------------------------------------
def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def export_model(trainer, model, processor, out_dir: str) -> None:
    """Gathered weights (ZeRO-3 partitions joined) as a Hugging Face checkpoint + processor (all ranks call)."""
    from vila_hd.train.trainer import consolidated_state_dict

    state = consolidated_state_dict(trainer.engine, model)
    if _rank0():
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        processor.save_pretrained(out_dir)
    if dist.is_initialized():
        dist.barrier()


def export_adapter(engine, peft_model, processor, base: str, out_dir: str) -> None:
    """The LoRA adapter (PEFT format, with the fully trained modules) + processor (all ranks call)."""
    from vila_hd.train.lora import adapter_state_names, in_adapter
    from vila_hd.train.trainer import gathered

    names = set(adapter_state_names(peft_model))
    params = [p for n, p in peft_model.named_parameters() if n in names]
    with gathered(engine, params):
        if _rank0():
            from vila_hd.train.lora import save_adapter

            state = {k: v.detach().cpu().clone() for k, v in peft_model.state_dict().items() if in_adapter(k)}
            save_adapter(peft_model, out_dir, processor, base, state_dict=state)
    if dist.is_initialized():
        dist.barrier()


# --- the stage --------------------------------------------------------------------------------------
@dataclass
class StageRun:
    """What :func:`run_stage` leaves: the last logged metrics and the trained objects."""

    metrics: dict[str, Any]
    trainer: Any
    model: Any  # the VILA-HD model (with LoRA layers when the stage uses LoRA)
    processor: Any
    peft_model: Any = None


def run_stage(config: StageConfig, resume: bool = True, until: int | None = None) -> StageRun:
    """Train one stage to the end (or to step ``until``, see ``Trainer.train``)."""
    from vila_hd.train.compile import describe
    from vila_hd.train.flops import FlopsModel
    from vila_hd.train.model_step import VilaHDTrainStep
    from vila_hd.train.trainer import Trainer, TrainerHooks, TrainerSettings, init_distributed

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(config.seed)
    # The data first: a file that does not open, or too few samples for one global batch, fails in seconds,
    # before the model is built.
    accum = grad_accumulation(config, world)
    mixture = open_mixture(config)
    check_enough_samples(len(mixture), config.batch.micro_batch_size, world, accum)
    model, processor = load_init(config)
    rates = config.learning_rates
    if not rates:
        raise ValueError(f"stage {config.stage!r} trains nothing: `trainable:` sets no learning rate "
                         f"(parts: {list(PARTS)})")
    base_for_adapter = None
    peft_model = None
    if config.lora is not None:
        from vila_hd.train.lora import apply_lora

        base_for_adapter = config.init.model or os.path.join(config.output_dir, "base_model")
        if config.init.model is None and rank == 0 and not os.path.isdir(base_for_adapter):
            model.save_pretrained(base_for_adapter, safe_serialization=True)
            processor.save_pretrained(base_for_adapter)
        peft_model = apply_lora(model, config.lora, list(rates))
    param_groups = set_trainable(peft_model if peft_model is not None else model, config)
    enable_gradient_checkpointing(model, config)
    compiled = apply_compile(model, config)
    step_module = VilaHDTrainStep(model, config.look_close.kwargs(), config.look_close.mode, config.llm_attention,
                                  normalize=processor.image_processor.normalize)
    step_module.train()

    data = build_data(config, processor, world, rank, accum, mixture)
    ds_template = read_deepspeed_config(config.deepspeed)
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "stage.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
        for part, (n_train, n_total) in sorted(trainable_summary(model if peft_model is None else peft_model).items()):
            print(f"{part:>14}: {n_train:>13,} / {n_total:>13,} trainable", flush=True)
        if compiled:
            print(describe(compiled, config.compile), flush=True)
            if (ds_template.get("zero_optimization") or {}).get("stage") == 3:
                print("warning: compile with ZeRO-3: DeepSpeed's parameter-gathering hooks (compiler-disabled) break "
                      "each compiled block into pieces; it trains correctly but gains little (ZeRO-2 keeps blocks whole)",
                      flush=True)

    warmup = config.optim.warmup_steps
    total = config.max_steps or max(1, int(round(config.epochs * data.steps_per_epoch)))
    if warmup is None:
        warmup = int(round(config.optim.warmup_ratio * total))
    settings = TrainerSettings(
        output_dir=config.output_dir, deepspeed_config=ds_template, micro_batch_size=config.batch.micro_batch_size,
        grad_accum=accum, total_steps=total, warmup_steps=warmup, min_lr_ratio=config.optim.min_lr_ratio,
        betas=tuple(config.optim.betas), eps=config.optim.eps, max_grad_norm=config.optim.max_grad_norm,
        precision=config.precision, loss_weights={"lm": 1.0, "selection": config.loss.selection_weight},
        checkpoint_every=config.checkpoint.every_steps, keep_last=config.checkpoint.keep_last,
        log_every=config.logging.every_steps, tensorboard=config.logging.tensorboard, wandb=config.logging.wandb,
        wandb_project=config.logging.wandb_project, progress_bar=config.logging.progress_bar,
        peak_tflops=config.logging.peak_tflops, hidden_size=model.config.text_config.hidden_size,
        run_config=config.to_dict(),
    )
    llm_trained = "llm" in rates or config.lora is not None
    vision_trained = "vision_tower" in rates or (config.lora is not None and config.lora.vision_tower)
    layout = model.image_token_layout(None, **{k: v for k, v in config.look_close.kwargs().items() if v is not None})
    flops = FlopsModel.from_model(model, layout, llm_factor=6.0 if llm_trained else 4.0,
                                  vision_factor=6.0 if vision_trained else 2.0)
    hooks = TrainerHooks(flops=flops.batch, skip_reasons=ds.REASONS)
    trainer = Trainer(step_module, param_groups, data, settings, hooks)
    if peft_model is not None:
        hooks.save_extra = lambda d: export_adapter(trainer.engine, peft_model, processor, base_for_adapter,
                                                    os.path.join(d, "adapter"))
        hooks.export = lambda t, d: export_adapter(t.engine, peft_model, processor, base_for_adapter, d)
    elif config.checkpoint.export_final:
        hooks.export = lambda t, d: export_model(t, model, processor, d)
    metrics = trainer.train(resume=resume, until=until)
    return StageRun(metrics, trainer, model, processor, peft_model)

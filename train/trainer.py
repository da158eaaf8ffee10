"""A model-agnostic training loop around a DeepSpeed engine (ZeRO-1/2/3, offload, bf16).

What the trainer needs (PS3 pre-training reuses it as VILA-HD stages do):

- ``module``: an ``nn.Module`` whose ``forward(batch)`` returns a dict of loss **sums** (``{"lm": ...}``);
- ``param_groups``: optimizer groups (``{"params": [...], "lr": peak, "weight_decay": ..., "name": ...}``);
- ``data``: an object with ``steps_per_epoch`` and ``micro_batches(start_step, total_steps)`` yielding the
  micro-batches of this rank in order (``grad_accum`` per step); every batch carries ``num_items`` (the
  count each loss sum is divided by) and may carry ``num_tokens`` (``tokens_per_s`` in the metrics only for
  data whose batches carry it), ``num_samples``, ``skipped``;
- :class:`TrainerSettings`; optional :class:`TrainerHooks` (``flops(batch)`` for MFU, ``save_extra(dir)``
  for checkpoint extras, ``export(trainer, dir)`` for the final export).

Per optimizer step: the ``num_items`` of all micro-batches of all ranks are summed (one all-reduce), and
each micro-batch contributes ``world * accum * sum_k w_k * sum_k / count_k`` so that DeepSpeed's averaging
gives the gradient of ``sum_k w_k * (global sum_k) / (global count_k)``: the loss is normalised by the
global number of valid tokens, however they are spread over micro-batches and ranks.

``Trainer.train(resume=True)`` continues from ``<output_dir>/checkpoints/latest`` when there is one:
module, optimizer, scheduler, RNG and data position (the step) are restored, so steps k+1..n reproduce an
uninterrupted run. The checkpoint is verified against its manifest first; a damaged one is passed over for the
newest that verifies, in one printed line (:func:`vila_hd.train.checkpoint.choose_resume`). Logs: a progress bar, ``<output_dir>/logs/metrics.jsonl`` (one JSON line per logged
step), TensorBoard when installed, Weights & Biases when asked.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vila_hd.quiet import DEEPSPEED_BANNERS, drop_deepspeed_banners
from vila_hd.train import checkpoint as ckpt
from vila_hd.train.losses import normalized_total
from vila_hd.train.schedule import warmup_cosine_scheduler

# bf16 dense peak per device (TFLOP/s), matched against the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


@dataclass
class TrainerSettings:
    output_dir: str
    deepspeed_config: dict[str, Any]
    micro_batch_size: int = 1
    grad_accum: int = 1
    total_steps: int | None = None  # default: epochs x steps_per_epoch
    epochs: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    loss_weights: dict[str, float] = field(default_factory=dict)
    required_items: tuple[str, ...] = ("lm",)  # the first step fails if these counts are all zero
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "vila-hd"
    progress_bar: bool = True
    peak_tflops: float | None = None
    hidden_size: int | None = None  # fills DeepSpeed's bucket sizes marked "auto"
    run_config: dict[str, Any] = field(default_factory=dict)  # saved with the checkpoints and logs


@dataclass
class TrainerHooks:
    flops: Callable[[dict], float] | None = None  # model FLOPs of one micro-batch
    save_extra: Callable[[str], None] | None = None  # extra files of a checkpoint (all ranks call it)
    export: Callable[[Trainer, str], None] | None = None  # final export (all ranks call it)
    skip_reasons: tuple[str, ...] = ()  # vocabulary of batch["skipped"] reasons (for the counters)


# --- distributed set-up -----------------------------------------------------------------------------
# DeepSpeed's start-up banners (vila_hd.quiet): its logger is filtered as soon as training is imported.
drop_deepspeed_banners()


@contextlib.contextmanager
def _without_deepspeed_prints():
    """Run a DeepSpeed call with its stdout banners dropped; every other line it prints is passed on."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not DEEPSPEED_BANNERS.match(line.strip())]
        sys.stdout.write("".join(kept))


def init_distributed() -> None:
    """Join the process group started by ``deepspeed`` / ``torchrun`` (their RANK / WORLD_SIZE / MASTER_*
    protocol), or make a one-process group when started with plain ``python``."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "WORLD_SIZE" not in os.environ:  # plain `python`: act as the launcher of a one-process job
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ[key] = value
    with _without_deepspeed_prints():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))


def fill_deepspeed_config(template: dict[str, Any], *, micro_batch_size: int, grad_accum: int, world_size: int,
                          max_grad_norm: float, precision: str, hidden_size: int | None) -> dict[str, Any]:
    """Replace the ``"auto"`` fields of a DeepSpeed JSON with the trainer's values."""
    cfg = copy.deepcopy(template)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for name, on in (("bf16", precision == "bf16"), ("fp16", False)):
        block = cfg.setdefault(name, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = on
    zero = cfg.setdefault("zero_optimization", {})
    h = hidden_size or 1024
    sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h, "allgather_bucket_size": h * h}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"the DeepSpeed config must not set '{key}': the trainer builds it (per-part learning "
                             "rates, warm-up + cosine)")
    return cfg


# Batch entries read on the host: moving them would make each read wait for the GPU. Segment tables (see
# vila_hd.model.attention) and PS3 pre-training's global-caption flags (the model moves its own copy).
HOST_ENTRIES = frozenset({"segments", "is_global"})


def _to_device(batch: Any, device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: v if k in HOST_ENTRIES else _to_device(v, device) for k, v in batch.items()}
    return batch


def _peak_flops(settings: TrainerSettings) -> float | None:
    if settings.peak_tflops:
        return settings.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value * 1e12
    return None


class Trainer:
    """See the module docstring."""

    def __init__(self, module: torch.nn.Module, param_groups: list[dict[str, Any]], data, settings: TrainerSettings,
                 hooks: TrainerHooks | None = None):
        init_distributed()
        self.settings = settings
        self.hooks = hooks or TrainerHooks()
        self.data = data
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        trainable = [p for g in param_groups for p in g["params"]]
        if not trainable:
            raise ValueError("nothing to train: no parameter is trainable in this stage (check `trainable:`)")
        per_epoch = data.steps_per_epoch
        self.total_steps = settings.total_steps or max(1, int(round(settings.epochs * per_epoch)))
        self.engine = self._engine(module, param_groups)
        self.step = 0
        self.skipped: Counter = Counter()
        self._writers: list[Any] = []
        self._checked = False
        self._counts_tokens = False  # the data's batches carry num_tokens (PS3 pre-training's do not)

    # --- set-up -----------------------------------------------------------------------------------
    def _engine(self, module, param_groups):
        import deepspeed

        s = self.settings
        cfg = fill_deepspeed_config(s.deepspeed_config, micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum,
                                    world_size=self.world, max_grad_norm=s.max_grad_norm, precision=s.precision,
                                    hidden_size=s.hidden_size)
        self.deepspeed_config = cfg
        offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups]
        if offload in ("cpu", "nvme"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, betas=s.betas, eps=s.eps, adamw_mode=True)
        else:
            fused = {"fused": True} if torch.cuda.is_available() else {}
            optimizer = torch.optim.AdamW(groups, betas=s.betas, eps=s.eps, **fused)
        self.group_names = [g.get("name", f"group{i}") for i, g in enumerate(param_groups)]
        scheduler = warmup_cosine_scheduler(optimizer, s.warmup_steps, self.total_steps, s.min_lr_ratio)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
        return engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # --- loop -------------------------------------------------------------------------------------
    def train(self, resume: bool = True, until: int | None = None) -> dict[str, Any]:
        """Run to ``total_steps`` (resuming when asked and possible); returns the last logged metrics.

        ``until``: stop after this step (with a checkpoint) as a preempted job would; the schedule still
        spans ``total_steps`` and a later ``train()`` continues exactly."""
        s = self.settings
        if resume:
            self._resume()
        ckpt.clean_partial(s.output_dir)
        self._open_logs()
        batches = iter(self.data.micro_batches(self.step, self.total_steps))
        bar = self._progress()
        metrics: dict[str, Any] = {}
        try:
            stop = self.total_steps if until is None else min(until, self.total_steps)
            while self.step < stop:
                started = time.perf_counter()
                micro = [next(batches) for _ in range(s.grad_accum)]
                sums, counts, tokens, samples, flops = self._optimizer_step(micro)
                self.step += 1
                elapsed = time.perf_counter() - started
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    metrics = self._log(sums, counts, tokens, samples, flops, elapsed)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")})
                if bar is not None:
                    bar.update(1)
                if self.step % s.checkpoint_every == 0 or self.step == stop:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.step < self.total_steps:
            self._close_logs()
            return metrics
        if self.hooks.export is not None:
            self.hooks.export(self, os.path.join(s.output_dir, "final"))
        self._close_logs()
        return metrics

    def _optimizer_step(self, micro: list[dict]):
        s = self.settings
        counts = self._global_counts(micro)
        if not self._checked:  # the first step of this process: fail loudly if nothing can be learnt
            self._checked = True
            if all(counts.get(k, 0) == 0 for k in s.required_items):
                reasons = Counter(r for b in micro for (_, _, r, _) in b.get("skipped", []))
                raise RuntimeError(
                    f"the first batches of this stage have no trainable labels ({'/'.join(s.required_items)} "
                    f"count 0 on all ranks); skipped samples: {dict(reasons) or 'none'}. Check the data with "
                    "`vila-hd data check` and the chat template"
                )
        scale = float(self.world * s.grad_accum)
        sums: dict[str, torch.Tensor] = {}  # device tensors: no host sync per micro-batch
        tokens = samples = 0
        flops = 0.0
        for batch in micro:
            for _, _, reason, _ in batch.get("skipped", []):
                self.skipped[reason] += 1
            tokens += int(batch.get("num_tokens", 0))
            self._counts_tokens |= "num_tokens" in batch
            samples += int(batch.get("num_samples", 0))
            if self.hooks.flops is not None:
                flops += float(self.hooks.flops(batch))
            out = self.engine(_to_device(batch, self.engine.device))
            loss = normalized_total(out, counts, s.loss_weights, scale)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in out.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        return sums, counts, tokens, samples, flops

    def _global_counts(self, micro: list[dict]) -> dict[str, float]:
        names = sorted({k for b in micro for k in b["num_items"]})
        local = torch.tensor([[float(b["num_items"].get(k, 0)) for k in names] for b in micro]).sum(0)
        local = local.to(self.engine.device)
        dist.all_reduce(local)
        return dict(zip(names, local.tolist()))

    # --- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        state = {"total_steps": self.total_steps, "world_size": self.world,
                 "global_batch_size": self.settings.micro_batch_size * self.world * self.settings.grad_accum,
                 "skipped": dict(self.skipped), "config": self.settings.run_config}
        return ckpt.save(self.engine, self.settings.output_dir, self.step, state, self.settings.keep_last,
                         self.hooks.save_extra)

    def _resume(self) -> None:
        path = ckpt.choose_resume(self.settings.output_dir)  # verified; falls back past damaged checkpoints
        if path is None:
            return
        state = ckpt.load(self.engine, path)
        self.step = int(state["step"])
        self.skipped = Counter(state.get("skipped", {}))
        batch = self.settings.micro_batch_size * self.world * self.settings.grad_accum
        if state.get("global_batch_size") not in (None, batch) and self.rank == 0:
            print(f"warning: resuming a run of global batch {state['global_batch_size']} with {batch}: the data "
                  "position is kept in steps, so samples are not where the original run would have read them")
        if self.rank == 0:
            print(f"resumed from {path} (step {self.step} of {self.total_steps})", flush=True)

    # --- logging ----------------------------------------------------------------------------------
    def _progress(self):
        if self.rank != 0 or not self.settings.progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def _open_logs(self) -> None:
        if self.rank != 0:
            return
        s = self.settings
        log_dir = os.path.join(s.output_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if s.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writers.append(("tb", SummaryWriter(os.path.join(log_dir, "tensorboard"))))
            except ImportError:
                print("note: TensorBoard is not installed (pip install tensorboard); logging to metrics.jsonl only")
        if s.wandb:
            import wandb

            run = wandb.init(project=s.wandb_project, config=s.run_config, dir=log_dir, resume="allow")
            self._writers.append(("wandb", run))

    def _close_logs(self) -> None:
        if self.rank != 0:
            return
        self._jsonl.close()
        for kind, writer in self._writers:
            writer.close() if kind == "tb" else writer.finish()

    def _log(self, sums, counts, tokens, samples, flops, elapsed) -> dict[str, Any]:
        names = sorted(sums)
        reasons = list(self.hooks.skip_reasons)
        local = torch.tensor([float(sums[k]) for k in names] + [tokens, samples, flops]
                             + [self.skipped.get(r, 0) for r in reasons], dtype=torch.float64)
        local = local.to(self.engine.device)
        dist.all_reduce(local)
        values = local.tolist()
        metrics: dict[str, Any] = {"step": self.step}
        total = 0.0
        for i, k in enumerate(names):
            mean = values[i] / max(counts.get(k, 0.0), 1.0)
            metrics[f"loss/{k}"] = mean
            total += self.settings.loss_weights.get(k, 1.0) * mean
        metrics["loss"] = total
        tokens, samples, flops = values[len(names):len(names) + 3]
        for name, lr in zip(self.group_names, self.engine.lr_scheduler.get_last_lr()):
            metrics[f"lr/{name}"] = lr
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if self._counts_tokens:
            metrics["tokens_per_s"] = tokens / elapsed
        metrics["samples_per_s"] = samples / elapsed
        peak = _peak_flops(self.settings)
        if flops and peak:
            metrics["mfu"] = flops / elapsed / (peak * self.world)
        for r, n in zip(reasons, values[len(names) + 3:]):
            if n:
                metrics[f"skipped/{r}"] = int(n)
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.rank == 0:
            self._jsonl.write(json.dumps(metrics) + "\n")
            self._jsonl.flush()
            for kind, writer in self._writers:
                numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
                if kind == "tb":
                    for k, v in numbers.items():
                        writer.add_scalar(k, v, self.step)
                else:
                    writer.log(numbers, step=self.step)
        return metrics


@contextlib.contextmanager
def gathered(engine, params):
    """Full (un-partitioned) parameters inside the block under ZeRO-3; a no-op otherwise."""
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def consolidated_state_dict(engine, module: torch.nn.Module, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict of ``module`` (part of the engine's model) on rank 0 (empty on other ranks),
    gathering ZeRO-3 partitions one parameter at a time."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        with gathered(engine, [param]):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    if not only_trainable and rank == 0:
        persistent = set(module.state_dict().keys())  # non-persistent buffers (e.g. rotary tables) stay out
        for name, buf in module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().cpu().clone()
    return state

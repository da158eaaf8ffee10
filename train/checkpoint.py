"""Resumable checkpoints, written atomically; model-agnostic (used by every stage and by PS3 pre-training).

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/             a complete checkpoint
        engine/                DeepSpeed state: module, optimizer, LR scheduler (``engine.save_checkpoint``)
        rng/rank_00000.pt      RNG states of each rank (python, numpy, torch CPU, accelerator)
        trainer_state.json     step, data position, counters, anything the trainer passes as ``state``
        ...                    files of the caller's ``extra`` writer (e.g. the LoRA adapter in PEFT format)
    latest                     name of the newest complete checkpoint, replaced last (atomic rename)
    .tmp-step_00000200/        a checkpoint being written: never read, removed at the next start

Protocol of :func:`save` (every rank calls it): write everything into ``.tmp-step_N``, barrier, rank 0
renames it to ``step_N`` (one atomic ``rename`` on a shared file system), then moves ``latest``, then prunes
to the last ``keep_last`` checkpoints. A process killed at any point leaves either the previous state or
the new one; :func:`find_latest` never returns a partial directory.

API: :func:`save`, :func:`find_latest`, :func:`load`, :func:`capture_rng`, :func:`restore_rng`,
:func:`clean_partial`.

Loading never runs code from a checkpoint: DeepSpeed unpickles its files with ``weights_only=False``; :func:`load`
makes it read them with ``weights_only=True`` (tensors, plain data and the few DeepSpeed types its states hold),
so a planted pickle is refused with :class:`UnsafeCheckpointError` instead of executed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vila_hd.errors import VilaHDError

LATEST = "latest"
STATE_FILE = "trainer_state.json"
ENGINE_TAG = "engine"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


# --- RNG ------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA, as tensors / plain types (``weights_only`` safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save -----------------------------------------------------------------------------------------
def save(engine, output_dir: str, step: int, state: dict[str, Any], keep_last: int = 2,
         extra: Callable[[str], None] | None = None) -> str:
    """Write checkpoint ``step`` (all ranks call this); returns the final directory.

    ``engine``: a DeepSpeed engine (its module, optimizer and scheduler states are saved). ``state``: JSON
    data of the trainer (rank 0's is written). ``extra(dir)``: called on every rank with the temporary
    directory, for additional files (it may gather ZeRO-3 weights, so all ranks must enter it)."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, step_name(step))
    tmp = os.path.join(root, ".tmp-" + step_name(step))
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    try:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, client_state={"step": step}, save_latest=False)
        torch.save(capture_rng(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        if extra is not None:
            extra(tmp)
    except Exception as err:  # a full disk surfaces as OSError, or as torch's "iostream error"
        raise CheckpointWriteError(_write_failure(root, step, err)) from err
    _barrier()
    if rank == 0:
        _write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(dict(state, step=step), indent=2))
        _publish(tmp, final)
        _write_atomic(os.path.join(root, LATEST), step_name(step))
        prune(root, keep_last)
    _barrier()
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the previous one is intact."""


def _write_failure(root: str, step: int, err: Exception) -> str:
    try:
        free = shutil.disk_usage(root).free / 2**20
        space = f"{free:.1f} MiB free there" + (": the disk is full" if free < 64 else "")
    except OSError:
        space = "free space unknown"
    previous = _read_latest(root)
    return (f"could not write checkpoint {step_name(step)} in {root} ({type(err).__name__}: {err}); {space}. "
            f"The previous checkpoint ({previous or 'none yet'}) is untouched and `latest` still names it: free "
            "some space and start the same command again to resume from it")


def _publish(tmp: str, final: str) -> None:
    """The commit point: the temporary directory becomes the checkpoint."""
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): replace it
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def _remove(path: str) -> None:
    """Delete a checkpoint directory without ever showing a half-deleted ``step_*``: one atomic rename to a
    ``.tmp-`` name (removed at the next start if a kill interrupts the deletion), then the deletion."""
    trash = os.path.join(os.path.dirname(path), ".tmp-removed-" + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    latest = _read_latest(root)
    for _, path in complete_checkpoints(root)[:-keep_last]:
        if os.path.basename(path) != latest:
            _remove(path)


def clean_partial(output_dir: str) -> None:
    """Remove ``.tmp-*`` directories left by a run killed while saving (rank 0, at start)."""
    root = checkpoint_root(output_dir)
    if _rank() != 0 or not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --- resume ---------------------------------------------------------------------------------------
def _read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_latest(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run (``latest``, or the newest complete one if ``latest`` is
    missing or points at nothing); ``None`` if there is none."""
    root = checkpoint_root(output_dir)
    name = _read_latest(root)
    if name is not None:
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)


class UnsafeCheckpointError(VilaHDError, RuntimeError):
    """A checkpoint file holds objects other than tensors and plain data; it was not unpickled."""


# DeepSpeed types its ZeRO checkpoints hold besides tensors and plain data: (module, name).
_DEEPSPEED_TYPES = [
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
]


def _deepspeed_safe_globals() -> list[Any]:
    found = []
    for module, name in _DEEPSPEED_TYPES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files will say what they need
            continue
    return found


def load_weights_only(path: str, map_location=None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing the DeepSpeed checkpoint types; anything else (e.g. a
    planted ``__reduce__`` payload) raises :class:`UnsafeCheckpointError` without running."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path} holds objects other than tensors and plain data{what}; it was not loaded (unpickling it "
                "could run code)"
            ) from None


@contextlib.contextmanager
def _weights_only_loads(engine) -> Iterator[None]:
    """Route the engine's checkpoint reads through :func:`load_weights_only` while the block runs."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        yield
        return
    own = vars(checkpoint_engine).get("load")
    checkpoint_engine.load = load_weights_only
    try:
        yield
    finally:
        if own is None:
            del checkpoint_engine.load
        else:
            checkpoint_engine.load = own


def load(engine, checkpoint_dir: str) -> dict[str, Any]:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; return the trainer state.

    Every file is read with ``weights_only=True``: a checkpoint cannot run code (:class:`UnsafeCheckpointError`)."""
    with _weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(checkpoint_dir, tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed state under {ENGINE_TAG}/")
    rng_file = os.path.join(checkpoint_dir, "rng", f"rank_{_rank():05d}.pt")
    if os.path.exists(rng_file):
        restore_rng(load_weights_only(rng_file))
    return read_state(checkpoint_dir)

"""Resumable checkpoints, written atomically; model-agnostic (used by every stage and by PS3 pre-training).

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/             a complete checkpoint
        engine/                DeepSpeed state: module, optimizer, LR scheduler (``engine.save_checkpoint``)
        rng/rank_00000.pt      RNG states of each rank (python, numpy, torch CPU, accelerator)
        trainer_state.json     step, data position, counters, anything the trainer passes as ``state``
        ...                    files of the caller's ``extra`` writer (e.g. the LoRA adapter in PEFT format)
        manifest.json          every other file: path, size, SHA-256 (written last, atomically)
    latest                     name of the newest complete checkpoint, replaced last (atomic rename)
    .tmp-step_00000200/        a checkpoint being written: never read, removed at the next start

Protocol of :func:`save` (every rank calls it): every rank writes its files (DeepSpeed's, its RNG file, the
``extra`` writer's) into ``.tmp-step_N``; barrier; rank 0 writes ``trainer_state.json``, then the manifest of
every other file (each file and folder fsynced as it is hashed; the manifest itself a temporary file, fsync,
rename), then renames the directory to ``step_N`` (one atomic ``rename`` on a shared file system), then moves
``latest``, then prunes to the last ``keep_last`` checkpoints. A process killed at any point leaves either the
previous state or the new one; :func:`find_latest` never returns a partial directory.

Resume (:func:`choose_resume`) verifies the manifest (its own checksum, every file's presence and size, no
unlisted file, then every SHA-256) and falls back to the newest checkpoint that verifies, saying in one line
which one was damaged, which file and why; none verifying is a :class:`CheckpointDamagedError`; a verified one
that still fails to load is a :class:`CheckpointLoadError` (one line). ``latest`` must be a plain ``step_N``
name of a real directory directly inside the run's checkpoint folder (resolved real paths, no symbolic link):
anything else is ignored with a message. A checkpoint without a manifest whose trainer state has no
``checkpoint_format`` (an older version's) resumes unverified, with a note; one whose state has it lost its
manifest (damaged). Pruning never deletes the newest checkpoint that verifies. Rank 0 decides and broadcasts
the choice: every rank loads the same one, or every rank raises.

API: :func:`save`, :func:`find_latest`, :func:`load`, :func:`capture_rng`, :func:`restore_rng`,
:func:`clean_partial`, :func:`choose_resume`, :func:`verify`, :func:`build_manifest`, :func:`is_legacy`.

Loading never runs code from a checkpoint: DeepSpeed unpickles its files with ``weights_only=False``; :func:`load`
makes it read them with ``weights_only=True`` (tensors, plain data and the few DeepSpeed types its states hold),
so a planted pickle is refused with :class:`UnsafeCheckpointError` instead of executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vila_hd.errors import VilaHDError

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
# In trainer_state.json of every checkpoint that has a manifest: without the key, a checkpoint without a manifest
# is an older version's (unverifiable, resumed with a note); with it, a missing manifest is damage.
FORMAT_KEY = "checkpoint_format"
FORMAT = 2
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
    """``path`` holds the old text or the new one, never a part: a temporary file, fsync, rename, fsync of the
    folder (the temporary file is removed if any of it fails)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
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
        _write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(dict(state, step=step, **{FORMAT_KEY: FORMAT}),
                                                                indent=2))
        _write_atomic(os.path.join(tmp, MANIFEST), json.dumps(build_manifest(tmp), indent=1))  # the last file
        _publish(tmp, final)
        _write_atomic(os.path.join(root, LATEST), step_name(step))
        prune(root, keep_last, fresh=final)
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


def own_checkpoint(root: str, name: str) -> str | None:
    """Why ``name`` is not a checkpoint directory directly inside ``root`` (a plain ``step_N`` name whose resolved
    real path is ``root``'s own ``name``: no ``..``, no absolute path, no symbolic link, in or out of the
    folder); ``None`` if it is."""
    if not _STEP_DIR.match(name):
        return "not a plain step_N name"
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if real != os.path.join(os.path.realpath(root), name):
        where = "inside" if os.path.dirname(real) == os.path.realpath(root) else "outside"
        return f"a symbolic link to {real}, {where} {root}"
    return None if os.path.isdir(path) else "no such checkpoint directory"


def _is_complete(path: str) -> bool:
    """A checkpoint directory that was published: it has a trainer state or a manifest."""
    return os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, MANIFEST))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints (a manifest or a trainer state; inside ``root``), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if own_checkpoint(root, name) is None and _is_complete(path):
            found.append((int(_STEP_DIR.match(name).group(1)), path))
    return sorted(found)


def prune(root: str, keep_last: int, fresh: str | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; never the one ``latest`` names, and never
    the newest one that verifies (kept when none of the newest ``keep_last`` does). ``fresh``: the checkpoint
    just written, whose manifest was computed from its files a moment ago (checked by sizes only)."""
    if keep_last <= 0:
        return
    latest = _read_latest(root)
    found = complete_checkpoints(root)
    keep = {path for _, path in found[-keep_last:]}
    if latest is not None:
        keep.add(os.path.join(root, latest))
    for _, path in reversed(found):
        if verify(path, hashes=path != fresh) is None:
            keep.add(path)  # the newest verified checkpoint (usually the one just written)
            break
    for _, path in found:
        if path not in keep:
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


def _latest_of(root: str) -> tuple[str | None, str | None]:
    """(path ``latest`` names, or None; why it was ignored, or None)."""
    name = _read_latest(root)
    if name is None:
        return None, None
    why = own_checkpoint(root, name)
    if why is None and not _is_complete(os.path.join(root, name)):
        why = "not a complete checkpoint"
    if why is not None:
        return None, f"{os.path.join(root, LATEST)} names {name!r}, which is ignored ({why})"
    return os.path.join(root, name), None


def find_latest(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run (``latest``, or the newest complete one if ``latest`` is
    missing, points at nothing or names anything but a checkpoint directly inside the run's checkpoint folder);
    ``None`` if there is none. Nothing is verified here: see :func:`choose_resume`."""
    root = checkpoint_root(output_dir)
    path, _ = _latest_of(root)
    if path is not None:
        return path
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


# --- manifest and verification -------------------------------------------------------------------------------
class CheckpointDamagedError(VilaHDError, RuntimeError):
    """No checkpoint of a run verifies against its manifest (the message names each one and why)."""


def _hash_file(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Paths (relative, ``/``-separated, sorted) of the files under ``directory``, the manifest excepted."""
    out = []
    for parent, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _listing_digest(files: dict[str, Any]) -> str:
    """SHA-256 of the file list itself: an altered manifest is told from an altered file."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def build_manifest(directory: str) -> dict[str, Any]:
    """Size and SHA-256 of every file of a checkpoint directory (each file, and each folder, fsynced as it is
    read), and the SHA-256 of that list."""
    files = {}
    for rel in _files(directory):
        path = os.path.join(directory, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": _hash_file(path, sync=True)}
    for parent, _, _ in os.walk(directory):
        _fsync_dir(parent)
    return {"version": FORMAT, "files": files, "files_sha256": _listing_digest(files)}


def is_legacy(checkpoint_dir: str) -> bool:
    """A checkpoint of an older version: no manifest, and a readable trainer state without :data:`FORMAT_KEY`."""
    if os.path.exists(os.path.join(checkpoint_dir, MANIFEST)):
        return False
    try:
        return FORMAT_KEY not in read_state(checkpoint_dir)
    except (OSError, ValueError, TypeError):
        return False


def _read_manifest(checkpoint_dir: str) -> tuple[dict[str, tuple[int, str]] | None, str | None]:
    """(``{file: (size, sha256)}``, None), or (None, why the manifest cannot be trusted)."""
    try:
        with open(os.path.join(checkpoint_dir, MANIFEST)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        # The checksum first: a flipped byte in an entry's key reads as altered, not as a malformed entry.
        intact = manifest.get("files_sha256") == _listing_digest(files)
        listed = {str(rel): (int(v["size"]), str(v["sha256"])) for rel, v in files.items()} if intact else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{MANIFEST}: unreadable ({type(err).__name__})"
    if not intact:
        return None, f"{MANIFEST}: altered (its checksum of the file list does not match)"
    for rel in listed:
        if os.path.isabs(rel) or ".." in rel.split("/") or rel == MANIFEST:
            return None, f"{MANIFEST}: lists {rel!r}, not a file of the checkpoint"
    return listed, None


def verify(checkpoint_dir: str, hashes: bool = True) -> str | None:
    """Why ``checkpoint_dir`` does not match its manifest (``"FILE: what"``), or ``None`` when it does: every
    listed file there with its size, no file the manifest does not list, then (``hashes``) every SHA-256. An
    older version's checkpoint (:func:`is_legacy`) cannot be verified: ``None``."""
    if not os.path.exists(os.path.join(checkpoint_dir, MANIFEST)):
        return None if is_legacy(checkpoint_dir) else f"{MANIFEST}: missing"
    listed, why = _read_manifest(checkpoint_dir)
    if why is not None:
        return why
    for rel, (size, _) in listed.items():
        path = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(path):
            return f"{rel}: missing"
        if os.path.getsize(path) != size:
            return f"{rel}: {os.path.getsize(path)} bytes, the manifest says {size}"
    unlisted = sorted(set(_files(checkpoint_dir)) - set(listed))
    if unlisted:
        return f"{unlisted[0]}: not in the manifest"
    if hashes:
        for rel, (_, digest) in listed.items():
            if _hash_file(os.path.join(checkpoint_dir, rel)) != digest:
                return f"{rel}: sha256 mismatch (altered)"
    return None


def _resume_order(root: str) -> tuple[list[str], list[str]]:
    """(checkpoints to try, newest first: ``latest``'s, then the older complete ones; notes on ``latest``)."""
    latest, why = _latest_of(root)
    found = list(reversed(complete_checkpoints(root)))
    if latest is None:
        return [path for _, path in found], [why] if why else []
    step = int(_STEP_DIR.match(os.path.basename(latest)).group(1))
    return [latest] + [path for s, path in found if s < step], [why] if why else []


def _decide_resume(output_dir: str) -> tuple[str | None, str | None, str | None]:
    """(checkpoint to resume from or None, the one line to print or None, the error if none verifies)."""
    root = checkpoint_root(output_dir)
    order, notes = _resume_order(root)
    damaged = []
    for path in order:
        why = verify(path)
        if why is None:
            if is_legacy(path):
                notes.append(f"{os.path.basename(path)} has no {MANIFEST} (written by an older version) and "
                             "cannot be verified")
            parts = notes + [f"{os.path.basename(p)} is damaged ({w})" for p, w in damaged]
            line = None
            if parts:
                line = "resume: " + "; ".join(parts) + f"; resuming from {os.path.basename(path)}"
            return path, line, None
        damaged.append((path, why))
    if not damaged:
        return None, ("resume: " + "; ".join(notes) + "; starting from step 0") if notes else None, None
    listing = "; ".join(f"{os.path.basename(p)} ({w})" for p, w in damaged)
    ignored = "".join(f"{note}; " for note in notes)
    return None, None, (f"resume: {ignored}no checkpoint in {root} verifies against its {MANIFEST}: {listing}. Restore one "
                        "from a copy, or move the folder away (or pass --no-resume) to start over")


def choose_resume(output_dir: str) -> str | None:
    """The checkpoint to resume from: the newest that verifies (rank 0 decides, every rank gets its choice).
    Prints one line when it is not simply ``latest``; raises :class:`CheckpointDamagedError` when checkpoints
    exist but none verifies; ``None`` when there are none."""
    decision: list[Any] = [None, None, None]
    if _rank() == 0:
        try:
            decision = list(_decide_resume(output_dir))
        except OSError as err:  # an unreadable folder: every rank must still leave the broadcast below
            decision = [None, None, f"resume: could not read the checkpoints of {output_dir} ({err})"]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    path, line, error = decision
    if error is not None:
        raise CheckpointDamagedError(error)
    if line is not None and _rank() == 0:
        print(line, flush=True)
    return path


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


class CheckpointLoadError(VilaHDError, RuntimeError):
    """A checkpoint that verified (or could not be verified: an older version's) failed to load."""


# What DeepSpeed, torch and json raise on a file that is not what it should be (truncated, altered, of another
# run's shapes): turned into one line naming the checkpoint. The project's own errors pass through.
_LOAD_FAILURES = (EOFError, pickle.UnpicklingError, RuntimeError, AssertionError, KeyError, IndexError, ValueError,
                  TypeError, OSError)


def load(engine, checkpoint_dir: str) -> dict[str, Any]:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; return the trainer state.

    Every file is read with ``weights_only=True``: a checkpoint cannot run code (:class:`UnsafeCheckpointError`).
    Any other failure is a :class:`CheckpointLoadError` naming the checkpoint (the cause is chained)."""
    try:
        return _load(engine, checkpoint_dir)
    except VilaHDError:
        raise
    except _LOAD_FAILURES as err:
        cause = textwrap.shorten(str(err), 300, placeholder=" ...")
        raise CheckpointLoadError(
            f"resume: checkpoint {checkpoint_dir} could not be loaded ({type(err).__name__}: {cause}). Move it out "
            "of the checkpoint folder to resume from the previous one, or pass --no-resume to start over"
        ) from err


def _load(engine, checkpoint_dir: str) -> dict[str, Any]:
    with _weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(checkpoint_dir, tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {ENGINE_TAG}/")
    rng_file = os.path.join(checkpoint_dir, "rng", f"rank_{_rank():05d}.pt")
    if os.path.exists(rng_file):
        restore_rng(load_weights_only(rng_file))
    return read_state(checkpoint_dir)

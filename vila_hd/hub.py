"""Where checkpoints come from: a local directory or a Hugging Face Hub id, never confused; weights from
safetensors only.

- :func:`locate`: an existing local path (``~`` expanded) is used as is. Anything else must be shaped like a Hub
  id (``owner/name``): a missing ``./x``, ``/abs/x``, ``~/x`` or ``x/y/z`` is a ``FileNotFoundError`` raised
  without asking the Hub (a typo in a path must not turn into a download attempt).
- :func:`resolve_model_dir`: a local directory, or a snapshot of a Hub repository holding only metadata and
  ``*.safetensors`` (pickled ``.bin`` / ``.pt`` files are never downloaded).
- :func:`safetensors_only`: the ``from_pretrained`` keyword arguments that make transformers read safetensors and
  nothing else; :func:`refuse_pickled_weights` names a directory that only has pickles. Unpickling a file can
  run any code it carries, so a checkpoint with ``pytorch_model.bin`` only is refused with a message.
- :func:`refuse_custom_code`: no code from a checkpoint directory ever runs. Every loader calls it on the
  directory before any transformers ``Auto*`` call: an ``auto_map`` key (at any depth) in ``config.json``,
  ``tokenizer_config.json``, ``processor_config.json`` or ``preprocessor_config.json`` of the directory or of
  its VILA sub-folders (``llm/``, ``vision_tower/``, ``mm_projector/``) is a :class:`CustomCodeError`. Every
  ``from_pretrained`` of a transformers / peft class also passes ``trust_remote_code=False`` (tests scan for it).
- :func:`check_loading_info`: nothing loads half a model. Missing or unexpected tensors in a checkpoint are a
  :class:`CheckpointError` naming them, unless the caller allows them explicitly by name pattern
  (``allow_missing_keys=`` / ``allow_unexpected_keys=``, regular expressions searched in the key); mis-shaped
  ones likewise, unless the caller passes transformers' ``ignore_mismatched_sizes=True``.
  :func:`strict_from_pretrained` holds transformers' load-report table back (:func:`quiet_load_report`): the
  error names the keys in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from vila_hd.errors import VilaHDError

# Weights are read from safetensors only; pickled formats are never downloaded.
_METADATA = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_PATTERNS = {
    "processor": _METADATA + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA],
    "config": ["config.json"],
    "model": _METADATA
    + ["*.safetensors"]
    + [f"{d}/{p}" for d in ("llm", "vision_tower", "mm_projector") for p in _METADATA + ["*.safetensors"]],
}
# The Hub's repository id rule: owner/name, letters, digits, '-', '_', '.'; no '--' or '..', no leading '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The files transformers reads an ``auto_map`` (custom code) from, and the VILA layout's sub-folders.
CODE_MAP_KEY = "auto_map"
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
CONFIG_SUBFOLDERS = ("", "llm", "vision_tower", "mm_projector")
SHOWN_KEYS = 5  # how many offending tensor names an error lists before the count


class CustomCodeError(VilaHDError):
    """A checkpoint directory that asks for code of its own to be run (an ``auto_map`` in its configs)."""


class CheckpointError(VilaHDError):
    """A checkpoint that does not match the model it should fill (names the offending keys or files)."""


def is_hub_id(value: str) -> bool:
    """``owner/name`` as the Hub spells repository ids (a string, not an existing local path)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value


def locate(path_or_id: str | os.PathLike, what: str = "checkpoint") -> tuple[str, bool]:
    """``(path, True)`` for an existing local path (``~`` expanded), ``(hub_id, False)`` for a Hub id.

    Raises:
        FileNotFoundError: neither an existing path nor shaped like a Hub id; nothing was downloaded.
    """
    path = os.fspath(path_or_id)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    local = os.path.expanduser(path)
    if os.path.exists(local):
        return local, True
    if not is_hub_id(path):
        raise FileNotFoundError(
            f"{what} {path} does not exist (and it is not a Hub id owner/name: nothing was downloaded)"
        )
    return path, False


def locate_directory(path_or_id: str | os.PathLike, what: str = "checkpoint",
                     missing: str | None = None) -> tuple[str, bool]:
    """:func:`locate` for a checkpoint: an existing local path must be a directory. ``missing`` names the thing
    in the does-not-exist error (default ``what``).

    Raises:
        NotADirectoryError: an existing file (an image given as ``--model``); nothing was downloaded.
        FileNotFoundError: as :func:`locate`.
    """
    path, local = locate(path_or_id, missing or what)
    if local and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path} is a file; expected a checkpoint directory or a Hub id")
    return path, local


def resolve_model_dir(
    path_or_id: str | os.PathLike,
    kind: str = "model",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    what: str = "checkpoint",
    **_unused,
) -> str:
    """Return ``path_or_id`` if it is a local directory, else download the files of ``kind``
    (``model`` / ``processor`` / ``config``) of that Hub repository and return the snapshot directory.
    A local-looking path that does not exist is an error (see :func:`locate`), never a download; a directory
    that asks for custom code is refused (:func:`refuse_custom_code`)."""
    path, local = locate_directory(path_or_id, what)
    if local:
        refuse_custom_code(path)
        return path
    snapshot = _download(path, kind, revision, token, cache_dir, local_files_only)
    refuse_custom_code(snapshot)
    return snapshot


def resolve_checkpoint(path_or_id: str | os.PathLike, what: str = "model", **hub_kwargs: Any) -> str:
    """A local directory as is; a Hub id ``owner/name`` downloaded (safetensors and metadata only).

    A path that is neither an existing directory nor shaped like a Hub id is reported as missing, without
    asking the Hub."""
    path, _ = locate_directory(path_or_id, what, missing=f"{what} directory")
    return resolve_model_dir(path, kind="model", what=what, **hub_kwargs)  # a local directory: checked for custom code


def _download(path: str, kind: str, revision, token, cache_dir, local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path,
            allow_patterns=_PATTERNS[kind],
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except Exception as err:  # the hub client raises many types; the message is what matters
        raise OSError(f"{path!r} is neither a local directory nor a downloadable Hub repository: {err}") from err


def safetensors_only(kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs with ``use_safetensors=True``; asking for pickles is refused."""
    if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
        raise ValueError(
            f"{what}: weights are loaded from safetensors only; use_safetensors=False / weights_only=False would "
            "unpickle files, which can run any code they carry"
        )
    return {**kwargs, "use_safetensors": True}


def refuse_pickled_weights(directory: str, what: str = "checkpoint", prefix: str = "") -> None:
    """Raise if ``directory`` has pickled weight files but no safetensors (checked before transformers would
    report a missing ``model.safetensors`` less clearly). ``prefix``: only files named so count (a LoRA adapter's
    ``adapter_model``), and the message names the safetensors file to convert to."""
    if not os.path.isdir(directory):
        return
    names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_SUFFIXES))
    if pickled:
        target = f" to {prefix}.safetensors" if prefix else ""
        raise OSError(
            f"{what} {directory} has only pickled weights ({', '.join(pickled)}); VILA-HD loads safetensors only, "
            f"because unpickling can run any code a file carries. Convert them{target} on a machine you trust "
            "(safetensors.torch.save_file(torch.load(f, weights_only=True), ...))."
        )


def refuse_unsafe_adapter(adapter_dir: str | os.PathLike) -> None:
    """Raise before peft reads a LoRA adapter directory whose configs name custom code, or that has pickled
    weights but no ``adapter_model.safetensors``."""
    adapter_dir = os.fspath(adapter_dir)
    refuse_custom_code(adapter_dir, "LoRA adapter")
    refuse_pickled_weights(adapter_dir, "LoRA adapter", prefix="adapter_model")


# --- no code from a checkpoint ------------------------------------------------------------------------------------
def _code_maps(value: Any, where: str) -> Iterable[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``auto_map`` at any depth of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key == CODE_MAP_KEY and item:
                yield path, item
            else:
                yield from _code_maps(item, path)
    elif isinstance(value, list):
        for item in value:
            yield from _code_maps(item, where)


def _code_files(code_map: Any) -> list[str]:
    """The ``.py`` files (or ``repo: file.py``) an ``auto_map`` value points at."""
    refs = [v for v in (code_map.values() if isinstance(code_map, dict) else [code_map])]
    names = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str)]
    files = []
    for name in names:
        repo, _, module = name.rpartition("--")
        file = module.rsplit(".", 1)[0] + ".py"
        files.append(f"{repo}: {file}" if repo else file)
    return sorted(set(files))


def refuse_custom_code(directory: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise :class:`CustomCodeError` if a config file of ``directory`` (or of its VILA sub-folders) has an
    ``auto_map``: transformers would offer to run the ``.py`` files it names. Called by every loader before any
    transformers ``Auto*`` call; unreadable files are left to the loader that reads them."""
    directory = os.fspath(directory)
    for sub in CONFIG_SUBFOLDERS:
        for name in CONFIG_FILES:
            file = os.path.join(directory, sub, name)
            if not os.path.isfile(file):
                continue
            try:
                with open(file, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            for key, code_map in _code_maps(data, ""):
                files = ", ".join(_code_files(code_map)) or "custom code"
                raise CustomCodeError(
                    f"{what} {directory}: key {key} in {os.path.join(sub, name) if sub else name} points at code "
                    f"to run ({files}); VILA-HD never runs code from a checkpoint directory: delete the "
                    f"{CODE_MAP_KEY} key if transformers implements the model type, else use a supported checkpoint"
                )


# --- nothing loads half a model -----------------------------------------------------------------------------------
def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _named(keys: Sequence[str], kind: str) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''} ({shown}{more})"


# what allows each kind of problem (named in the error)
_MISSING_HINT = "allow_missing_keys= patterns start those weights fresh"
_UNEXPECTED_HINT = "allow_unexpected_keys= patterns ignore those tensors"
_MISMATCHED_HINT = "ignore_mismatched_sizes=True starts the mis-shaped ones fresh"


def _key_problems(missing, unexpected, allow_missing_keys, allow_unexpected_keys) -> list[tuple[str, str]]:
    missing = sorted(k for k in missing if not _matches(k, allow_missing_keys))
    unexpected = sorted(k for k in unexpected if not _matches(k, allow_unexpected_keys))
    return [(_named(keys, kind), hint) for keys, kind, hint in
            ((missing, "missing", _MISSING_HINT), (unexpected, "unexpected", _UNEXPECTED_HINT)) if keys]


def check_loading_info(info: dict[str, Any], what: str, allow_missing_keys: Sequence[str] = (),
                       allow_unexpected_keys: Sequence[str] = (), allow_mismatched_sizes: bool = False) -> None:
    """Raise :class:`CheckpointError` naming the missing / unexpected / mis-shaped tensors of a
    ``from_pretrained(..., output_loading_info=True)`` report that the patterns (and ``allow_mismatched_sizes``,
    transformers' ``ignore_mismatched_sizes=True`` of the caller) do not allow.

    Tied weights (``lm_head`` tied to the input embeddings) and non-persistent buffers are not in a checkpoint
    and transformers does not report them as missing."""
    problems = _key_problems(info.get("missing_keys") or (), info.get("unexpected_keys") or (),
                             allow_missing_keys, allow_unexpected_keys)
    mismatched = [f"{e[0]} {tuple(e[1])} vs {tuple(e[2])}" if isinstance(e, (tuple, list)) and len(e) == 3
                  else str(e) for e in info.get("mismatched_keys") or ()]
    if mismatched and not allow_mismatched_sizes:
        shown = ", ".join(sorted(mismatched)[:SHOWN_KEYS])
        problems.append((f"mismatched shapes (checkpoint vs model): {shown}", _MISMATCHED_HINT))
    if problems:
        raise CheckpointError(f"{what}: {'; '.join(p for p, _ in problems)}; the checkpoint does not fill the "
                              f"model (if that is meant: {', '.join(h for _, h in problems)})")


def pop_key_allowances(kwargs: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """Split ``allow_missing_keys`` / ``allow_unexpected_keys`` (a pattern or a list of them) off ``kwargs``."""
    kwargs = dict(kwargs)
    allow = []
    for name in ("allow_missing_keys", "allow_unexpected_keys"):
        value = kwargs.pop(name, None) or ()
        allow.append((value,) if isinstance(value, str) else tuple(value))
    return kwargs, allow[0], allow[1]


class _HeldBack(logging.Filter):
    """Keeps the records of transformers' load report instead of letting them print."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def quiet_load_report():
    """Hold back transformers' load report (a table of MISSING / UNEXPECTED / MISMATCH keys on stderr) while a
    ``from_pretrained`` runs: the caller judges the loading info and names the offending keys in one error. If the
    load itself fails, the report is printed after all (transformers' own error points at it)."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldBack()
    logger.addFilter(held)
    try:
        yield
    except BaseException:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(held)


def strict_from_pretrained(load, path: str, what: str, *model_args, **kwargs):
    """``load(path, *model_args, **kwargs)`` (a ``PreTrainedModel.from_pretrained``) that raises on missing,
    unexpected or mis-shaped tensors (see :func:`check_loading_info`; mis-shaped ones are allowed only by the
    caller's ``ignore_mismatched_sizes=True``); returns ``(model, info)`` only if the caller asked for
    ``output_loading_info``."""
    kwargs, allow_missing, allow_unexpected = pop_key_allowances(kwargs)
    if kwargs.pop("trust_remote_code", False):
        raise CustomCodeError(f"{what} {path}: trust_remote_code=True is refused; VILA-HD never runs checkpoint code")
    want_info = bool(kwargs.pop("output_loading_info", False))
    allow_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    with quiet_load_report():  # (mis-shaped tensors: reported below by name, not raised by transformers)
        model, info = load(path, *model_args, output_loading_info=True, trust_remote_code=False,
                           ignore_mismatched_sizes=True, **kwargs)
    check_loading_info(info, f"{what} {path}", allow_missing, allow_unexpected, allow_mismatched)
    return (model, info) if want_info else model

"""The project's user-error base and the CLI's account of what counts as a user error (no project imports).

A *user error* (a bad file, flag, key or value; a full disk) is printed by ``vila-hd`` as one line,
``vila-hd: error: ...``, with exit code 1; anything else is a bug and keeps its traceback. ``vila-hd --debug``
shows the traceback of user errors too.

Raise :class:`VilaHDError` (or a subclass) with a message that names the culprit (file, key, flag) and what to
do; :func:`naming_file` names the file when a library's parse error does not.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# Set by ``vila-hd --debug``: commands that print an error themselves print the traceback as well.
DEBUG = False


class VilaHDError(ValueError):
    """Base of the project's user errors: a message naming the culprit (file, key, flag) and what to do."""


class ConfigError(VilaHDError):
    """A recipe / config value that is refused (the message names the key)."""


class MissingExtraError(VilaHDError):
    """A command needs an optional dependency that is not installed (the message names the extra to install)."""


def require_extra(extra: str, purpose: str, modules: Sequence[str]) -> None:
    """Refuse to start ``purpose`` (``vila-hd train``) when a module it imports from setup.cfg's ``extra`` is
    missing, before any work, with the install command instead of an ``ImportError`` from deep in the run."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra ({', '.join(missing)} not installed): pip install "
            f"'vila-hd[{extra}]' (from a clone: pip install '.[{extra}]')"
        )


class FileFormatError(VilaHDError):
    """A file that cannot be parsed as what it should be (the message names the file)."""


_PROJECT_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package) + os.sep
    for package in ("vila_hd", "llava_compat", "train", "eval")
)


def library_errors() -> tuple[type[BaseException], ...]:
    """The parse errors of the libraries that read user files (those importable here): their messages are
    about the file, not about our code."""
    found: list[type[BaseException]] = [json.JSONDecodeError, UnicodeDecodeError]
    for module, name in (("safetensors", "SafetensorError"), ("yaml", "YAMLError"),
                         ("jinja2.exceptions", "TemplateError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _raised_by_project(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is project code (a deliberate ``raise``)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROJECT_DIRS)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user error (printed as one line) rather than a bug (printed with its traceback):
    a :class:`VilaHDError`, an ``OSError`` (missing file, permission, full disk), a library's parse error, or
    a plain ``ValueError`` that project code raised itself (a refusal with a message)."""
    if isinstance(err, (VilaHDError, OSError) + library_errors()):
        return True
    return type(err) is ValueError and _raised_by_project(err)


def _describe_os_error(err: OSError) -> str:
    if not err.strerror:  # raised with a message of its own (ours, or a library's)
        return str(err)
    where = ": ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = " (the disk is full: free some space or write somewhere else)"
    elif err.errno in (errno.EACCES, errno.EPERM):
        hint = " (check the file's permissions, or choose another path)"
    elif err.errno == errno.ENOENT:
        hint = " (check the path)"
    return f"{where}: {err.strerror}{hint}" if where else f"{err.strerror}{hint}"


def describe(err: BaseException) -> str:
    """One line for a user error: the message, with the file and the remedy an ``OSError`` leaves out."""
    if isinstance(err, OSError):
        line = _describe_os_error(err)
    elif isinstance(err, json.JSONDecodeError):
        line = f"not valid JSON: {err}"
    else:
        line = str(err) or type(err).__name__
    return " ".join(line.split())


@contextmanager
def naming_file(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Name ``path`` in the errors raised inside the block that do not: a library's parse error becomes a
    :class:`FileFormatError`, an ``OSError`` without a file name (a full disk on ``write``) gets this one."""
    try:
        yield
    except VilaHDError:
        raise
    except library_errors() as err:
        raise FileFormatError(f"{what} {os.fspath(path)}: {describe(err)}") from err
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from err

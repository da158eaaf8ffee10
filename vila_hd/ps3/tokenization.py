"""Tokenizer for the PS3 text tower: text cleaning + a Hugging Face tokenizer padded to a fixed context length.

A PS3 checkpoint stores no vocabulary of its own: its ``tokenizer_config.json`` names the Hugging Face tokenizer
(``tokenizer_name``, e.g. SigLIP2's Gemma tokenizer) plus the context length and the cleaning to apply.
"""

from __future__ import annotations

import html
import json
import os
import re
import string
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer

from .configuration import PS3TextConfig

try:  # optional: repairs mojibake before tokenizing, as open_clip does when it is installed
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

__all__ = ["DEFAULT_CONTEXT_LENGTH", "PS3Tokenizer", "canonicalize_text", "clean_text"]

DEFAULT_CONTEXT_LENGTH = 77
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
MODEL_CONFIG_NAME = "config.json"
_INIT_KEYS = ("tokenizer_name", "context_length", "clean", "strip_sep_token", "language")
_HUB_DOWNLOAD_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def canonicalize_text(text: str) -> str:
    """big_vision's canonical form: underscores to spaces, punctuation removed, lower case, single spaces."""
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return _collapse_whitespace(text)


_CLEANERS: dict[str, Callable[[str], str]] = {
    "canonicalize": lambda text: canonicalize_text(_basic_clean(text)),
    "lower": lambda text: _collapse_whitespace(_basic_clean(text)).lower(),
    "whitespace": lambda text: _collapse_whitespace(_basic_clean(text)),
}


def clean_text(text: str, clean: str = "whitespace") -> str:
    """Apply the cleaning named ``clean`` ('canonicalize', 'lower' or 'whitespace') to one string."""
    if clean not in _CLEANERS:
        raise ValueError(f"clean must be one of {sorted(_CLEANERS)}, got {clean!r}")
    return _CLEANERS[clean](text)


class PS3Tokenizer:
    """Drop-in for the reference ``PS3Tokenizer``: ``tokenizer(texts)`` -> LongTensor (B, context_length).

    Args:
        tokenizer_name: Hugging Face tokenizer (Hub id or local directory) loaded with ``AutoTokenizer``.
        context_length: every output row is padded / truncated to this many tokens.
        clean: text cleaning applied first: 'canonicalize' (SigLIP), 'lower' or 'whitespace'.
        strip_sep_token: replace the tokenizer's separator id by 0.
        language: source language for multilingual tokenizers that support ``set_src_lang_special_tokens``.
        **kwargs: loading options for ``AutoTokenizer.from_pretrained`` (``cache_dir``, ``local_files_only``, ...).
            Remote code is never trusted.
    """

    def __init__(
        self,
        tokenizer_name: str,
        context_length: int | None = DEFAULT_CONTEXT_LENGTH,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: str | None = None,
        **kwargs: Any,
    ):
        if clean not in _CLEANERS:
            raise ValueError(f"clean must be one of {sorted(_CLEANERS)}, got {clean!r}")
        if kwargs.pop("trust_remote_code", False):
            raise ValueError("PS3Tokenizer never runs remote code; trust_remote_code=True is not supported")
        self.tokenizer_name = str(tokenizer_name)
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.language = None
        if os.path.isdir(os.path.expanduser(self.tokenizer_name)):
            from vila_hd.hub import refuse_custom_code

            refuse_custom_code(os.path.expanduser(self.tokenizer_name), "PS3 tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name, trust_remote_code=False, **kwargs)
        if language is not None:
            self.set_language(language)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The arguments that rebuild this tokenizer (what ``save_pretrained`` writes)."""
        return {
            "tokenizer_name": self.tokenizer_name,
            "context_length": self.context_length,
            "clean": self.clean,
            "strip_sep_token": self.strip_sep_token,
            "language": self.language,
        }

    def set_language(self, language: str) -> None:
        set_lang = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if callable(set_lang):
            set_lang(language)
            self.language = language
        else:
            warnings.warn(
                f"{type(self.tokenizer).__name__} has no source language; ignoring language={language!r}", stacklevel=2
            )

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Clean and tokenize ``texts``; returns (len(texts), context_length) ids, padded and truncated."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        context_length = context_length or self.context_length
        if not context_length:
            raise ValueError("set context_length at construction or in the call")
        cleaned = [_CLEANERS[self.clean](text) for text in texts]
        input_ids = self.tokenizer(
            cleaned, return_tensors="pt", max_length=context_length, padding="max_length", truncation=True
        ).input_ids.long()
        sep_id = self.tokenizer.sep_token_id
        if self.strip_sep_token and sep_id is not None:
            input_ids = input_ids.masked_fill(input_ids == sep_id, 0)
        return input_ids

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
        return f"{type(self).__name__}({args})"

    # --- serialization ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``tokenizer_config.json`` (the init arguments) into ``save_directory``; returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, TOKENIZER_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.init_kwargs, f, indent=2)
        return path

    @classmethod
    def from_config(cls, text_config: PS3TextConfig, **overrides: Any) -> PS3Tokenizer:
        """Build the tokenizer a :class:`PS3TextConfig` names (``hf_tokenizer_name``, ``tokenizer_kwargs``)."""
        return cls(**{**_kwargs_from_text_config(text_config.to_dict()), **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **overrides: Any) -> PS3Tokenizer:
        """Load from a PS3 checkpoint directory or Hub repository (``owner/name``).

        Reads ``tokenizer_config.json`` (the released format: tokenizer_name, context_length, clean, ...) or,
        when it does not name a tokenizer, the ``text_config`` of ``config.json``. ``overrides`` replace the
        stored arguments; ``revision``/``cache_dir``/``token``/``local_files_only``/``force_download`` also
        apply to the Hub download of those files.
        """
        hub_kwargs = {k: overrides.pop(k) for k in _HUB_DOWNLOAD_KEYS if k in overrides}
        stored = _read_stored_kwargs(os.fspath(pretrained_model_name_or_path), hub_kwargs)
        loading = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "local_files_only")}
        return cls(**{**stored, **loading, **overrides})


# --- reading stored configurations ---------------------------------------------------------------------------------
def _known_init_kwargs(values: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_INIT_KEYS))
    if unknown:
        warnings.warn(f"ignoring unknown tokenizer settings {unknown} in {source}", stacklevel=3)
    return {k: v for k, v in values.items() if k in _INIT_KEYS}


def _kwargs_from_text_config(text_config: dict[str, Any], source: str = "text_config") -> dict[str, Any]:
    name = text_config.get("hf_tokenizer_name")
    if not name:
        raise ValueError(f"{source} names no tokenizer (hf_tokenizer_name is empty)")
    extra = _known_init_kwargs(dict(text_config.get("tokenizer_kwargs") or {}), f"{source}.tokenizer_kwargs")
    extra.pop("tokenizer_name", None)
    extra.pop("context_length", None)
    context_length = text_config.get("context_length", DEFAULT_CONTEXT_LENGTH)
    return {"tokenizer_name": name, "context_length": context_length, **extra}


def _load_json(path: str | None) -> dict[str, Any] | None:
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _resolve_files(name_or_path: str, hub_kwargs: dict[str, Any]) -> Callable[[str], str | None]:
    """Return a function mapping a file name to a local path (None when absent) for a directory or Hub repo."""
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        from vila_hd.hub import refuse_custom_code

        refuse_custom_code(local, "PS3 tokenizer")
        return lambda filename: os.path.join(local, filename)
    if os.path.isfile(local):  # a tokenizer_config.json / config.json given directly
        return lambda filename: local if filename == os.path.basename(local) else None
    if name_or_path.startswith(_LOCAL_PREFIXES) or not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(f"PS3 tokenizer path {name_or_path!r} does not exist (and is not a Hub id owner/name)")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download(filename: str) -> str | None:
        try:
            return hf_hub_download(name_or_path, filename, **hub_kwargs)
        except EntryNotFoundError:
            return None

    return download


def _read_stored_kwargs(name_or_path: str, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    locate = _resolve_files(name_or_path, hub_kwargs)
    tokenizer_config = _load_json(locate(TOKENIZER_CONFIG_NAME))
    if tokenizer_config and tokenizer_config.get("tokenizer_name"):
        return _known_init_kwargs(tokenizer_config, f"{name_or_path}/{TOKENIZER_CONFIG_NAME}")
    model_config = _load_json(locate(MODEL_CONFIG_NAME))
    if model_config is not None:
        text_config = model_config.get("text_config", model_config)
        return _kwargs_from_text_config(text_config, f"{name_or_path}/{MODEL_CONFIG_NAME}")
    if tokenizer_config is None:
        raise FileNotFoundError(f"{name_or_path!r} has neither {TOKENIZER_CONFIG_NAME} nor {MODEL_CONFIG_NAME}")
    raise ValueError(
        f"{name_or_path}/{TOKENIZER_CONFIG_NAME} is not a PS3 tokenizer config (no tokenizer_name) and there is no "
        f"{MODEL_CONFIG_NAME} with a text_config; build it with PS3Tokenizer(tokenizer_name=...)"
    )

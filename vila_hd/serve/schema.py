"""Validation of a ``POST /v1/chat/completions`` body into a :class:`ChatRequest` (or an :class:`APIError`
naming the field), and the image sources a message may use (:class:`MediaPolicy`)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from vila_hd.engine.options import GenerationOptions, LimitExceeded, ServingLimits
from vila_hd.images import load_image
from vila_hd.serve.errors import APIError

ROLES = {"system", "developer", "user", "assistant"}
KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "n", "user", "num_look_close", "num_token_look_close", "look_close_mode", "return_selection",
    "frequency_penalty", "presence_penalty", "logit_bias", "response_format", "metadata", "store", "logprobs",
    "top_logprobs",
}
# Fields read only so that a client's defaults pass: any other value is refused, never silently ignored.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
           "top_logprobs": (0,), "response_format": ({"type": "text"},)}
MAX_N = 8
MAX_STOPS = 4


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from: ``data:`` URLs always; local files only under ``media_root`` (resolved
    real paths); ``http(s)`` only with ``allow_remote`` (``max_bytes`` and ``timeout_s`` bound a fetch)."""

    media_root: str | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0


@dataclass
class ChatRequest:
    """A validated request: the conversation parts, the engine options and the OpenAI-side settings."""

    system: str | None
    messages: list[dict[str, str]]
    images: list[Image.Image]
    options: GenerationOptions
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    return_selection: bool = False
    model: str | None = None

    @property
    def sampling(self) -> bool:
        return bool(self.options.temperature)


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise APIError(400, f"{name} must be {bounds}, got {value}", name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {value!r}", name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be in [{low}, {high}], got {value}", name)
    return float(value)


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return stops


def parse_options(body: dict, defaults: GenerationOptions, limits: ServingLimits) -> GenerationOptions:
    """The engine options of ``body`` over the server's ``defaults``; the VILA-HD fields as the CLI checks them."""
    tokens = _int(body, "max_completion_tokens", 1)
    legacy = _int(body, "max_tokens", 1)
    tokens = tokens if tokens is not None else legacy
    changes: dict[str, Any] = {}
    if tokens is not None:
        try:
            limits.check_new_tokens(tokens)
        except LimitExceeded as err:
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            raise APIError(400, str(err), name, "limit_exceeded") from None
        changes["max_new_tokens"] = tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name, 0.0, 2.0 if name == "temperature" else 1.0)
        if value is not None:
            changes[name] = value
    if changes.get("top_p") == 0:
        raise APIError(400, "top_p must be in (0, 1], got 0", "top_p")
    for name in ("num_look_close", "num_token_look_close", "look_close_mode"):
        if body.get(name) is not None:
            if name == "look_close_mode" and not isinstance(body[name], str):
                raise APIError(400, f"look_close_mode must be 'top-down' or 'bottom-up', got {body[name]!r}", name)
            changes[name] = body[name]
    try:
        return defaults.updated(**changes)
    except ValueError as err:
        param = next((n for n in ("num_look_close", "num_token_look_close", "look_close_mode") if n in str(err)), None)
        param = param or ("look_close_mode" if str(err).startswith("mode") else None)
        raise APIError(400, str(err), param) from None


def parse_request(body: Any, defaults: GenerationOptions, limits: ServingLimits, media: MediaPolicy,
                  image_token: str = "<image>") -> ChatRequest:
    """Validate a decoded JSON body. Raises :class:`APIError` (400 / 413) naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; this server reads {sorted(KNOWN_FIELDS)}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise APIError(400, f"{name} is not supported by vila-hd serve (leave it unset or {neutral[0]!r})", name)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, f"model must be a string, got {body['model']!r}", "model")
    for name in ("stream", "return_selection"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(400, f"{name} must be true or false, got {body[name]!r}", name)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    options = parse_options(body, defaults, limits)
    n, seed, stop = _int(body, "n", 1, MAX_N) or 1, _int(body, "seed", 0, 2**63 - 1), _stop(body)
    # the images are decoded last: a request with a bad field costs no image work
    system, messages, images = parse_messages(body.get("messages"), limits, media, image_token)
    return ChatRequest(
        system=system, messages=messages, images=images, options=options, stream=bool(body.get("stream")),
        include_usage=bool(stream_options.get("include_usage")), n=n, seed=seed, stop=stop,
        return_selection=bool(body.get("return_selection")), model=body.get("model"),
    )


def parse_messages(messages: Any, limits: ServingLimits, media: MediaPolicy, image_token: str):
    """``(system, messages, images)``: the engine's conversation parts (one ``image_token`` per image)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    system_parts, out, images = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", f"{where}.role")
        text, found = _content(message.get("content"), f"{where}.content", limits, media, image_token, len(images))
        if role in ("system", "developer"):
            if found:
                raise APIError(400, f"{where}: images are only allowed in user messages", f"{where}.content")
            system_parts.append(text)
            continue
        if found and role != "user":
            raise APIError(400, f"{where}: images are only allowed in user messages", f"{where}.content")
        images.extend(found)
        out.append({"role": role, "content": text})
    if not out or out[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (nothing to answer)", "messages")
    return ("\n\n".join(system_parts) or None), out, images


def _content(content: Any, where: str, limits: ServingLimits, media: MediaPolicy, token: str, seen: int):
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise APIError(400, f"{where} must be a string or a list of parts, got {type(content).__name__}", where)
    texts, images = [], []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{here}.text must be a string", f"{here}.text")
            if token in text:
                raise APIError(400, f"{here}.text contains the image placeholder {token}; send images as "
                                    "image_url parts", f"{here}.text")
            texts.append(text)
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{here}.image_url.url must be a string", f"{here}.image_url")
            try:
                limits.check_images(seen + len(images) + 1, "the request")
            except LimitExceeded as err:
                raise APIError(413, str(err), "messages", "limit_exceeded") from None
            images.append(load_url(url, f"{here}.image_url", limits, media))
            texts.append(f"{token}\n")
        else:
            raise APIError(400, f"{here}.type must be 'text' or 'image_url', got {kind!r}", f"{here}.type")
    return "".join(texts), images


def load_url(url: str, param: str, limits: ServingLimits, media: MediaPolicy) -> Image.Image:
    """Decode the image at ``url`` (see :class:`MediaPolicy`), the pixel limit checked from the header."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, param, media)
    elif scheme in ("http", "https"):
        data = _remote(url, param, media)
    elif scheme in ("", "file"):
        data = _local(url, param, media)
    else:
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r} (data:, http(s): or a file path)",
                       param)
    return decode_image(data, param, limits)


def _data_url(url: str, param: str, media: MediaPolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise APIError(400, f"{param}: a data URL must be data:<type>;base64,<data>", param)
    if len(payload) > media.max_bytes * 4 // 3 + 4:
        raise APIError(413, f"{param}: the image is over {media.max_bytes} bytes (--max-image-bytes)", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL is not valid base64", param) from None


def _local(url: str, param: str, media: MediaPolicy) -> bytes:
    real, path = _local_path(url, param, media)
    if not os.path.isfile(real):
        raise APIError(400, f"{param}: no image file {path!r} under the media root", param)
    if os.path.getsize(real) > media.max_bytes:
        raise APIError(413, f"{param}: {path!r} is over {media.max_bytes} bytes (--max-image-bytes)", param)
    with open(real, "rb") as f:
        return f.read()


def _local_path(url: str, param: str, media: MediaPolicy) -> tuple[str, str]:
    """``(resolved real path, path as given)`` of a plain path or ``file:`` URL, refused outside the root."""
    if media.media_root is None:
        raise APIError(400, f"{param}: local image paths are refused (the server has no --media-root); send a "
                            "data: URL", param)
    path = url
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{param}: a file URL must be file:///PATH (got host {parts.netloc!r})", param)
        path = unquote(parts.path)
    if "\0" in path:
        raise APIError(400, f"{param}: the image path contains a NUL character", param)
    root = os.path.realpath(media.media_root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise APIError(400, f"{param}: {path!r} is outside the media root", param)
    return real, path


def _remote(url: str, param: str, media: MediaPolicy) -> bytes:
    if not media.allow_remote:
        raise APIError(400, f"{param}: remote image URLs are refused (the server runs without "
                            "--allow-remote-images); send a data: URL", param)
    import httpx

    try:
        with httpx.stream("GET", url, timeout=media.timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise APIError(400, f"{param}: fetching the image gave HTTP {response.status_code}", param)
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > media.max_bytes:
                    raise APIError(413, f"{param}: the image is over {media.max_bytes} bytes (--max-image-bytes)",
                                   param)
            return bytes(data)
    except httpx.HTTPError as err:
        raise APIError(400, f"{param}: cannot fetch the image: {type(err).__name__}", param) from None


def decode_image(data: bytes, param: str, limits: ServingLimits) -> Image.Image:
    """The decoded RGB image; over the pixel limit (read from the header) is a 413, undecodable a 400."""
    limit = limits.max_image_pixels
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise APIError(413, f"{param}: the image's pixel count is above the serving limit max_image_pixels={limit} "
                            "(--limit-image-pixels)", param, "limit_exceeded") from None
    except Exception:  # noqa: BLE001 - any decoder failure is the client's undecodable image
        raise APIError(400, f"{param}: the image cannot be decoded (not a supported image file)", param) from None
    if limit is not None and width * height > limit:
        raise APIError(413, str(limits.exceeded("max_image_pixels", f"{param} ({width} x {height}) pixel count",
                                                width * height)), param, "limit_exceeded")
    try:
        return load_image(data, max_pixels=limit)
    except ValueError as err:
        raise APIError(400, f"{param}: {err}", param) from None

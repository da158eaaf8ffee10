"""Training data as the outside world ships it: LLaVA JSON / JSONL, Hugging Face ``datasets`` in the
``messages`` + ``images`` form, a YAML dataset registry and mixtures.

Every source yields :class:`RawSample` records (``id``, chat ``messages`` with ``<image>`` placeholders,
image references, optional boxes); nothing here tokenizes, decodes images or knows about models.

LLaVA records: ``{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
"value": str}], "box": [x1, y1, x2, y2] | [[...] | null per image]}`` (boxes in original pixels).
``messages`` records: ``{"id"?, "messages": [{"role", "content": str | typed parts}], "images": [path |
PIL image | {"bytes", "path"}], "box"?}``.

Registry YAML (paths relative to the registry file)::

    llava_sft:
      path: data/llava_v1_5_mix665k.json     # .json / .jsonl (LLaVA), .parquet, a saved dataset directory
      media: data/images                      # folder the image paths are relative to (default: the file's folder)
      format: llava                           # llava | messages (default: llava for .json/.jsonl)
      allow_outside_media: false              # true: records may name absolute paths and ../ escapes

Image paths of records are relative to ``media`` (default: the data file's own folder) and must stay inside it:
an absolute path, a ``..`` that leaves the folder or a symbolic link in it that points out of it (both sides are
compared as resolved real paths) is a bad sample (``image path escapes the media folder``) unless the entry sets
``allow_outside_media: true`` (scraped data must not make training read arbitrary files).

Mixtures: ``a+b*3+c@0.5`` -- ``*N`` repeats a dataset N times, ``@F`` keeps a fixed pseudo-random fraction
F of it (chosen with the mixture seed; both may be combined, ``c@0.5*2``).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vila_hd.compat.conversation import llava_to_messages
from vila_hd.errors import FileFormatError, describe
from vila_hd.templates import IMAGE_TOKEN, flatten_messages

FORMATS = ("llava", "messages")


class SampleError(ValueError):
    """A sample that cannot be trained on; ``reason`` is one of :data:`REASONS`, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Reasons a sample is rejected (the vocabulary of `vila-hd data check` and of the training skip counters).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
PATH_ESCAPES = "image path escapes the media folder"
PLACEHOLDER_MISMATCH = "placeholder/image count mismatch"
MALFORMED = "malformed turns"
EMPTY = "empty conversation"
NO_TARGET = "no assistant turn to train on"
TOO_LONG = "too long after image-token expansion"
BAD_BOX = "bad box"
REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, PATH_ESCAPES, PLACEHOLDER_MISMATCH, MALFORMED, EMPTY, NO_TARGET,
           TOO_LONG, BAD_BOX)


@dataclass
class RawSample:
    """One sample in a source-independent form."""

    id: str
    messages: list[dict[str, str]]  # role/content, content with <image> placeholders
    images: list[Any] = field(default_factory=list)  # resolved paths, PIL images or bytes
    boxes: list[list[float] | None] = field(default_factory=list)  # per image, original pixels, or None


# How a user allows image paths out of the media folder, by the way the dataset came in: a registry / recipe
# entry (the default) or a data file named on the command line (`data check FILE`).
ALLOW_IN_YAML = "set allow_outside_media: true on the dataset entry"
ALLOW_BY_FLAG = "pass --allow-outside-media"


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry."""

    name: str
    path: str
    media: str | None = None  # make_entry sets it (default: the data file's folder); None: paths taken as is
    format: str = "llava"
    allow_outside_media: bool = False  # let records name absolute paths / ../ escapes out of ``media``
    allow_hint: str = ALLOW_IN_YAML  # how this entry's user allows paths out of ``media`` (see resolve_media_path)


# --- registry -------------------------------------------------------------------------------------
def _guess_format(path: str) -> str:
    return "llava" if path.endswith((".json", ".jsonl")) else "messages"




def make_entry(name: str, spec: dict[str, Any], base_dir: str | None = None,
               allow_hint: str | None = None) -> DatasetEntry:
    """Validate one registry entry; relative paths are taken from ``base_dir``; ``allow_hint`` (default: the
    YAML key) is how the bad-sample detail of an escaping image path says to allow it."""
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"dataset {name!r}: an entry needs at least 'path' (got {spec!r})")
    unknown = set(spec) - {"path", "media", "format", "description", "allow_outside_media"}
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown field(s) {sorted(unknown)}; known: path, media, format, "
                         "description, allow_outside_media")
    allow_outside = spec.get("allow_outside_media", False)
    if not isinstance(allow_outside, bool):
        raise ValueError(f"dataset {name!r}: allow_outside_media must be true or false, got {allow_outside!r}")

    def resolve(p):
        if p is None:
            return None
        p = os.path.expanduser(str(p))
        return p if os.path.isabs(p) or base_dir is None else os.path.normpath(os.path.join(base_dir, p))

    path = resolve(spec["path"])
    fmt = spec.get("format") or _guess_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"dataset {name!r}: format must be one of {FORMATS}, got {fmt!r}")
    media = resolve(spec.get("media")) or default_media(path)
    hint = {"allow_hint": allow_hint} if allow_hint else {}
    return DatasetEntry(name=name, path=path, media=media, format=fmt, allow_outside_media=allow_outside, **hint)


def default_media(path: str) -> str:
    """The media folder of a dataset that names none: the data file's own folder (a saved dataset directory: the
    directory itself), never the current directory."""
    path = os.path.abspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def load_registry(path: str | os.PathLike) -> dict[str, DatasetEntry]:
    """Read a registry YAML (name -> path, media, format); paths are relative to the YAML file."""
    import yaml

    path = os.fspath(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a dataset registry is a mapping name -> {{path, media, format}}")
    data = data.get("datasets", data)
    base = os.path.dirname(os.path.abspath(path))
    return {str(name): make_entry(str(name), spec, base) for name, spec in data.items()}


# --- mixtures -------------------------------------------------------------------------------------
_TERM = re.compile(r"^(?P<name>[A-Za-z0-9_.\-/]+?)(?P<mods>([*@][0-9.]+)*)$")


@dataclass(frozen=True)
class MixtureTerm:
    name: str
    repeat: int = 1
    fraction: float = 1.0


def parse_mixture(text: str) -> list[MixtureTerm]:
    """``"a+b*3+c@0.5"`` -> terms (repeats are integers >= 1, fractions in (0, 1])."""
    terms = []
    for raw in str(text).split("+"):
        raw = raw.strip()
        match = _TERM.match(raw)
        if not raw or not match:
            raise ValueError(f"bad mixture term {raw!r} in {text!r}; expected name, name*N or name@F")
        repeat, fraction = 1, 1.0
        for op, value in re.findall(r"([*@])([0-9.]+)", match.group("mods")):
            if op == "*":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"mixture term {raw!r}: a repeat count must be an integer >= 1")
                repeat *= int(value)
            else:
                frac = float(value)
                if not 0 < frac <= 1:
                    raise ValueError(f"mixture term {raw!r}: a fraction must lie in (0, 1]")
                fraction *= frac
        terms.append(MixtureTerm(match.group("name"), repeat, fraction))
    return terms


# --- readers --------------------------------------------------------------------------------------
class LlavaSource:
    """LLaVA JSON (a list) or JSONL (one record per line, read lazily by byte offset)."""

    def __init__(self, entry: DatasetEntry):
        self.entry = entry
        if not os.path.exists(entry.path):
            raise FileNotFoundError(f"dataset {entry.name!r}: {entry.path} does not exist")
        self._records: list | None = None
        self._offsets: list[int] | None = None
        if entry.path.endswith(".jsonl"):
            self._offsets = []
            with open(entry.path, "rb") as f:
                pos = 0
                for line in f:
                    if line.strip():
                        self._offsets.append(pos)
                    pos += len(line)
        else:
            try:
                with open(entry.path, encoding="utf-8") as f:
                    records = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:  # one JSON document: nothing to skip to
                raise ValueError(f"dataset {entry.name!r}: {entry.path} is not a UTF-8 JSON document ({err}); "
                                 "JSONL (one record per line) lets training skip the bad records instead") from None
            if not isinstance(records, list):
                raise ValueError(f"dataset {entry.name!r}: {entry.path} must hold a JSON list of samples")
            self._records = records

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._offsets)

    def record(self, index: int) -> Any:
        if self._records is not None:
            return self._records[index]
        with open(self.entry.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            return json.loads(line)
        except UnicodeDecodeError as err:  # json.loads(bytes) decodes first: a line of Latin-1, binary...
            raise SampleError(MALFORMED, f"line is not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            raise SampleError(MALFORMED, f"line is not valid JSON ({err})") from None

    def __getitem__(self, index: int) -> RawSample:
        e = self.entry
        return llava_record_to_sample(self.record(index), index, e.media, e.allow_outside_media, e.allow_hint)


class MessagesSource:
    """Hugging Face ``datasets`` (json / jsonl / parquet files or a ``save_to_disk`` directory) with
    ``messages`` + ``images`` columns."""

    def __init__(self, entry: DatasetEntry):
        self.entry = entry
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"dataset {entry.name!r} ({entry.path}) needs the `datasets` package") from err
        path = entry.path
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
        elif os.path.exists(path):
            ds = _load_data_file(entry.name, path)
        else:
            raise FileNotFoundError(f"dataset {entry.name!r}: {path} does not exist")
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"dataset {entry.name!r}: {path} holds splits {list(ds)} but no 'train' split")
            ds = ds["train"]
        if "messages" not in ds.column_names:
            raise ValueError(f"dataset {entry.name!r}: needs a 'messages' column, has {ds.column_names}")
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> Any:
        return self.dataset[index]

    def __getitem__(self, index: int) -> RawSample:
        e = self.entry
        return messages_record_to_sample(self.record(index), index, e.media, e.allow_outside_media, e.allow_hint)


# The data files ``datasets`` reads, by extension (a saved dataset is a directory).
DATA_FILE_KINDS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
EXPECTED_DATA = "a LLaVA .json / .jsonl file, a .parquet file or a saved dataset directory"
# datasets' readers log the parse error ("Failed to read schema ...", "Failed to load JSON ...") before they raise:
# our error line says it already.
_READER_LOGGER = "datasets.packaged_modules.{kind}.{kind}"


def _load_data_file(name: str, path: str):
    """One data file through ``datasets.load_dataset`` by its extension; an unknown extension, or a file the
    library cannot parse, is a :class:`~vila_hd.errors.FileFormatError` naming the file and the formats."""
    import logging

    import datasets

    ext = os.path.splitext(path)[1].lower()
    kind = DATA_FILE_KINDS.get(ext)
    if kind is None:
        raise FileFormatError(f"dataset {name!r}: {path} is not a training data file (extension "
                              f"{ext or 'none'!r}); expected {EXPECTED_DATA}")
    logger = logging.getLogger(_READER_LOGGER.format(kind=kind))
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except (datasets.exceptions.DatasetsError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetsError) and err.__cause__ else err
        raise FileFormatError(f"dataset {name!r}: {path} cannot be read as {kind} ({describe(cause)}); expected "
                              f"{EXPECTED_DATA}") from err
    finally:
        logger.setLevel(level)


def open_source(entry: DatasetEntry):
    return LlavaSource(entry) if entry.format == "llava" else MessagesSource(entry)


# --- record -> RawSample ----------------------------------------------------------------------------
def resolve_media_path(path: Any, media: str | None, allow_outside: bool = False,
                       allow_hint: str = ALLOW_IN_YAML) -> str:
    """Image path of a record: joined to ``media``, and refused (``PATH_ESCAPES``) when it leaves it -- an
    absolute path or a ``..`` escape -- unless ``allow_outside``. Without a media folder, paths are taken as is."""
    if not isinstance(path, str) or not path:
        raise SampleError(MALFORMED, f"image entry must be a non-empty path string, got {path!r}")
    if "\0" in path:
        raise SampleError(MALFORMED, f"image path {path!r} contains a NUL character")
    if media is None:
        return path
    root = os.path.abspath(media)
    full = os.path.abspath(os.path.join(root, path))  # an absolute `path` replaces the root here
    if not allow_outside and not inside(root, full):
        kind = "an absolute path" if os.path.isabs(path) else "a path"
        if os.path.commonpath([root, full]) == root:  # inside by name: a symbolic link leads out
            kind = "a symbolic link (or a path through one) that leads"
        raise SampleError(PATH_ESCAPES, f"{path!r} is {kind} outside the media folder {root} ({allow_hint} to "
                                        "allow that)")
    return full


def inside(root: str, path: str) -> bool:
    """Whether ``path`` lies in folder ``root`` once both are resolved (symbolic links followed, ``..`` removed):
    a link in the folder that points out of it is outside."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root


def _boxes(record: dict, num_images: int) -> list[list[float] | None]:
    box = record.get("box", record.get("boxes"))
    if box is None:
        return [None] * num_images
    if num_images == 0:
        raise SampleError(BAD_BOX, "a box is given but the sample has no image")
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        box = [box] + [None] * (num_images - 1)
    if not isinstance(box, (list, tuple)) or len(box) != num_images:
        raise SampleError(BAD_BOX, f"expected one [x1, y1, x2, y2] box or one per image ({num_images}), got {box!r}")
    out = []
    for b in box:
        if b is None:
            out.append(None)
            continue
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise SampleError(BAD_BOX, f"a box must be four numbers [x1, y1, x2, y2], got {b!r}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if not (x2 > x1 and y2 > y1 and x1 >= 0 and y1 >= 0):
            raise SampleError(BAD_BOX, f"box {list(b)} is empty or negative (need x2 > x1 >= 0, y2 > y1 >= 0)")
        out.append([x1, y1, x2, y2])
    return out


def _check_text(messages: list[dict[str, str]]) -> None:
    """Reject text no tokenizer can take: lone surrogates (JSON ``"\\udcff"`` escapes, mis-decoded bytes)."""
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as err:
            raise SampleError(MALFORMED, f"turn {i} holds text that is not valid Unicode ({err.reason} at "
                                         f"character {err.start})") from None


def _sample_id(record: dict, index: int) -> str:
    value = record.get("id", record.get("sample_id"))
    return str(value) if value is not None else f"#{index}"


def llava_record_to_sample(record: Any, index: int, media: str | None, allow_outside: bool = False,
                           allow_hint: str = ALLOW_IN_YAML) -> RawSample:
    """A LLaVA record -> :class:`RawSample` (raises :class:`SampleError`)."""
    if not isinstance(record, dict):
        raise SampleError(MALFORMED, f"a sample must be a JSON object, got {type(record).__name__}")
    sid = _sample_id(record, index)
    conversations = record.get("conversations")
    if not conversations:
        raise SampleError(EMPTY, "no 'conversations'")
    if not isinstance(conversations, list):
        raise SampleError(MALFORMED, f"'conversations' must be a list, got {type(conversations).__name__}")
    try:
        messages = llava_to_messages(conversations)
    except ValueError as err:
        raise SampleError(MALFORMED, str(err)) from None
    _check_text(messages)
    image = record.get("image", record.get("images"))
    images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
    paths = [resolve_media_path(p, media, allow_outside, allow_hint) for p in images]
    return RawSample(sid, messages, paths, _boxes(record, len(paths)))


def messages_record_to_sample(record: Any, index: int, media: str | None, allow_outside: bool = False,
                              allow_hint: str = ALLOW_IN_YAML) -> RawSample:
    """A ``messages`` + ``images`` record -> :class:`RawSample` (raises :class:`SampleError`)."""
    if not isinstance(record, dict):
        raise SampleError(MALFORMED, f"a sample must be a mapping, got {type(record).__name__}")
    sid = _sample_id(record, index)
    raw_messages = record.get("messages")
    if not raw_messages:
        raise SampleError(EMPTY, "no 'messages'")
    try:
        messages, inline = flatten_messages(raw_messages, IMAGE_TOKEN)
    except (ValueError, AttributeError, TypeError) as err:
        raise SampleError(MALFORMED, str(err)) from None
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise SampleError(MALFORMED, f"message {i} has role {m['role']!r} / content {type(m['content']).__name__}")
    _check_text(messages)
    column = record.get("images") or []
    if not isinstance(column, (list, tuple)):
        column = [column]
    given = [im for im in inline if im is not None]
    images = list(column) if column else given
    resolved = []
    for im in images:
        if isinstance(im, dict):  # datasets' Image feature without decoding: {"bytes", "path"}
            im = im.get("bytes") or im.get("path")
        resolved.append(resolve_media_path(im, media, allow_outside, allow_hint) if isinstance(im, str) else im)
    return RawSample(sid, messages, resolved, _boxes(record, len(resolved)))


def ensure_placeholders(sample: RawSample, image_token: str = IMAGE_TOKEN) -> RawSample:
    """Insert missing placeholders at the start of the first user turn; reject count mismatches."""
    n = len(sample.images)
    found = sum(m["content"].count(image_token) for m in sample.messages)
    if found == n:
        return sample
    if found == 0 and n > 0:
        messages = [dict(m) for m in sample.messages]
        for m in messages:
            if m["role"] == "user":
                m["content"] = (image_token + "\n") * n + m["content"]
                break
        else:
            raise SampleError(MALFORMED, "the sample has images but no user turn to put them in")
        return RawSample(sample.id, messages, sample.images, sample.boxes)
    raise SampleError(PLACEHOLDER_MISMATCH, f"{found} {image_token} placeholder(s) for {n} image(s)")


def check_turns(messages: Sequence[dict[str, str]]) -> None:
    """Structural checks every sample passes before tokenization."""
    if not messages:
        raise SampleError(EMPTY, "no turns")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise SampleError(MALFORMED, f"turn {i} is a system turn; only the first turn may be one")
        if not m["content"].strip():
            raise SampleError(MALFORMED, f"turn {i} ({m['role']}) is empty")
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in roles:
        raise SampleError(NO_TARGET, "the conversation has no assistant turn")
    if roles[-1] != "assistant":
        raise SampleError(MALFORMED, "the conversation ends on a user turn")


# --- mixtures of sources ------------------------------------------------------------------------------
class Mixture:
    """Concatenation of sources with repeats and fractions; ``index[i] = (source_id, local_index)``."""

    def __init__(self, sources: list[tuple[str, Any]], terms: list[MixtureTerm], seed: int = 0):
        self.names = [name for name, _ in sources]
        self.sources = [source for _, source in sources]
        by_name = {name: i for i, name in enumerate(self.names)}
        self.index: list[tuple[int, int]] = []
        for term in terms:
            sid = by_name[term.name]
            n = len(self.sources[sid])
            local = list(range(n))
            if term.fraction < 1.0:
                keep = max(1, round(n * term.fraction)) if n else 0
                local = sorted(random.Random(f"{seed}:{term.name}").sample(local, keep))
            for _ in range(term.repeat):
                self.index.extend((sid, j) for j in local)

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> tuple[str, int]:
        sid, j = self.index[i]
        return self.names[sid], j

    def __getitem__(self, i: int) -> RawSample:
        sid, j = self.index[i]
        return self.sources[sid][j]


def build_mixture(registry: dict[str, DatasetEntry], mixture: str, seed: int = 0) -> Mixture:
    """Open the datasets a mixture names (each once, even when repeated)."""
    terms = parse_mixture(mixture)
    missing = [t.name for t in terms if t.name not in registry]
    if missing:
        raise KeyError(f"mixture {mixture!r} names unknown dataset(s) {missing}; registered: {sorted(registry)}")
    names = list(dict.fromkeys(t.name for t in terms))
    return Mixture(list(open_sources(registry, names).items()), terms, seed)


def open_sources(registry: dict[str, DatasetEntry], names: Sequence[str]) -> dict[str, Any]:
    """Open the named datasets; when the files of several do not exist, one error lists them all."""
    sources, missing = {}, []
    for name in names:
        entry = registry[name]
        if not os.path.exists(entry.path):
            missing.append(entry)
            continue
        sources[name] = open_source(entry)
    if len(missing) == 1:
        raise FileNotFoundError(f"dataset {missing[0].name!r}: {missing[0].path} does not exist")
    if missing:
        listed = "; ".join(f"{e.name!r}: {e.path}" for e in missing)
        raise FileNotFoundError(f"{len(missing)} datasets' files do not exist: {listed} (download or create them, "
                                "or fix their paths in the registry)")
    return sources

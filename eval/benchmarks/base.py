"""What every benchmark runner shares: the :class:`Sample`, the :class:`Benchmark` interface, table readers.

A runner turns the publisher's files into samples (images, the prompt sent to the model, the reference
answer) and scores a reply; the harness (``vila_hd.eval.harness``) does the rest (running, resuming, sharding,
summaries).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vila_hd.errors import FileFormatError
from vila_hd.eval.answers import option_map, parse_choice
from vila_hd.eval.metrics import micro_accuracy, open_answer_score

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
ANSWER_PARSERS = ("official", "robust")
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


class FormatError(FileFormatError):
    """A benchmark file does not have the publisher's layout; the message names the file, row and field."""


@dataclass
class Sample:
    """One question.

    Attributes:
        id: unique within the benchmark (a string; resuming keys on it).
        images: image sources in order: paths, encoded bytes or PIL images.
        prompt: the text sent to the model (question, options, instruction).
        question: the bare question (for the per-sample output and likelihood scoring).
        answer: the option letter (multiple choice) or the reference answer (open).
        options: ``{"A": text, ...}`` for multiple choice, ``None`` for open questions.
        answers: every accepted answer of an open question (e.g. the 10 TextVQA annotations).
        category / bucket: groups of the summary (bucket = resolution bucket; derived from the image size
            when ``None``).
        meta: benchmark-specific fields kept in the per-sample output (e.g. HR-Bench's ``cycle_category``).
    """

    id: str
    images: list[Any]
    prompt: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    answers: list[str] = field(default_factory=list)
    category: str | None = None
    bucket: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)


class Benchmark:
    """A benchmark runner: ``samples()`` from the publisher's files, ``score()`` of one reply, and the
    benchmark's own aggregate (``group_accuracy``, ``extra_summary``).

    Subclasses set ``name`` and implement :meth:`load`. ``answer_parser`` picks how a reply's letter is read:
    ``official`` (the rule of the scorer whose numbers papers report, :meth:`official_choice`; for our own
    formats that is our parser) or ``robust`` (:func:`~vila_hd.eval.answers.parse_choice`)."""

    name = "benchmark"
    metric = "accuracy"  # what the headline number is
    instruction: str | None = None  # default instruction appended to multiple-choice prompts
    official_scorer = "vila_hd.eval.answers.parse_choice (this project's format)"

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 instruction: str | None = None, answer_parser: str = "official", **options: Any):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.name}: {self.path} does not exist")
        if answer_parser not in ANSWER_PARSERS:
            raise ValueError(f"{self.name}: --answer-parser must be one of {ANSWER_PARSERS}, got {answer_parser!r}")
        self.answer_parser = answer_parser
        self.image_root = Path(image_root) if image_root is not None else None
        if instruction is not None:
            self.instruction = instruction
        unknown = set(options) - set(self.option_names)
        if unknown:
            raise TypeError(f"{self.name} does not take the option(s) {sorted(unknown)}; it takes "
                            f"{sorted(self.option_names) or 'none'}")
        self.options = options
        self._samples: list[Sample] | None = None

    option_names: tuple[str, ...] = ()

    def samples(self) -> list[Sample]:
        """The benchmark's samples in the publisher's order (loaded once); ids are checked to be unique."""
        if self._samples is None:
            samples = self.load()
            seen: dict[str, int] = {}
            for i, sample in enumerate(samples):
                if sample.id in seen:
                    raise FormatError(f"{self.name}: {self.path}: id {sample.id!r} is used by samples {seen[sample.id]} "
                                      f"and {i}; ids must be unique")
                seen[sample.id] = i
            self._samples = samples
        return self._samples

    def load(self) -> list[Sample]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What identifies this benchmark run (stored with the outputs; a resumed run must match)."""
        return {"benchmark": self.name, "data": str(self.path.resolve()), "instruction": self.instruction,
                "image_root": None if self.image_root is None else str(self.image_root.resolve()),
                "answer_parser": self.answer_parser, **{k: v for k, v in sorted(self.options.items())}}

    # --- scoring ----------------------------------------------------------------------------------------
    def score(self, sample: Sample, reply: str) -> dict[str, Any]:
        """Fields added to the sample's record: ``parsed`` (letter or normalised answer), ``parse_rule``,
        ``score`` (0..1) and ``correct``."""
        if sample.is_multiple_choice:
            if self.answer_parser == "official":
                letter, rule = self.official_choice(sample, reply)
            else:
                parsed = parse_choice(reply, sample.options)
                letter, rule = parsed.letter, parsed.rule
            correct = letter == sample.answer
            return {"parsed": letter, "parse_rule": rule, "score": float(correct), "correct": correct}
        metric = sample.meta.get("metric", "exact")
        value = open_answer_score(reply, sample.answers or [sample.answer], metric)
        return {"parsed": None, "parse_rule": metric, "score": value, "correct": value >= 1.0}

    def official_choice(self, sample: Sample, reply: str) -> tuple[str | None, str]:
        """``(letter or None, rule name)`` as the benchmark's official scorer reads ``reply``."""
        parsed = parse_choice(reply, sample.options)
        return parsed.letter, parsed.rule

    def group_accuracy(self, records: Sequence[dict[str, Any]]) -> float | None:
        """The benchmark's accuracy over ``records`` (overall and for each group): micro mean by default."""
        return micro_accuracy(records)

    def extra_summary(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Benchmark-specific parts of the summary."""
        return {}


def format_choices(options: dict[str, str], style: str = "{letter}. {text}") -> str:
    return "\n".join(style.format(letter=k, text=v) for k, v in options.items())


def choice_prompt(question: str, options: dict[str, str], instruction: str | None) -> str:
    """``question\\nA. ...\\nB. ...\\ninstruction`` (LLaVA / lmms-eval multiple-choice layout)."""
    parts = [question.strip(), format_choices(options)]
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def resolve_answer_letter(answer: Any, options: dict[str, str], where: str) -> str:
    """The letter of ``answer``: a letter among the options, or exactly one option's text."""
    if not isinstance(answer, str) or not answer.strip():
        raise FormatError(f"{where}: 'answer' must be a non-empty string, got {answer!r}")
    text = answer.strip()
    if text.upper() in options and len(text) == 1:
        return text.upper()
    stripped = text.strip("()").strip()
    if len(stripped) == 1 and stripped.upper() in options:
        return stripped.upper()
    same = [k for k, v in options.items() if v.strip().lower() == text.lower()]
    if len(same) == 1:
        return same[0]
    raise FormatError(f"{where}: answer {answer!r} is neither one of the option letters {''.join(options)} nor "
                      f"the text of exactly one option")


def options_from(value: Any, where: str) -> dict[str, str]:
    """Options given as a list of texts or a ``{letter: text}`` mapping; at least two."""
    if isinstance(value, dict):
        opts = option_map(value)
    elif isinstance(value, list):
        opts = option_map(value)
    else:
        raise FormatError(f"{where}: 'options' must be a list of strings or a {{letter: text}} object, got "
                          f"{type(value).__name__}")
    if len(opts) < 2:
        raise FormatError(f"{where}: a multiple-choice question needs at least 2 options, got {len(opts)}")
    bad = [k for k in opts if len(k) != 1 or not k.isalpha()]
    if bad:
        raise FormatError(f"{where}: option keys must be single letters, got {bad}")
    for k, v in opts.items():
        if not isinstance(v, str) or not v.strip():
            raise FormatError(f"{where}: option {k} must be a non-empty string, got {v!r}")
    return opts


# --- table readers ----------------------------------------------------------------------------------------
@contextmanager
def utf8_text(path: str | os.PathLike, expected: str) -> Iterator[None]:
    """Name ``path`` when what the block reads from it is not UTF-8 text (an image given as a data file)."""
    try:
        yield
    except UnicodeDecodeError:
        raise FormatError(f"{os.fspath(path)} is not UTF-8 text (a binary file?); expected {expected}") from None


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.json`` (a list, or ``{"data": [...]}``), ``.jsonl``, ``.tsv`` or ``.parquet`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f, utf8_text(path, "a JSON file"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise FormatError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FormatError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        return data
    if suffix == ".tsv":
        return read_tsv(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise FormatError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl, .tsv or .parquet)")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f, utf8_text(path, "JSON lines (one JSON object a line)"):
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(f"{path} line {number} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise FormatError(f"{path} line {number} is not a JSON object")
            row.setdefault("_line", number)
            rows.append(row)
    return rows


def read_tsv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A VLMEvalKit-style TSV (header row, tab separated, base64 images in a column)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far longer than csv's default 128 kB
    with open(path, encoding="utf-8", newline="") as f, utf8_text(path, "a tab-separated table"):
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames:
            raise FormatError(f"{path} is empty (no header row)")
        rows = []
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise FormatError(f"{path} line {number} has more fields than the header ({len(reader.fieldnames)})")
            row["_line"] = number
            rows.append(row)
    return rows


def read_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or use the .tsv / .json twin of "
                          "the file") from None
    return pq.read_table(path).to_pylist()


def decode_image_field(value: Any, where: str) -> bytes:
    """Encoded image bytes from a table cell: base64 text, raw bytes, or ``{"bytes": ...}`` (HF Image)."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as err:
            raise FormatError(f"{where}: the image is not valid base64 ({err})") from None
    raise FormatError(f"{where}: no image data (got {type(value).__name__})")


def sample_id(value: Any) -> str:
    """A table cell as a sample id (``3.0`` from a float column reads as ``3``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def require(row: dict[str, Any], names: Sequence[str], where: str) -> None:
    missing = [n for n in names if n not in row or row[n] is None]
    if missing:
        present = sorted(k for k in row if not k.startswith("_"))
        raise FormatError(f"{where}: missing field(s) {missing}; the row has {present}")

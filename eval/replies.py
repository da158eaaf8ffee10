"""Saved replies to re-score: the prediction files of this project and of the ecosystems papers use.

``load_replies(path, benchmark, fmt="auto")`` returns ``{sample id: reply}``. Formats (``fmt``, or detected from
the file's content -- its first bytes, its first record's keys or its header -- never from its name):

- ``vila-hd``: JSONL of ``{"id", "prediction"}`` (``text`` / ``response`` / ``output`` / ``answer`` also read);
  a ``samples.jsonl`` of an earlier run is one.
- ``lmms-eval``: a ``*_samples_<task>.jsonl`` log: ``doc_id`` (the question's position in the benchmark's
  order) with ``resps`` (the raw reply; absent when equal to the filtered one) and ``filtered_resps``. The raw
  reply is scored, since our rules do their own extraction. A single-letter ``target`` is checked against
  the benchmark's answer, so a log of another order or split is refused.
- ``vlmevalkit``: a result ``.xlsx`` (needs openpyxl) or ``.tsv`` with the columns ``index`` and ``prediction``;
  a cell pandas reads as NaN (empty, "NA", "None", ...) becomes ``"nan"``, as VLMEvalKit's ``str(x)`` makes it.
- ``mme-realworld``: MME-RealWorld's results JSON (``output_test_template.json``: the question records with
  ``Output``) or its ``model_vqa_mme_real_world.py`` JSONL (``output``), joined on ``Question_id``.
- ``llava``: LLaVA's answer JSONL (``question_id``, ``prompt``, ``text``). For TextVQA LLaVA's ``question_id``
  holds the image id, so lines join on (image id, question read from ``prompt`` as LLaVA's
  ``eval_textvqa.py`` reads it).

Every reply must match a question; ids that match none, and repeated ids, are errors naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vila_hd.eval.benchmarks.base import Benchmark, FormatError, Sample, read_jsonl, read_tsv, sample_id, utf8_text

REPLY_FORMATS = ("auto", "vila-hd", "lmms-eval", "vlmevalkit", "mme-realworld", "llava")
REPLY_KEYS = ("prediction", "text", "response", "output", "answer")
_XLSX_MAGIC = b"PK\x03\x04"
# The cells pandas reads as NaN by default (VLMEvalKit loads results with pandas and scores str(prediction)).
_PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def load_replies(path: str | os.PathLike, benchmark: Benchmark, fmt: str = "auto") -> dict[str, str]:
    """``{sample id: reply}`` from ``path`` in format ``fmt`` (see the module docstring)."""
    if fmt not in REPLY_FORMATS:
        raise ValueError(f"--replies-format must be one of {REPLY_FORMATS}, got {fmt!r}")
    path = Path(path)
    rows = read_reply_rows(path, tabular=fmt == "vlmevalkit" or (fmt == "auto" and _looks_tabular(path)))
    if not rows:
        raise FormatError(f"{path} holds no replies")
    kind = detect_format(rows[0], path) if fmt == "auto" else fmt
    pairs = _READERS[kind](rows, benchmark.samples(), path)
    return _checked(pairs, benchmark.samples(), path, kind)


def read_replies(path: str | os.PathLike) -> dict[str, str]:
    """``{id: reply}`` from a ``vila-hd`` JSONL (no benchmark needed)."""
    return {sid: text for sid, text, _ in _vila_hd(read_reply_rows(Path(path), tabular=False), [], Path(path))}


# --- reading ------------------------------------------------------------------------------------------------
def _looks_tabular(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(_XLSX_MAGIC):
        return True
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    return not first.lstrip().startswith(("{", "[")) and "\t" in first


def read_reply_rows(path: Path, tabular: bool) -> list[dict[str, Any]]:
    """Records of a JSON list, a JSONL file, a TSV or an xlsx (by content)."""
    if tabular:
        with open(path, "rb") as f:
            is_xlsx = f.read(4) == _XLSX_MAGIC
        return _read_xlsx(path) if is_xlsx else read_tsv(path)
    with utf8_text(path, "replies as JSON lines or a JSON list"):
        text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FormatError(f"{path} is not valid JSON: {err}") from None
        if not all(isinstance(r, dict) for r in data):
            raise FormatError(f"{path}: expected a JSON list of objects")
        return data
    return read_jsonl(path)


def _read_xlsx(path: Path) -> list[dict[str, Any]]:
    try:
        import openpyxl
    except ImportError:
        raise ImportError(f"reading the xlsx {path} needs openpyxl (pip install openpyxl), or give VLMEvalKit's "
                          ".tsv result instead") from None
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows = list(workbook.worksheets[0].iter_rows(values_only=True))
    finally:
        workbook.close()
    if not rows:
        raise FormatError(f"{path} is empty (no header row)")
    header = [str(h) for h in rows[0]]
    return [{**dict(zip(header, values)), "_line": number} for number, values in enumerate(rows[1:], start=2)]


def detect_format(first: dict[str, Any], path: Path) -> str:
    """The format of a replies file from its first record's keys."""
    keys = set(first)
    if "doc_id" in keys and keys & {"resps", "filtered_resps"}:
        return "lmms-eval"
    if "Question_id" in keys and keys & {"Output", "output"}:
        return "mme-realworld"
    if "index" in keys and "prediction" in keys:
        return "vlmevalkit"
    if "id" in keys and keys & set(REPLY_KEYS):
        return "vila-hd"
    if "question_id" in keys and "text" in keys:
        return "llava"
    shown = sorted(k for k in keys if not k.startswith("_"))
    raise FormatError(f"{path}: cannot tell the replies format from the first record's keys {shown}; pass "
                      f"--replies-format (one of {', '.join(REPLY_FORMATS[1:])})")


# --- one reader per format: (sample id, reply, where) triples -------------------------------------------------
Pairs = list[tuple[str, str, str]]


def _where(path: Path, row: dict[str, Any]) -> str:
    return f"{path} line {row.get('_line', '?')}"


def _vila_hd(rows, samples: Sequence[Sample], path: Path) -> Pairs:
    out = []
    for row in rows:
        key = next((k for k in REPLY_KEYS if k in row), None)
        if key is None or "id" not in row or not isinstance(row[key], (str, type(None))):
            raise FormatError(f"{_where(path, row)}: expected an object with 'id' and one of {REPLY_KEYS} (a string)")
        if row[key] is not None:  # a failed sample of an earlier run has no reply
            out.append((str(row["id"]), row[key], _where(path, row)))
    return out


def _first_text(value: Any) -> str | None:
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _lmms_eval(rows, samples: Sequence[Sample], path: Path) -> Pairs:
    out = []
    for row in rows:
        where = _where(path, row)
        doc_id = row.get("doc_id")
        if not isinstance(doc_id, int) or not 0 <= doc_id < len(samples):
            raise FormatError(f"{where}: doc_id {doc_id!r} is not a position among the benchmark's "
                              f"{len(samples)} questions")
        text = _first_text(row["resps"]) if "resps" in row else _first_text(row.get("filtered_resps"))
        if text is None:
            raise FormatError(f"{where}: no reply text in 'resps' / 'filtered_resps'")
        sample = samples[doc_id]
        target = str(row.get("target", "")).strip()
        if len(target) == 1 and target.isalpha() and len(sample.answer) == 1 and target.upper() != sample.answer:
            raise FormatError(f"{where}: doc_id {doc_id} has target {target!r} but question {sample.id!r} has answer "
                              f"{sample.answer!r}; the log is of another benchmark, split or order")
        out.append((sample.id, text, where))
    return out


def _vlmevalkit(rows, samples: Sequence[Sample], path: Path) -> Pairs:
    out = []
    for row in rows:
        if "index" not in row or "prediction" not in row:
            raise FormatError(f"{_where(path, row)}: a VLMEvalKit result needs the columns 'index' and 'prediction'")
        value = row["prediction"]
        missing = value is None or (isinstance(value, float) and value != value) or value in _PANDAS_NA
        text = "nan" if missing else str(value)
        index = row["index"]
        if isinstance(index, str) and index.strip().lstrip("-").isdigit():
            index = int(index)
        out.append((sample_id(index), text, _where(path, row)))
    return out


def _mme_realworld(rows, samples: Sequence[Sample], path: Path) -> Pairs:
    out = []
    for i, row in enumerate(rows):
        where = f"{path} record {i}" if "_line" not in row else _where(path, row)
        key = "Output" if "Output" in row else "output"
        if "Question_id" not in row or not isinstance(row.get(key), str):
            raise FormatError(f"{where}: an MME-RealWorld result needs 'Question_id' and 'Output' (or 'output')")
        out.append((sample_id(row["Question_id"]), row[key], where))
    return out


def llava_textvqa_question(prompt: str) -> str:
    """The question LLaVA's ``eval_textvqa.py`` (``prompt_processor``) reads from a prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: ") and "Question: " in prompt and " Short answer:" in prompt:
        return prompt.split("Question: ", 1)[1].split(" Short answer:", 1)[0].lower()
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise ValueError("not one of the prompt layouts LLaVA's TextVQA scorer reads")


def _llava(rows, samples: Sequence[Sample], path: Path) -> Pairs:
    by_question = {(s.meta["image_id"], s.question.strip().lower()): s.id for s in samples if "image_id" in s.meta}
    out = []
    for row in rows:
        where = _where(path, row)
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise FormatError(f"{where}: a LLaVA answer line needs 'question_id' and 'text'")
        if not by_question:
            out.append((str(row["question_id"]), row["text"], where))
            continue
        try:
            question = llava_textvqa_question(str(row.get("prompt", "")))
        except ValueError as err:
            raise FormatError(f"{where}: 'prompt' {str(row.get('prompt'))[:60]!r} is {err}") from None
        key = (str(row["question_id"]), question.strip())
        out.append((by_question.get(key, f"image {key[0]}: {key[1]}"), row["text"], where))
    return out


_READERS = {"vila-hd": _vila_hd, "lmms-eval": _lmms_eval, "vlmevalkit": _vlmevalkit,
            "mme-realworld": _mme_realworld, "llava": _llava}


def _checked(pairs: Pairs, samples: Sequence[Sample], path: Path, kind: str) -> dict[str, str]:
    known = {s.id for s in samples}
    replies: dict[str, str] = {}
    unknown = []
    for sid, text, where in pairs:
        if sid not in known:
            unknown.append(sid)
        elif sid in replies:
            raise FormatError(f"{where}: a second reply for question {sid!r}; a replies file holds one per question")
        replies[sid] = text
    if unknown:
        raise FormatError(f"{path} ({kind}): {len(unknown)} repl{'y' if len(unknown) == 1 else 'ies'} match no "
                          f"question of the benchmark, e.g. {', '.join(repr(u) for u in unknown[:3])}")
    return replies

"""V*Bench (HF ``craigwu/vstar_bench``; GitHub penghao-wu/vstar).

Layout: a root with ``test_questions.jsonl`` (``image`` relative path, ``text`` = question + ``\\n(A) ...``
lines + instruction, ``category``, ``question_id``, ``label`` letter) and the folders ``direct_attributes/``
and ``relative_position/`` holding ``sa_N.jpg`` + ``sa_N.json`` (``question``, ``options`` with the correct
option first, ``target_object``, ``bbox``). 191 questions (115 + 76; relative_position has two options).

Generative scoring: the prompt is ``text`` as published; the reply's letter, read by lmms-eval's
``vstar_bench`` rule (:func:`~vila_hd.eval.answers.lmms_eval_vstar_letter`, quirks included; ``answer_parser="robust"``
uses :func:`~vila_hd.eval.answers.parse_choice` instead), is compared with ``label``. The paper's own protocol is likelihood-based (the option with the lowest mean LM loss as the
answer after the bare question): run with ``--mc-mode likelihood``. Overall = micro mean over all questions.

Without ``test_questions.jsonl`` the questions come from the per-image JSON files, with the options put in a
fixed pseudo-random order per image (seeded by the file name) so that the correct one is not always A.
"""

from __future__ import annotations

import json
import random
import re
import string

from vila_hd.eval.answers import lmms_eval_vstar_letter
from vila_hd.eval.benchmarks.base import Benchmark, FormatError, Sample, choice_prompt, read_jsonl, require

CATEGORIES = ("direct_attributes", "relative_position")
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")
_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class VStarBench(Benchmark):
    name = "vstar"
    instruction = _INSTRUCTION
    official_scorer = "lmms-eval vstar_bench extract_answer_letter"

    def official_choice(self, sample: Sample, reply: str) -> tuple[str | None, str]:
        return lmms_eval_vstar_letter(reply), "lmms-eval"

    def load(self) -> list[Sample]:
        root = self.path.parent if self.path.is_file() else self.path
        questions = self.path if self.path.is_file() else root / "test_questions.jsonl"
        image_root = self.image_root or root
        if questions.is_file():
            return [self._from_question(row, image_root, questions) for row in read_jsonl(questions)]
        folders = [root / c for c in CATEGORIES if (root / c).is_dir()]
        if not folders:
            raise FormatError(f"vstar: {root} has neither test_questions.jsonl nor the folders {list(CATEGORIES)}")
        return [self._from_annotation(p, image_root) for folder in folders for p in sorted(folder.glob("*.json"))]

    def _from_question(self, row: dict, image_root, path) -> Sample:
        where = f"{path} line {row.get('_line')}"
        require(row, ["image", "text", "label"], where)
        question, options, _ = split_vstar_text(row["text"], where)
        label = str(row["label"]).strip().strip("()").upper()
        if label not in options:
            raise FormatError(f"{where}: label {row['label']!r} is not one of the options {''.join(options)}")
        qid = row.get("question_id", row["_line"] - 1)
        prompt = row["text"] if self.instruction == _INSTRUCTION else choice_prompt(question, options, self.instruction)
        return Sample(id=str(qid), images=[str(image_root / row["image"])], prompt=prompt, question=question,
                      answer=label, options=options, category=row.get("category"),
                      meta={"image": row["image"]})

    def _from_annotation(self, path, image_root) -> Sample:
        where = str(path)
        try:
            note = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FormatError(f"{where} is not valid JSON: {err}") from None
        require(note, ["question", "options"], where)
        texts = note["options"]
        if not isinstance(texts, list) or len(texts) < 2:
            raise FormatError(f"{where}: 'options' must be a list of at least 2 strings")
        order = list(range(len(texts)))
        random.Random(path.stem).shuffle(order)
        options = {string.ascii_uppercase[i]: str(texts[j]) for i, j in enumerate(order)}
        answer = string.ascii_uppercase[order.index(0)]  # the first published option is the correct one
        image = next((p for p in sorted(path.parent.glob(path.stem + ".*")) if p.suffix.lower() != ".json"), None)
        if image is None:
            raise FormatError(f"{where}: no image {path.stem}.* next to the annotation")
        relative = f"{path.parent.name}/{image.name}"
        return Sample(id=f"{path.parent.name}/{path.stem}", images=[str(image_root / relative)],
                      prompt=choice_prompt(note["question"], options, self.instruction), question=note["question"],
                      answer=answer, options=options, category=path.parent.name,
                      meta={"image": relative, "target_object": note.get("target_object"), "bbox": note.get("bbox")})


def split_vstar_text(text: str, where: str) -> tuple[str, dict[str, str], str]:
    """``(question, {"A": option, ...}, instruction)`` from a V* ``text`` field (options one per line)."""
    if not isinstance(text, str):
        raise FormatError(f"{where}: 'text' must be a string")
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if _OPTION_LINE.match(line.strip())), None)
    if first is None:
        raise FormatError(f"{where}: no '(A) ...' option lines in the text {text[:80]!r}")
    options, rest = {}, []
    for line in lines[first:]:
        match = _OPTION_LINE.match(line.strip())
        if match and not rest:
            options[match.group(1)] = match.group(2).strip()
        elif line.strip():
            rest.append(line.strip())
    if len(options) < 2:
        raise FormatError(f"{where}: fewer than 2 options in the text {text[:80]!r}")
    return "\n".join(lines[:first]).strip(), options, " ".join(rest)

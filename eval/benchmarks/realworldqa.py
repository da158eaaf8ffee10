"""RealWorldQA (HF ``xai-org/RealworldQA``), as the Hub distributes it.

Layout: parquet files (``data/test-*.parquet``; pass one file or the folder holding them, read in name order)
with the columns ``image`` (a struct with the encoded ``bytes`` and a ``path``), ``question`` (the question,
for multiple choice its ``A. ...`` option lines, and the publisher's trailing instruction, e.g. "Please answer
directly with only the letter of the correct option and nothing else.") and ``answer`` (a letter, or a short
answer such as a number). Sample ids are the row positions (lmms-eval's ``doc_id``).

Prompt: ``question`` stripped, as lmms-eval's ``realworldqa`` task sends it (its default post-prompt is empty,
so the publisher's instruction stays).

Scoring (``--set rule=...``):
- ``current`` (default; lmms-eval ``realworldqa_process_results`` since commit 9ca4445): an answer in A-D is
  compared with :func:`~vila_hd.eval.answers.lmms_eval_mcq_letter` of the reply over A-D; any other answer with the
  reply lower-cased, stripped and without trailing periods.
- ``legacy`` (lmms-eval before that commit, the rule of earlier published numbers): the reply through
  :func:`~vila_hd.eval.answers.realworldqa_legacy_prediction`, then the same lower-cased comparison for every answer.
``answer_parser="robust"`` reads multiple-choice replies with :func:`~vila_hd.eval.answers.parse_choice` instead
(short answers keep the rule's comparison).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vila_hd.eval.answers import lmms_eval_mcq_letter, parse_choice, realworldqa_legacy_prediction
from vila_hd.eval.benchmarks.base import Benchmark, FormatError, Sample, decode_image_field, read_parquet, require

RULES = ("current", "legacy")
_OPTION_LINE = re.compile(r"^([A-Z])\.\s+(.*)$", re.M)


class RealWorldQA(Benchmark):
    name = "realworldqa"
    metric = "exact match"
    option_names = ("rule",)
    official_scorer = "lmms-eval realworldqa realworldqa_process_results"

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.rule = self.options.get("rule", "current")
        if self.rule not in RULES:
            raise ValueError(f"realworldqa: rule must be one of {RULES}, got {self.rule!r}")
        self.metric = f"exact match (lmms-eval {self.rule} rule)"

    def _files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        files = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FormatError(f"realworldqa: {self.path} holds no *.parquet files; pass the dataset's data/ folder "
                              "or one of its parquet files")
        return files

    def load(self) -> list[Sample]:
        samples: list[Sample] = []
        for path in self._files():
            for number, row in enumerate(read_parquet(path)):
                samples.append(self._sample(row, len(samples), f"{path} row {number}"))
        return samples

    def _sample(self, row: dict[str, Any], position: int, where: str) -> Sample:
        require(row, ["image", "question", "answer"], where)
        question, answer = str(row["question"]).strip(), str(row["answer"]).strip()
        if not answer:
            raise FormatError(f"{where}: 'answer' is empty")
        # lmms-eval treats an answer A-D as multiple choice whatever the question lists
        is_choice = answer.upper() in ("A", "B", "C", "D")
        options = {m.group(1): m.group(2).strip() for m in _OPTION_LINE.finditer(question)} if is_choice else {}
        if is_choice and not options:
            options = {letter: letter for letter in "ABCD"}  # no option lines to read: the letters alone
        return Sample(id=str(position), images=[decode_image_field(row["image"], where)], prompt=question,
                      question=question, answer=answer.upper() if is_choice else answer,
                      options=options or None, answers=[answer], meta={"answer": answer})

    def score(self, sample: Sample, reply: str) -> dict[str, Any]:
        text = str(reply)
        if self.rule == "legacy":
            parsed = realworldqa_legacy_prediction(text, sample.question)
            rule = "lmms-eval legacy"
        elif sample.is_multiple_choice:
            parsed, rule = lmms_eval_mcq_letter(text, "ABCD"), "lmms-eval mcq_extract"
        else:
            parsed, rule = text, "lmms-eval exact"
        if sample.is_multiple_choice and self.answer_parser == "robust":
            choice = parse_choice(text, sample.options)
            parsed, rule = choice.letter or "", choice.rule
        correct = parsed.lower().strip().rstrip(".") == sample.meta["answer"].lower()
        if sample.is_multiple_choice:  # the letter read, when the prediction is one
            parsed = parsed.strip().upper() if parsed.strip().upper() in ("A", "B", "C", "D") else None
        return {"parsed": parsed, "parse_rule": rule, "score": float(correct), "correct": correct}

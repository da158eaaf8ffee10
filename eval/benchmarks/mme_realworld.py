"""MME-RealWorld (GitHub yfzhang114/MME-RealWorld; HF ``yifanzhang114/MME-RealWorld`` and ``-Base64``).

Two layouts are read:

- ``MME_RealWorld.json``: a list of ``Question_id``, ``Image`` (path relative to the image folder),
  ``Text``, ``Question Type``, ``Answer choices`` (5 strings ``"(A) .."``..``"(E) .."``), ``Ground truth``
  (letter), ``Task`` (Perception / Reasoning), ``Subtask`` (5 domains), ``Category``.
- the Base64 variant (``.tsv`` / ``.parquet`` / ``.json``): ``index``, ``image`` (or ``bytes``; base64),
  ``question``, ``multi-choice options``, ``answer``, ``category`` (``Perception/<domain>``...) and
  ``l2-category``; task = Perception when the category says so, else Reasoning; subtask = the part of
  ``category`` after the last ``/``; category = ``l2-category``.

Prompt (the official one): ``Text`` + `` The choices are listed below: \\n`` + one choice per line + "Select the
best answer to the above multiple-choice question based on the image. Respond with only the letter (A, B, C,
D, or E) of the correct option.\\nThe best answer is:".

Scoring: both rules are computed for every reply and both accuracies are reported.
- ``official``: :func:`~eval.answers.mme_realworld_official_letter` -- the published scorer, quirks included
  (two answer prefixes never removed because of missing commas; the first capital A-E anywhere in the reply,
  so "Based on ..." reads as B; an empty reply matches choice A).
- ``fixed``: our :func:`~eval.answers.parse_choice` (an empty or unreadable reply is wrong).
The headline is ``official`` unless ``--set rule=fixed``. Categories whose name contains "attribute" are
merged into ``<domain>/attribute``, as the official scorer does. Overall accuracy is the micro mean; the summary
also gives accuracy per task, per subtask (within its task) and per category.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from eval.answers import mme_realworld_official_letter, parse_choice
from eval.benchmarks.base import (
    Benchmark,
    FormatError,
    Sample,
    decode_image_field,
    read_records,
    require,
    sample_id,
)
from eval.metrics import accuracy_by, mean

PROMPT_TAIL = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
               "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")
RULES = ("official", "fixed")
_CHOICE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$", re.S)


class MMERealWorld(Benchmark):
    name = "mme-realworld"
    instruction = PROMPT_TAIL
    option_names = ("rule",)

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        rule = self.options.get("rule", "official")
        if rule not in RULES:
            raise ValueError(f"mme-realworld: rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.metric = f"accuracy ({rule} answer extraction)"

    def load(self) -> list[Sample]:
        rows = read_records(self.path)
        image_root = self.image_root or self.path.parent
        return [self._sample(row, image_root, f"{self.path} record {i}") for i, row in enumerate(rows)]

    def _sample(self, row: dict, image_root, where: str) -> Sample:
        if "Question_id" in row:
            require(row, ["Question_id", "Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask",
                          "Category"], where)
            qid, question, choices, answer = row["Question_id"], row["Text"], row["Answer choices"], row["Ground truth"]
            task, subtask, category = row["Task"], row["Subtask"], row["Category"]
            image = str(image_root / row["Image"])
        else:
            require(row, ["index", "question", "multi-choice options", "answer", "category"], where)
            qid, question, choices, answer = row["index"], row["question"], row["multi-choice options"], row["answer"]
            task = "Perception" if "perception" in str(row["category"]).lower() else "Reasoning"
            subtask = str(row["category"]).split("/")[-1]
            category = row.get("l2-category") or subtask
            cell = row.get("image", row.get("bytes"))
            image = decode_image_field(cell, where)
        if isinstance(choices, str):
            choices = [c for c in choices.split("\n") if c.strip()]
        if not isinstance(choices, list) or len(choices) < 2:
            raise FormatError(f"{where}: expected a list of '(A) ...' answer choices, got {choices!r}")
        options = {}
        for choice in choices:
            match = _CHOICE.match(str(choice))
            if not match:
                raise FormatError(f"{where}: answer choice {choice!r} does not start with '(A)'..'(E)'")
            options[match.group(1)] = match.group(2).strip()
        answer = str(answer).strip().strip("()").upper()
        if answer not in options:
            raise FormatError(f"{where}: ground truth {answer!r} is not one of the choices {''.join(options)}")
        category = str(category).lower()
        if "attribute" in category:
            category = category.split("/")[0] + "/attribute"
        prompt = f"{question} The choices are listed below: \n" + "".join(f"{c}\n" for c in choices) + self.instruction
        return Sample(id=sample_id(qid), images=[image], prompt=prompt, question=str(question), answer=answer,
                      options=options, category=category,
                      meta={"task": str(task), "subtask": str(subtask), "choices": [str(c) for c in choices]})

    def score(self, sample: Sample, reply: str) -> dict[str, Any]:
        official = mme_realworld_official_letter(reply, sample.meta["choices"]) or None
        parsed = parse_choice(reply, sample.options)
        correct = {"official": official == sample.answer, "fixed": parsed.letter == sample.answer}
        chosen = correct[self.rule]
        return {"parsed": official if self.rule == "official" else parsed.letter, "parse_rule": parsed.rule,
                "official_letter": official, "fixed_letter": parsed.letter, "correct_official": correct["official"],
                "correct_fixed": correct["fixed"], "score": float(chosen), "correct": chosen}

    def extra_summary(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule}
        for rule in RULES:
            value = mean(float(bool(r.get(f"correct_{rule}"))) for r in records)
            out[f"accuracy_{rule}"] = None if value is None else round(100 * value, 2)
        meta = lambda r, k: r.get("meta", {}).get(k)  # noqa: E731
        out["by_task"] = accuracy_by(records, lambda r: meta(r, "task"))
        out["by_subtask"] = accuracy_by(records, lambda r: f"{meta(r, 'task')}/{meta(r, 'subtask')}")
        out["chose_E"] = sum(r.get("parsed") == "E" for r in records)
        return out

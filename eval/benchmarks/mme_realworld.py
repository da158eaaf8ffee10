"""MME-RealWorld (GitHub yfzhang114/MME-RealWorld; HF ``yifanzhang114/MME-RealWorld`` and ``-Base64``).

Two layouts are read:

- ``MME_RealWorld.json``: a list of ``Question_id``, ``Image`` (path relative to the image folder),
  ``Text``, ``Question Type``, ``Answer choices`` (5 strings ``"(A) .."``..``"(E) .."``), ``Ground truth``
  (letter), ``Task`` (Perception / Reasoning), ``Subtask`` (5 domains), ``Category``.
- the Base64 variant as published (HF ``yifanzhang114/MME-RealWorld-Base64``: a folder ``MME-RealWorld/`` of
  ``*.json`` part files, each a list of records; pass the folder, or the repository root holding it) or one
  such file, or a ``.tsv`` / ``.parquet`` made from them: ``index``, ``image`` (or ``bytes``; base64),
  ``question``, ``multi-choice options`` (a list, or the lines of one string), ``answer``, ``category``
  (``<Task>/<Subtask>``) and ``l2-category`` (the category), read as VLMEvalKit's ``get_dimension_rating``
  reads them. Part files are read in name order.

Prompt (the official one): ``Text`` + `` The choices are listed below: \\n`` + one choice per line + "Select the
best answer to the above multiple-choice question based on the image. Respond with only the letter (A, B, C,
D, or E) of the correct option.\\nThe best answer is:".

Scoring: both rules are computed for every reply and both accuracies are reported.
- ``official``: :func:`~vila_hd.eval.answers.mme_realworld_official_letter` -- the published scorer, quirks included
  (two answer prefixes never removed because of missing commas; the first capital A-E anywhere in the reply,
  so "Based on ..." reads as B; an empty reply matches choice A).
- ``fixed``: our :func:`~vila_hd.eval.answers.parse_choice` (an empty or unreadable reply is wrong).
The headline is ``official`` unless ``--set rule=fixed`` (or ``answer_parser="robust"``). As
``evaluation/eval_your_results.py`` does, categories are lower-cased, those containing "attribute" are merged
into ``<first part>/attribute``, and results are grouped Task -> Subtask -> Category: a category is counted
within its subtask of its task (``by_category`` keys ``Task/Subtask/category``; the same category name under
two subtasks is two rows). Overall accuracy is the micro mean; ``official_report`` nests the three levels
with the official script's counts (``n``, ``accuracy``, ``chose_E``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vila_hd.eval.answers import mme_realworld_official_letter, parse_choice
from vila_hd.eval.benchmarks.base import (
    Benchmark,
    FormatError,
    Sample,
    decode_image_field,
    read_records,
    require,
    sample_id,
)
from vila_hd.eval.metrics import accuracy_by, grouped, mean

PROMPT_TAIL = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
               "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")
RULES = ("official", "fixed")
_CHOICE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$", re.S)


def _meta(record: dict[str, Any], key: str):
    return record.get("meta", {}).get(key)


class MMERealWorld(Benchmark):
    name = "mme-realworld"
    instruction = PROMPT_TAIL
    option_names = ("rule",)

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        default = "official" if self.answer_parser == "official" else "fixed"
        rule = self.options.get("rule", default)
        if rule not in RULES:
            raise ValueError(f"mme-realworld: rule must be one of {RULES}, got {rule!r}")
        if "rule" in self.options and self.answer_parser == "robust" and rule != "fixed":
            raise ValueError("mme-realworld: --answer-parser robust reads replies with the fixed rule; drop "
                             f"--set rule={rule} or the --answer-parser flag")
        self.answer_parser = "official" if rule == "official" else "robust"
        self.rule = rule
        self.metric = f"accuracy ({rule} answer extraction)"

    def load(self) -> list[Sample]:
        image_root = self.image_root or (self.path if self.path.is_dir() else self.path.parent)
        samples = []
        for path in self._files():
            rows = read_records(path)
            samples += [self._sample(row, image_root, f"{path} record {i}") for i, row in enumerate(rows)]
        return samples

    def _files(self) -> list:
        """The data file, or the Base64 distribution's ``*.json`` parts (in name order) in the folder given
        or in its ``MME-RealWorld/`` subfolder."""
        if not self.path.is_dir():
            return [self.path]
        for folder in (self.path, self.path / "MME-RealWorld"):
            parts = sorted(p for p in folder.glob("*.json") if p.is_file())
            if parts:
                return parts
        raise FormatError(f"mme-realworld: {self.path} holds no *.json part files (nor does its MME-RealWorld/ "
                          "folder); pass MME_RealWorld.json or the Base64 distribution's folder")

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
            task, _, subtask = str(row["category"]).partition("/")
            subtask = subtask.split("/")[0]
            if not subtask:
                raise FormatError(f"{where}: 'category' must be '<Task>/<Subtask>', got {row['category']!r}")
            category = row.get("l2-category") or subtask
            cell = row.get("image", row.get("bytes"))
            image = decode_image_field(cell, where)
        if isinstance(choices, str):  # the TSV built from the parts: "The choices are listed below:\n(A) ..."
            choices = [c for c in choices.split("\n") if c.strip() and not c.startswith("The choices are")]
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
                      options=options, category=f"{task}/{subtask}/{category}",
                      meta={"task": str(task), "subtask": str(subtask), "category": category,
                            "choices": [str(c) for c in choices]})

    def score(self, sample: Sample, reply: str) -> dict[str, Any]:
        official = mme_realworld_official_letter(reply, sample.meta["choices"]) or None
        parsed = parse_choice(reply, sample.options)
        correct = {"official": official == sample.answer, "fixed": parsed.letter == sample.answer}
        chosen = correct[self.rule]
        return {"parsed": official if self.rule == "official" else parsed.letter,
                "parse_rule": "official" if self.rule == "official" else parsed.rule,
                "official_letter": official, "fixed_letter": parsed.letter, "correct_official": correct["official"],
                "correct_fixed": correct["fixed"], "score": float(chosen), "correct": chosen}

    def extra_summary(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule}
        for rule in RULES:
            value = mean(float(bool(r.get(f"correct_{rule}"))) for r in records)
            out[f"accuracy_{rule}"] = None if value is None else round(100 * value, 2)
        out["by_task"] = accuracy_by(records, lambda r: _meta(r, "task"))
        out["by_subtask"] = accuracy_by(records, lambda r: f"{_meta(r, 'task')}/{_meta(r, 'subtask')}")
        out["chose_E"] = sum(r.get("parsed") == "E" for r in records)
        out["official_report"] = official_report(records)
        return out


def official_report(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Task -> Subtask -> Category counts and accuracies (percent) as ``eval_your_results.py`` prints them."""
    def level(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
        hits = sum(bool(r.get("correct")) for r in members)
        return {"n": len(members), "accuracy": round(100 * hits / len(members), 2),
                "chose_E": sum(r.get("parsed") == "E" for r in members)}

    report: dict[str, Any] = {}
    for task, in_task in sorted(grouped(records, lambda r: _meta(r, "task")).items()):
        subtasks = {}
        for subtask, in_subtask in sorted(grouped(in_task, lambda r: _meta(r, "subtask")).items()):
            categories = {name: level(members) for name, members in
                          sorted(grouped(in_subtask, lambda r: _meta(r, "category")).items())}
            subtasks[subtask] = {**level(in_subtask), "categories": categories}
        report[task] = {**level(in_task), "subtasks": subtasks}
    return report

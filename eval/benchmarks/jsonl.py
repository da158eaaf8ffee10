"""Our JSONL formats: the 4KPro-style multiple-choice file and the generic multiple-choice / open-answer file.

One JSON object per line (see docs/evaluation.md for the full specification):

``4kpro`` (every field required except ``id``, ``box``):
    {"id": "kp-0001", "image": "images/0001.jpg", "question": "What is the price on the small tag?",
     "options": ["$3.99", "$5.49", "$2.19", "$8.00"], "answer": "B", "category": "household",
     "resolution": "4K", "box": [x1, y1, x2, y2]}

``jsonl`` (generic): the same fields, all optional except ``image``/``images`` and ``question``; a record
with ``options`` is multiple choice (``answer`` = letter or the text of one option), one without is open
(``answer`` string and/or ``answers`` list, scored by ``metric``: ``exact`` (default; EvalAI-normalised exact
match with any answer), ``contains`` or ``vqa``). ``prompt`` replaces the generated prompt.

Image paths are relative to ``--image-root`` (default: the file's folder). ``resolution`` is the resolution
bucket of the summary (for 4KPro: the resolution the question needs, 1K / 2K / 4K); without it the bucket
comes from the image size. Unknown fields are kept in the per-sample output under ``meta``.
"""

from __future__ import annotations

from vila_hd.eval.benchmarks.base import (
    MC_INSTRUCTION,
    SHORT_ANSWER_INSTRUCTION,
    Benchmark,
    FormatError,
    Sample,
    choice_prompt,
    options_from,
    read_jsonl,
    resolve_answer_letter,
)
from vila_hd.eval.metrics import OPEN_METRICS

_KNOWN = {"id", "image", "images", "question", "options", "answer", "answers", "category", "resolution", "prompt",
          "metric", "_line"}


class JsonlBenchmark(Benchmark):
    """The generic multiple-choice / open-answer JSONL."""

    name = "jsonl"
    instruction = MC_INSTRUCTION
    open_instruction = SHORT_ANSWER_INSTRUCTION
    option_names = ("metric",)
    strict = False  # 4KPro-style: multiple choice with category and resolution required

    def load(self) -> list[Sample]:
        image_root = self.image_root or self.path.parent
        default_metric = self.options.get("metric", "exact")
        if default_metric not in OPEN_METRICS:
            raise ValueError(f"{self.name}: metric must be one of {OPEN_METRICS}, got {default_metric!r}")
        return [self._sample(row, image_root, default_metric) for row in read_jsonl(self.path)]

    def _sample(self, row: dict, image_root, default_metric: str) -> Sample:
        where = f"{self.path} line {row['_line']}"
        images = row.get("images", row.get("image"))
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise FormatError(f"{where}: 'image' must be a path (or 'images' a list of paths), got {images!r}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise FormatError(f"{where}: 'question' must be a non-empty string")
        if self.strict:
            missing = [k for k in ("options", "answer", "category", "resolution") if row.get(k) in (None, "")]
            if missing:
                raise FormatError(f"{where}: a 4KPro-style record needs {missing} (see docs/evaluation.md)")
        meta = {k: v for k, v in row.items() if k not in _KNOWN}
        common = dict(id=str(row.get("id", row["_line"])), images=[str(image_root / p) for p in images],
                      question=question, category=_optional_str(row, "category", where),
                      bucket=_optional_str(row, "resolution", where), meta=meta)
        if row.get("options") is not None:
            options = options_from(row["options"], where)
            answer = resolve_answer_letter(row.get("answer"), options, where)
            prompt = row.get("prompt") or choice_prompt(question, options, self.instruction)
            return Sample(prompt=prompt, answer=answer, options=options, **common)
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") is not None else [])
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise FormatError(f"{where}: an open question needs 'answer' (a string) or 'answers' (a list of strings)")
        metric = row.get("metric", default_metric)
        if metric not in OPEN_METRICS:
            raise FormatError(f"{where}: 'metric' must be one of {OPEN_METRICS}, got {metric!r}")
        meta["metric"] = metric
        prompt = row.get("prompt") or f"{question.strip()}\n{self.open_instruction}"
        return Sample(prompt=prompt, answer=answers[0], answers=answers, **common)


class FourKProBenchmark(JsonlBenchmark):
    """4KPro-style multiple-choice JSONL: options, answer, category and required resolution on every line."""

    name = "4kpro"
    strict = True
    option_names = ()


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise FormatError(f"{where}: '{key}' must be a string, got {value!r}")
    return str(value)

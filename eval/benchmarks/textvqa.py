"""TextVQA val, LLaVA-1.5 style.

Files: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question", "image_id", "answers" (10), "question_id", ...}]}``)
with the val images in ``train_images/<image_id>.jpg`` (TextVQA's val images live in the train folder; default
image folder: ``train_images`` next to the JSON, or ``--image-root``).

Prompts: ``question`` + "\\nAnswer the question using a single word or phrase." by default. With
``--set questions=llava_textvqa_val_v051_ocr.jsonl`` the prompts are LLaVA's (``text``, which may carry a
"Reference OCR token: ..." line); LLaVA's ``question_id`` there holds the *image* id, so its lines are joined to
the annotations on (image id, lower-cased question = the first line of ``text``), as LLaVA's scorer does.

Score: VQA soft accuracy (:func:`~vila_hd.eval.metrics.vqa_soft_accuracy`) after the EvalAI normalisation.
"""

from __future__ import annotations

from pathlib import Path

from vila_hd.eval.benchmarks.base import (
    SHORT_ANSWER_INSTRUCTION,
    Benchmark,
    FormatError,
    Sample,
    read_jsonl,
    read_records,
    require,
)


class TextVQA(Benchmark):
    name = "textvqa"
    metric = "VQA soft accuracy"
    instruction = SHORT_ANSWER_INSTRUCTION
    option_names = ("questions",)

    def load(self) -> list[Sample]:
        rows = read_records(self.path)
        image_root = self.image_root or self.path.parent / "train_images"
        prompts = self._llava_prompts()
        samples = []
        for i, row in enumerate(rows):
            where = f"{self.path} record {i}"
            require(row, ["question", "image_id", "answers", "question_id"], where)
            answers = row["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise FormatError(f"{where}: 'answers' must be a non-empty list of strings")
            key = (str(row["image_id"]), row["question"].strip().lower())
            prompt = prompts.pop(key, None) if prompts is not None else None
            if prompt is None:
                if prompts is not None:
                    continue  # LLaVA's question file decides which questions are asked
                prompt = f"{row['question']}\n{self.instruction}"
            samples.append(Sample(
                id=str(row["question_id"]), images=[str(Path(image_root) / f"{row['image_id']}.jpg")], prompt=prompt,
                question=row["question"], answer=answers[0], answers=list(answers), category=None,
                meta={"image_id": str(row["image_id"]), "metric": "vqa"},
            ))
        if prompts:
            (image_id, question), _ = next(iter(prompts.items()))
            raise FormatError(f"textvqa: {len(prompts)} question(s) of {self.options['questions']} have no annotation "
                              f"in {self.path}, e.g. image {image_id!r}: {question!r}")
        return samples

    def _llava_prompts(self) -> dict[tuple[str, str], str] | None:
        path = self.options.get("questions")
        if not path:
            return None
        prompts = {}
        for row in read_jsonl(path):
            where = f"{path} line {row['_line']}"
            require(row, ["question_id", "text"], where)
            question = row["text"].split("\n")[0].strip().lower()
            prompts[(str(row["question_id"]), question)] = row["text"]
        return prompts

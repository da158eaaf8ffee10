"""HR-Bench 4K / 8K (HF ``DreamMr/HR-Bench``).

Files: ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` (or the parquet twins) with the columns ``index``,
``question``, ``A``..``D``, ``answer`` (letter), ``category`` (``single`` = FSP, fine-grained single-instance
perception; ``cross`` = FCP, cross-instance perception), ``cycle_category`` (0-3) and ``image`` (base64 JPEG,
repeated in every row; parquet may hold bytes). Columns are addressed by name. A short all-digit ``image``
cell refers to the row with that ``index`` (the VLMEvalKit convention for repeated images).

Circular evaluation: every question appears 4 times with its options rotated (``cycle_category`` 0-3).
Every row is scored; accuracy is computed per cycle and the reported number is the **mean over the 4 cycles**
(overall and per category), as HR-Bench and lmms-eval report it -- not MMBench's "all four right", which is
given as ``all_cycles_correct`` for reference. Prompt: the question, ``A. ...`` lines, and "Answer the option
letter directly." (lmms-eval).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from typing import Any

from eval.benchmarks.base import (
    Benchmark,
    FormatError,
    Sample,
    choice_prompt,
    decode_image_field,
    read_records,
    require,
    sample_id,
)
from eval.metrics import accuracy_by, grouped, mean, micro_accuracy

CATEGORY_NAMES = {"single": "FSP", "cross": "FCP"}


class HRBench(Benchmark):
    name = "hrbench"
    metric = "mean accuracy over the 4 option cycles"
    instruction = "Answer the option letter directly."

    def load(self) -> list[Sample]:
        rows = read_records(self.path)
        by_index = {sample_id(r.get("index")): r for r in rows}
        cache: dict[str, bytes] = {}  # identical base64 cells decode to one shared bytes object
        samples = []
        for row in rows:
            where = f"{self.path} line {row.get('_line', '?')} (index {row.get('index')})"
            require(row, ["index", "question", "answer", "image"], where)
            options = {c: str(row[c]) for c in string.ascii_uppercase if _present(row.get(c))}
            if len(options) < 2:
                raise FormatError(f"{where}: fewer than 2 option columns (A, B, ...) are filled")
            answer = str(row["answer"]).strip().upper()
            if answer not in options:
                raise FormatError(f"{where}: answer {row['answer']!r} is not one of the options {''.join(options)}")
            cycle = row.get("cycle_category")
            if not _present(cycle):
                raise FormatError(f"{where}: missing 'cycle_category' (0-3); HR-Bench's circular evaluation needs it")
            image = self._image(row, by_index, cache, where)
            samples.append(Sample(
                id=sample_id(row["index"]), images=[image], prompt=choice_prompt(row["question"], options, self.instruction),
                question=str(row["question"]), answer=answer, options=options, category=row.get("category"),
                meta={"cycle_category": int(float(cycle))},
            ))
        return samples

    @staticmethod
    def _image(row: dict, by_index: dict, cache: dict[str, bytes], where: str) -> bytes:
        cell = row["image"]
        seen = set()
        while isinstance(cell, str) and cell.strip().isdigit() and len(cell.strip()) < 16:
            if cell.strip() in seen or cell.strip() not in by_index:
                raise FormatError(f"{where}: the image cell {cell!r} refers to a row index that does not exist")
            seen.add(cell.strip())
            cell = by_index[cell.strip()]["image"]
        data = cell.encode() if isinstance(cell, str) else cell
        key = hashlib.sha1(data).hexdigest() if isinstance(data, bytes) else str(id(cell))
        if key not in cache:
            cache[key] = decode_image_field(cell, where)
        return cache[key]

    def group_accuracy(self, records: Sequence[dict[str, Any]]) -> float | None:
        """Mean over the option cycles of the accuracy within each cycle."""
        cycles = grouped(records, lambda r: r.get("meta", {}).get("cycle_category"))
        return mean(micro_accuracy(members) for members in cycles.values())

    def extra_summary(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        by_cycle = accuracy_by(records, lambda r: r.get("meta", {}).get("cycle_category"))
        consistent = grouped(records, lambda r: (r.get("category"), r.get("question")))
        all_right = mean(float(all(m.get("correct") for m in members)) for members in consistent.values())
        return {
            "by_cycle": by_cycle,
            "categories": {k: CATEGORY_NAMES.get(k, k) for k in sorted({str(r.get("category")) for r in records})},
            "all_cycles_correct": None if all_right is None else round(100 * all_right, 2),
        }


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return False
    return not (isinstance(value, str) and not value.strip())

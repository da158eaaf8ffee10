"""HR-Bench 4K / 8K (HF ``DreamMr/HR-Bench``).

Files: ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` (or the parquet twins) with the columns ``index``,
``question``, ``A``..``D``, ``answer`` (letter), ``category`` (``single`` = FSP, fine-grained single-instance
perception; ``cross`` = FCP, cross-instance perception), ``cycle_category`` (0-3) and ``image`` (base64 JPEG,
repeated in every row; parquet may hold bytes). Columns are addressed by name. A short all-digit ``image``
cell refers to the row with that ``index`` (the VLMEvalKit convention for repeated images).

Scoring reproduces VLMEvalKit's ``HRBenchDataset.evaluate`` with ``exact_matching`` (the HR-Bench authors'
own repository judges with an LLM instead): the letter is read by ``can_infer``
(:func:`~vila_hd.eval.answers.vlmevalkit_can_infer`; ``answer_parser="robust"`` uses our parser), every row is
scored, accuracy is computed within each ``cycle_category`` (``all``, ``single`` = FSP, ``cross`` = FCP) and
the reported number is the **mean over the cycles** (``report_acc_hrbench``: the sum of the per-cycle
accuracies over the number of cycles in the file). Every question appears 4 times with its options
rotated; ``all_cycles_correct`` (right in every rotation, MMBench-style) is given for reference. Prompt:
the question, ``A. ...`` lines, and "Answer the option letter directly." (lmms-eval).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from typing import Any

from vila_hd.eval.answers import vlmevalkit_can_infer
from vila_hd.eval.benchmarks.base import (
    Benchmark,
    FormatError,
    Sample,
    choice_prompt,
    decode_image_field,
    read_records,
    require,
    sample_id,
)
from vila_hd.eval.metrics import accuracy_by, grouped, mean, micro_accuracy

CATEGORY_NAMES = {"single": "FSP", "cross": "FCP"}


class HRBench(Benchmark):
    name = "hrbench"
    metric = "mean accuracy over the 4 option cycles"
    instruction = "Answer the option letter directly."
    official_scorer = "VLMEvalKit HRBenchDataset.evaluate (exact_matching: can_infer, report_acc_hrbench)"

    def official_choice(self, sample: Sample, reply: str) -> tuple[str | None, str]:
        letter = vlmevalkit_can_infer(reply, sample.options or {})
        return (letter if letter in (sample.options or {}) else None), "can_infer"

    def load(self) -> list[Sample]:
        rows = read_records(self.path)
        by_index = {sample_id(r.get("index")): r for r in rows}
        cache: dict[str, bytes] = {}  # identical base64 cells decode to one shared bytes object
        samples = []
        for row in rows:
            index = f" (index {row['index']})" if _present(row.get("index")) else ""
            where = f"{self.path} line {row.get('_line', '?')}{index}"
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
            rotation = (hashlib.sha1(image).hexdigest()[:16], str(row["question"]), tuple(sorted(options.values())))
            samples.append(Sample(
                id=sample_id(row["index"]), images=[image], prompt=choice_prompt(row["question"], options, self.instruction),
                question=str(row["question"]), answer=answer, options=options, category=row.get("category"),
                meta={"cycle_category": int(float(cycle)), "rotation_group": _group_key(rotation)},
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
        rotations = grouped(records, lambda r: r.get("meta", {}).get("rotation_group") or r.get("question"))
        all_right = mean(float(all(m.get("correct") for m in members)) for members in rotations.values())
        return {
            "by_cycle": by_cycle,
            "report_acc_hrbench": report_acc_hrbench(records),
            "categories": {k: CATEGORY_NAMES.get(k, k) for k in sorted({str(r.get("category")) for r in records})},
            "all_cycles_correct": None if all_right is None else round(100 * all_right, 2),
        }


def report_acc_hrbench(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """VLMEvalKit's table (percent): ``{cycle: {"all", "single", "cross"}}`` plus ``"Average"``, in which each
    type's accuracy is summed over the cycles and divided by the number of cycles (a type missing from a
    cycle adds 0 there, as in the official code)."""
    table: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    cycles = grouped(records, lambda r: r.get("meta", {}).get("cycle_category"))
    for cycle, members in sorted(cycles.items()):
        row = {"all": micro_accuracy(members)}
        row.update({str(k): micro_accuracy(v) for k, v in sorted(grouped(members, lambda r: r.get("category")).items(),
                                                                key=lambda kv: str(kv[0]))})
        for kind, value in row.items():
            totals[kind] = totals.get(kind, 0.0) + value
        table[str(cycle)] = {kind: round(100 * value, 2) for kind, value in row.items()}
    if cycles:
        table["Average"] = {kind: round(100 * total / len(cycles), 2) for kind, total in totals.items()}
    return table


def _group_key(rotation: tuple) -> str:
    """A short stable key of (image, question, option set): the rows of one question's rotations."""
    return hashlib.sha1(repr(rotation).encode()).hexdigest()[:16]


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return False
    return not (isinstance(value, str) and not value.strip())

"""``vila-hd data check``: find every sample training would skip, before training.

Each sample goes through the same code as in training (:class:`~train.data.dataset.SampleEncoder`):
record parsing, turn structure, placeholder/image counts, tokenization with assistant labels, length after
image-token expansion, full image decode, box bounds. The report lists each bad sample by dataset, index and
id with its reason (one of :data:`llava_compat.datasets.REASONS`) and gives counts per reason; duplicate ids
are reported as warnings (they are not skipped).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from llava_compat import datasets as ds


@dataclass
class BadSample:
    dataset: str
    index: int
    id: str
    reason: str
    detail: str


@dataclass
class CheckReport:
    samples: dict[str, int] = field(default_factory=dict)  # dataset -> number of samples checked
    bad: list[BadSample] = field(default_factory=list)
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)  # dataset -> ids seen more than once
    lengths_checked: bool = True

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def counts(self) -> Counter:
        return Counter(b.reason for b in self.bad)

    def format(self, show: int | None = None) -> str:
        lines = [f"checked {self.total} sample(s) in {len(self.samples)} dataset(s): "
                 + ", ".join(f"{k} {v}" for k, v in self.samples.items())]
        if not self.lengths_checked:
            lines.append("note: no model/tokenizer given; chat template, labels and lengths were not checked")
        lines.append(f"bad samples: {len(self.bad)}")
        for reason, n in self.counts().most_common():
            lines.append(f"  {reason:<40} {n}")
        for b in self.bad[:show] if show is not None else self.bad:
            lines.append(f"{b.dataset}[{b.index}] id={b.id}: {b.reason}: {b.detail}")
        if show is not None and len(self.bad) > show:
            lines.append(f"... {len(self.bad) - show} more (--show N)")
        for name, ids in self.duplicate_ids.items():
            lines.append(f"warning: {name}: {len(ids)} duplicate id(s), e.g. {ids[:5]}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"samples": self.samples, "counts": dict(self.counts()),
                           "bad": [asdict(b) for b in self.bad], "duplicate_ids": self.duplicate_ids}, indent=2)


def check_sample(source, index: int, encoder=None, load_images: bool = True) -> tuple[str, BadSample | None]:
    """``(id, None)`` for a good sample, ``(id, BadSample)`` otherwise (``dataset`` left empty)."""
    sid = f"#{index}"
    try:
        raw = source[index]
        sid = raw.id
        if encoder is not None:
            encoder.encode_text(raw)
        else:
            ds.check_turns(ds.ensure_placeholders(raw).messages)
        if load_images and raw.images:
            from train.data.dataset import normalized_boxes, open_images

            images = encoder.open_images(raw) if encoder is not None else open_images(raw.images)
            normalized_boxes(raw.boxes, [im.size for im in images])
    except ds.SampleError as err:
        if sid.startswith("#"):  # the record did not parse: take its id straight from the record if it has one
            sid = _record_id(source, index) or sid
        return sid, BadSample("", index, sid, err.reason, err.detail)
    return sid, None


def _record_id(source, index: int) -> str | None:
    try:
        record = source.record(index)
    except Exception:  # noqa: BLE001 - a record that cannot even be read has no id
        return None
    value = record.get("id") if isinstance(record, dict) else None
    return None if value is None else str(value)


def check_sources(sources: dict[str, object], encoder=None, load_images: bool = True, workers: int = 4) -> CheckReport:
    """Check every sample of every source (each dataset once, whatever the mixture repeats)."""
    report = CheckReport(lengths_checked=encoder is not None)
    for name, source in sources.items():
        n = len(source)
        report.samples[name] = n
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            results = list(pool.map(check_sample, [source] * n, range(n), [encoder] * n, [load_images] * n))
        seen: Counter = Counter()
        for sid, bad in results:
            if not sid.startswith("#"):
                seen[sid] += 1
            if bad is not None:
                bad.dataset = name
                report.bad.append(bad)
        dups = [k for k, v in seen.items() if v > 1]
        if dups:
            report.duplicate_ids[name] = dups
    return report

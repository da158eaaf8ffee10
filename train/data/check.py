"""``vila-hd data check``: find every sample training would skip, before training.

Each sample goes through the same code as in training (:class:`~vila_hd.train.data.dataset.SampleEncoder`):
record parsing, turn structure, placeholder/image counts, tokenization with assistant labels, length after
image-token expansion, full image decode, box bounds. The report lists each bad sample by dataset, index and
id with its reason (one of :data:`vila_hd.compat.datasets.REASONS`) and gives counts per reason. Warnings (the
sample is trained on, but maybe not as meant; one of :data:`WARNINGS`) give the index and id too: a duplicate id
(with the index that had it first), an ``<image>`` placeholder inserted because the sample had none, a
multi-image sample, a system turn, and LLaVA roles other than ``human`` / ``gpt`` (accepted here, refused by
LLaVA's and VILA's own loaders).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from vila_hd.compat import datasets as ds


@dataclass
class BadSample:
    dataset: str
    index: int
    id: str
    reason: str
    detail: str


DUPLICATE_ID = "duplicate id"
PLACEHOLDER_INSERTED = "<image> placeholder inserted"
MULTI_IMAGE = "multi-image sample"
SYSTEM_TURN = "system turn"
NON_LLAVA_ROLE = "role other than human/gpt"
WARNINGS = (DUPLICATE_ID, PLACEHOLDER_INSERTED, MULTI_IMAGE, SYSTEM_TURN, NON_LLAVA_ROLE)
LLAVA_ROLES = ("human", "gpt")


@dataclass
class SampleWarning:
    dataset: str
    index: int
    id: str
    kind: str  # one of WARNINGS
    detail: str


@dataclass
class CheckReport:
    samples: dict[str, int] = field(default_factory=dict)  # dataset -> number of samples checked
    bad: list[BadSample] = field(default_factory=list)
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)  # dataset -> ids seen more than once
    warnings: list[SampleWarning] = field(default_factory=list)
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
        if self.warnings:
            lines.append(f"warnings: {len(self.warnings)}")
            for kind, n in Counter(w.kind for w in self.warnings).most_common():
                lines.append(f"  {kind:<40} {n}")
        for w in self.warnings[:show] if show is not None else self.warnings:
            lines.append(f"warning: {w.dataset}[{w.index}] id={w.id}: {w.kind}: {w.detail}")
        if show is not None and len(self.warnings) > show:
            lines.append(f"... {len(self.warnings) - show} more warning(s) (--show N)")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"samples": self.samples, "counts": dict(self.counts()),
                           "bad": [asdict(b) for b in self.bad], "duplicate_ids": self.duplicate_ids,
                           "warnings": [asdict(w) for w in self.warnings]}, indent=2)


def check_sample(source, index: int, encoder=None, load_images: bool = True) -> tuple[str, BadSample | None]:
    """``(id, None)`` for a good sample, ``(id, BadSample)`` otherwise (``dataset`` left empty)."""
    sid, bad, _ = _check_parsed(source, index, encoder, load_images, lambda: _safe_record(source, index))
    return sid, bad


def _check_parsed(source, index: int, encoder, load_images: bool, record_of):
    """:func:`check_sample`'s ``(id, bad)`` and the parsed sample (``None`` when it did not parse);
    ``record_of()`` gives the record, asked for only when the sample did not parse."""
    sid, raw = f"#{index}", None
    try:
        raw = source[index]
        sid = raw.id
        if encoder is not None:
            encoder.encode_text(raw)
        else:
            ds.check_turns(ds.ensure_placeholders(raw).messages)
        if load_images and raw.images:
            from vila_hd.train.data.dataset import normalized_boxes, open_images

            images = encoder.open_images(raw) if encoder is not None else open_images(raw.images)
            normalized_boxes(raw.boxes, [im.size for im in images])
    except ds.SampleError as err:
        if sid.startswith("#"):  # the record did not parse: take its id straight from the record if it has one
            sid = _record_id(record_of()) or sid
        return sid, BadSample("", index, sid, err.reason, err.detail), raw
    return sid, None, raw


def sample_warnings(source, index: int) -> list[tuple[str, str]]:
    """``(kind, detail)`` of each warning sample ``index`` raises (none for a sample that does not parse)."""
    try:
        raw = source[index]
    except ds.SampleError:
        return []
    return _warnings_of(raw, _safe_record(source, index))


def _warnings_of(raw, record) -> list[tuple[str, str]]:
    """The warnings of parsed sample ``raw``, whose record (as read, or ``None``) is ``record``."""
    found = []
    if raw.images and not any(ds.IMAGE_TOKEN in m["content"] for m in raw.messages):
        found.append((PLACEHOLDER_INSERTED, f"no {ds.IMAGE_TOKEN} in the text: {len(raw.images)} inserted at "
                      "the start of the first user turn"))
    if len(raw.images) > 1:
        found.append((MULTI_IMAGE, f"{len(raw.images)} images"))
    if any(m["role"] == "system" for m in raw.messages):
        found.append((SYSTEM_TURN, "a system turn (LLaVA-format data usually has none)"))
    turns = record.get("conversations") if isinstance(record, dict) else None
    if isinstance(turns, list):
        roles = sorted({t["from"] for t in turns if isinstance(t, dict) and isinstance(t.get("from"), str)}
                       - {*LLAVA_ROLES, "system"})
        if roles:
            found.append((NON_LLAVA_ROLE, f"'from' {roles}: LLaVA's and VILA's loaders accept only human/gpt"))
    return found


def _safe_record(source, index: int):
    """``source.record(index)``, or ``None`` for a record that cannot even be read."""
    try:
        return source.record(index)
    except Exception:  # noqa: BLE001 - a record that cannot be read has no id and no roles to report
        return None


def _check_one(source, index: int, encoder, load_images: bool):
    """One sample, parsed once and its record read once: ``(id, bad or None, warnings)``."""
    record = _safe_record(source, index)
    sid, bad, raw = _check_parsed(source, index, encoder, load_images, lambda: record)
    return sid, bad, [] if raw is None else _warnings_of(raw, record)


def _record_id(record) -> str | None:
    value = record.get("id") if isinstance(record, dict) else None
    return None if value is None else str(value)


def check_sources(sources: dict[str, object], encoder=None, load_images: bool = True, workers: int = 4) -> CheckReport:
    """Check every sample of every source (each dataset once, whatever the mixture repeats)."""
    report = CheckReport(lengths_checked=encoder is not None)
    for name, source in sources.items():
        n = len(source)
        report.samples[name] = n
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            results = list(pool.map(_check_one, [source] * n, range(n), [encoder] * n, [load_images] * n))
        first: dict[str, int] = {}
        dups: dict[str, None] = {}
        for index, (sid, bad, warnings) in enumerate(results):
            if bad is not None:
                bad.dataset = name
                report.bad.append(bad)
            report.warnings += [SampleWarning(name, index, sid, kind, detail) for kind, detail in warnings]
            if sid.startswith("#"):
                continue
            if sid in first:
                dups[sid] = None
                report.warnings.append(SampleWarning(name, index, sid, DUPLICATE_ID,
                                                     f"also the id of {name}[{first[sid]}]"))
            else:
                first[sid] = index
        if dups:
            report.duplicate_ids[name] = list(dups)
    return report

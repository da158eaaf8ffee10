"""The evaluation loop: run a benchmark through a predictor, one JSON line per sample, then a summary.

    summary = run_benchmark(benchmark, "outputs/eval/vstar", predictor=EnginePredictor(engine),
                            generation={"max_new_tokens": 64, "steps": 6})

Output folder:
    run.json               what identifies the run (benchmark, data, model, generation options, mc mode)
    parts/rank<R>.jsonl    per-sample records as they are produced (one file per process)
    parts/rank<R>.done     written by a process when its share is finished
    samples.jsonl          all records in the benchmark's order (written with the summary)
    summary.json / .md     accuracy overall, per category and per resolution bucket, tokens, latency

Resuming: run the same command again. Records already in ``parts/`` are not recomputed (failed samples are
redone with ``retry_errors``); a record cut off by an interruption is dropped. A folder holding a run with
other settings is refused, so results of different settings never mix (``limit`` may change).

Sharding: under ``torchrun --nproc-per-node N`` every process takes the samples ``i % N == rank`` (rank and
world size from ``torch.distributed`` when initialised, else from the ``RANK`` / ``WORLD_SIZE`` variables
torchrun sets) and writes its own part; the last process to finish merges the parts and writes the summary.
No collective communication is needed, so processes may finish hours apart.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vila_hd.errors import VilaHDError
from vila_hd.eval.benchmarks.base import Benchmark, Sample
from vila_hd.eval.metrics import accuracy_by, mean, percentile, resolution_bucket
from vila_hd.eval.predictor import BatchPredictor, LikelihoodPredictor, Prediction, Predictor

MC_MODES = ("generate", "likelihood")
# Failures of one sample that should not stop a run (a broken image, a prompt too long for the context, an
# out-of-memory on one huge image); they are recorded with the sample and counted in the summary.
SAMPLE_ERRORS = (ValueError, RuntimeError, OSError, KeyError)


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed's when initialised, else torchrun's variables."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_benchmark(
    benchmark: Benchmark,
    output_dir: str | os.PathLike,
    *,
    predictor: Predictor | None = None,
    replies: Mapping[str, str] | None = None,
    generation: Mapping[str, Any] | None = None,
    limit: int | None = None,
    mc_mode: str = "generate",
    retry_errors: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    batch_size: int = 1,
    allow_missing: bool = False,
) -> dict[str, Any] | None:
    """Evaluate ``benchmark`` into ``output_dir`` (see the module docstring) and return the summary, or
    ``None`` when another process of a sharded run will write it.

    Args:
        predictor: the model (:class:`~vila_hd.eval.predictor.Predictor`); or
        replies: saved replies by sample id, scored without a model (re-scoring, planted predictions).
        generation: options passed to the predictor on every call (max_new_tokens, steps / tokens, mode...).
        limit: only the first ``limit`` samples of the benchmark.
        mc_mode: ``generate`` (parse the reply) or ``likelihood`` (the option with the lowest mean loss; the
            predictor must implement ``score_continuations``).
        rank / world_size: this process's shard (default: :func:`distributed_rank_world`).
        run_info: extra settings identifying the run (e.g. the model), stored in ``run.json``.
        batch_size: samples answered per ``predict_batch`` call in generate mode (the predictor must have it;
            a failing batch is redone one sample at a time, so one bad sample fails alone; a batched
            sample's ``latency_s`` is the batch's time over its size). Records are written batch by batch.
        allow_missing: with ``replies``, score questions without a reply as wrong (a failed record, counted as
            ``missing_replies`` in the summary) instead of refusing the run (:class:`MissingRepliesError`).
    """
    if (predictor is None) == (replies is None):
        raise ValueError("give exactly one of predictor (a model) or replies (saved answers by sample id)")
    if mc_mode not in MC_MODES:
        raise ValueError(f"mc_mode must be one of {MC_MODES}, got {mc_mode!r}")
    if mc_mode == "likelihood" and not isinstance(predictor, LikelihoodPredictor):
        raise ValueError("mc_mode 'likelihood' needs a predictor with score_continuations (replies cannot rank options)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if batch_size > 1 and predictor is not None and not isinstance(predictor, BatchPredictor):
        raise ValueError("batch_size > 1 needs a predictor with predict_batch")
    if rank is None or world_size is None:
        rank, world_size = distributed_rank_world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} process(es)")
    samples = benchmark.samples()[:limit] if limit else benchmark.samples()
    if replies is not None and not allow_missing:
        check_replies(samples, replies)

    out = Path(output_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    settings = {**benchmark.settings(), "mc_mode": mc_mode, "generation": dict(generation or {}),
                "replies": replies is not None, **dict(run_info or {})}
    check_settings(out, settings)
    marker = parts / f"rank{rank}.done"
    marker.unlink(missing_ok=True)

    own_part = parts / f"rank{rank}.jsonl"
    clean_part(own_part)
    done = {rid for rid, rec in read_parts(parts).items() if not (retry_errors and "error" in rec)}
    todo = [s for i, s in enumerate(samples) if i % world_size == rank and s.id not in done]

    bar = _progress(len(todo), f"{benchmark.name} [rank {rank}/{world_size}]" if world_size > 1 else benchmark.name,
                    enabled=progress)
    step = batch_size if predictor is not None and mc_mode == "generate" else 1
    with open(own_part, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if len(chunk) > 1:
                records = evaluate_batch(benchmark, chunk, predictor=predictor, generation=generation or {})
            else:
                records = [evaluate_sample(benchmark, chunk[0], predictor=predictor, replies=replies,
                                           generation=generation or {}, mc_mode=mc_mode)]
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    marker.write_text(json.dumps({"world_size": world_size, "samples": len(samples)}))
    if not all_ranks_done(parts, world_size):
        return None
    return write_summary(benchmark, out, samples, settings)


class MissingRepliesError(VilaHDError):
    """Saved replies do not cover every question of the run."""


def check_replies(samples: Sequence[Sample], replies: Mapping[str, str]) -> None:
    """Refuse replies that leave questions unanswered (the message counts them and names the first few)."""
    missing = [s.id for s in samples if s.id not in replies]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise MissingRepliesError(f"{len(missing)} of {len(samples)} questions have no saved reply ({shown}); check "
                                  "that the replies file is of this benchmark, or pass --allow-missing to score "
                                  "them as wrong")


def evaluate_batch(benchmark: Benchmark, samples: Sequence[Sample], *, predictor: BatchPredictor,
                   generation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run and score samples with one ``predict_batch`` call (generate mode). A sample whose images fail to load
    fails alone; if the batch itself fails, every sample is redone alone, so the error lands on its culprit."""
    records, ready = [], []
    for sample in samples:
        record = _new_record(sample)
        try:
            ready.append((record, sample, _load_images(record, sample, load=True)))
        except SAMPLE_ERRORS as err:
            _failed(record, sample, err)
        records.append(record)
    if not ready:
        return records
    try:
        start = time.perf_counter()
        predictions = predictor.predict_batch([(images, sample.prompt) for _, sample, images in ready], generation)
        spent = (time.perf_counter() - start) / len(ready)
    except SAMPLE_ERRORS:
        return [evaluate_sample(benchmark, sample, predictor=predictor, replies=None, generation=generation,
                                mc_mode="generate") for sample in samples]
    for (record, sample, _), prediction in zip(ready, predictions):
        if prediction.latency_s is None:
            prediction.latency_s = spent
        _scored(benchmark, record, sample, prediction)
    return records


def _new_record(sample: Sample) -> dict[str, Any]:
    return {"id": sample.id, "question": sample.question, "options": sample.options, "answer": sample.answer,
            "category": sample.category, "bucket": sample.bucket}


def _load_images(record: dict[str, Any], sample: Sample, load: bool) -> list[Any]:
    """The sample's images (decoded when ``load``); notes the first one's size and resolution bucket."""
    images, sizes = _images(sample, load=load)
    record["image_size"] = sizes[0] if sizes else None
    if record["bucket"] is None and sizes:
        record["bucket"] = resolution_bucket(*sizes[0])
    return images


def _failed(record: dict[str, Any], sample: Sample, err: Exception) -> dict[str, Any]:
    record.update(prediction=None, parsed=None, correct=False, score=0.0, error=f"{type(err).__name__}: {err}")
    record.update(meta=sample.meta, time=time.time())
    return record


def _scored(benchmark: Benchmark, record: dict[str, Any], sample: Sample, prediction: Prediction) -> dict[str, Any]:
    record.update(prediction=prediction.text, image_tokens=prediction.image_tokens,
                  selected_pct=prediction.selected_pct,
                  latency_s=None if prediction.latency_s is None else round(prediction.latency_s, 4))
    if prediction.extra:
        record["stats"] = prediction.extra
    record.update(benchmark.score(sample, prediction.text))
    record.update(meta=sample.meta, time=time.time())
    return record


def evaluate_sample(benchmark: Benchmark, sample: Sample, *, predictor: Predictor | None,
                    replies: Mapping[str, str] | None, generation: Mapping[str, Any], mc_mode: str) -> dict[str, Any]:
    """Run and score one sample; a failure becomes a record with ``error`` (score 0)."""
    record = _new_record(sample)
    try:
        images = _load_images(record, sample, load=predictor is not None)
        if replies is not None:
            if sample.id not in replies:
                record["missing_reply"] = True
                raise KeyError(f"no saved reply for sample {sample.id!r}")
            prediction = Prediction(str(replies[sample.id]))
        elif mc_mode == "likelihood" and sample.is_multiple_choice:
            prediction = _choose_by_likelihood(predictor, images, sample, generation)
        else:
            start = time.perf_counter()
            prediction = predictor(images, sample.prompt, generation)
            if prediction.latency_s is None:
                prediction.latency_s = time.perf_counter() - start
    except SAMPLE_ERRORS as err:
        return _failed(record, sample, err)
    return _scored(benchmark, record, sample, prediction)


def _choose_by_likelihood(predictor, images, sample: Sample, generation: Mapping[str, Any]) -> Prediction:
    start = time.perf_counter()
    letters = list(sample.options)
    losses = predictor.score_continuations(images, sample.question, [sample.options[k] for k in letters], generation)
    best = min(range(len(letters)), key=lambda i: losses[i])
    extra = {"option_losses": {k: round(v, 5) for k, v in zip(letters, losses)}}
    tokens = getattr(predictor, "last_image_tokens", None)
    return Prediction(letters[best], image_tokens=tokens, latency_s=time.perf_counter() - start, extra=extra)


def _images(sample: Sample, load: bool) -> tuple[list[Any], list[list[int]]]:
    """The sample's images (decoded, when ``load``) and their ``[width, height]``."""
    import io

    from PIL import Image

    from vila_hd.images import load_image

    if load:
        images = [load_image(src) for src in sample.images]
        return images, [list(im.size) for im in images]
    sizes = []
    for src in sample.images:  # the header is enough for the size
        if isinstance(src, Image.Image):
            sizes.append(list(src.size))
            continue
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                sizes.append(list(im.size))
        except (OSError, ValueError):
            return [], []  # replies are scored without images; a missing image only loses the bucket
    return [], sizes


# --- resume / merge ---------------------------------------------------------------------------------------
def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``run.json``, or refuse a folder whose run had other settings."""
    path = out / "run.json"
    comparable = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (previous.get(k), comparable.get(k)) for k in set(previous) | set(comparable)
                if previous.get(k) != comparable.get(k)}
        if diff:
            lines = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
            raise ValueError(f"{out} holds a run with other settings ({lines}); use another output folder, or "
                             "delete it to start over")
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(comparable, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def clean_part(path: Path) -> None:
    """Drop lines that do not parse (a record cut off by an interruption) so appending stays valid."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if isinstance(json.loads(line), dict) and line.endswith("\n"):
                keep.append(line)
        except json.JSONDecodeError:
            pass
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


def read_parts(parts: Path) -> dict[str, dict[str, Any]]:
    """The latest record of every sample id over all part files (unparsable lines skipped)."""
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted(parts.glob("rank*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "id" not in record:
                    continue
                rid = str(record["id"])
                if rid not in latest or record.get("time", 0) >= latest[rid].get("time", 0):
                    latest[rid] = record
    return latest


def all_ranks_done(parts: Path, world_size: int) -> bool:
    for r in range(world_size):
        marker = parts / f"rank{r}.done"
        try:
            if json.loads(marker.read_text()).get("world_size") != world_size:
                return False
        except (OSError, json.JSONDecodeError):
            return False
    return True


def write_summary(benchmark: Benchmark, out: Path, samples: Sequence[Sample], settings: dict[str, Any]) -> dict:
    """Merge the parts into ``samples.jsonl`` (benchmark order) and write ``summary.json`` / ``summary.md``."""
    latest = read_parts(out / "parts")
    records = [latest[s.id] for s in samples if s.id in latest]
    _atomic_write(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = summarize(benchmark, records, settings, expected=len(samples))
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / "summary.md", summary_markdown(summary))
    return summary


def summarize(benchmark: Benchmark, records: Sequence[dict[str, Any]], settings: Mapping[str, Any] | None = None,
              expected: int | None = None) -> dict[str, Any]:
    """Accuracy (the benchmark's own aggregate, in percent) overall, per category and per resolution bucket;
    unparsed rate of multiple-choice replies; mean visual tokens and selected share; latency percentiles."""
    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    choice = [r for r in records if r.get("options") and "error" not in r]
    unparsed = [r for r in choice if r.get("parsed") is None]
    latencies = [r["latency_s"] for r in records if r.get("latency_s") is not None]
    summary = {
        "benchmark": benchmark.name,
        "metric": benchmark.metric,
        "n": len(records),
        "expected": expected if expected is not None else len(records),
        "errors": sum("error" in r for r in records),
        "accuracy": pct(benchmark.group_accuracy(records)) if records else None,
        "unparsed_rate": round(100 * len(unparsed) / len(choice), 2) if choice else None,
        "by_category": accuracy_by(records, lambda r: r.get("category"), benchmark.group_accuracy),
        "by_bucket": accuracy_by(records, lambda r: r.get("bucket"), benchmark.group_accuracy),
        "image_tokens_mean": _round(mean(r.get("image_tokens") for r in records), 1),
        "selected_pct_mean": _round(mean(r.get("selected_pct") for r in records), 2),
        "latency_s": {"p50": _round(percentile(latencies, 50), 4), "p95": _round(percentile(latencies, 95), 4),
                      "mean": _round(mean(latencies), 4)},
        "parse_rules": _count(r.get("parse_rule") for r in choice),
    }
    if settings is not None and settings.get("replies"):
        summary["missing_replies"] = sum(bool(r.get("missing_reply")) for r in records)
    summary["answer_parser"] = getattr(benchmark, "answer_parser", None)
    summary["official_scorer"] = getattr(benchmark, "official_scorer", None)
    summary.update(benchmark.extra_summary(records))
    if settings is not None:
        summary["settings"] = dict(settings)
    return summary


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables."""
    fmt = lambda v, unit="": "-" if v is None else f"{v}{unit}"  # noqa: E731
    latency = summary.get("latency_s", {})
    lines = [
        f"# {summary['benchmark']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| {summary['metric']} | {fmt(summary['accuracy'])} |",
        f"| samples | {summary['n']} of {summary['expected']} ({summary['errors']} failed) |",
        f"| unparsed multiple-choice replies | {fmt(summary['unparsed_rate'], '%')} |",
        f"| mean LLM visual tokens | {fmt(summary['image_tokens_mean'])} |",
        f"| mean selected high-res patches | {fmt(summary['selected_pct_mean'], '%')} |",
        f"| latency p50 / p95 | {fmt(latency.get('p50'), ' s')} / {fmt(latency.get('p95'), ' s')} |",
    ]
    for extra in ("answer_parser", "missing_replies", "accuracy_official", "accuracy_fixed", "all_cycles_correct"):
        if extra in summary:
            lines.append(f"| {extra.replace('_', ' ')} | {fmt(summary[extra])} |")
    for key, title in (("by_category", "category"), ("by_bucket", "resolution bucket"), ("by_cycle", "option cycle"),
                       ("by_task", "task"), ("by_subtask", "subtask")):
        table = summary.get(key)
        if table:
            lines += ["", f"| {title} | n | accuracy |", "|---|---|---|"]
            lines += [f"| {name} | {row['n']} | {fmt(row['accuracy'])} |" for name, row in table.items()]
    return "\n".join(lines) + "\n"


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items()))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="sample")

"""Answer a JSONL file of questions in batches, resumably.

    vila-hd infer --model DIR_OR_HUB_ID --input questions.jsonl --output answers.jsonl [--batch-size 8]

Each input line: {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (or "images": [...]), "question": "..."}
(id defaults to the line number, images are optional and relative paths are read from --image-root,
default the input file's folder; without <image> placeholders in the question the images go first).

Each output line: {"id", "question", "images", "answer", "stats"}, or {"id", ..., "error"} for an item
that failed (a broken image, a question too long for the context...): the run goes on. Run the same command
again to resume: ids already in the output are skipped (--retry-errors redoes the failed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vila_hd.arguments import Command, guarded, positive_int
from vila_hd.errors import FileFormatError
from vila_hd.images import ImageLoadError
from vila_hd.serve.arguments import add_generation_arguments, add_limit_arguments, add_model_arguments, load_engine

if TYPE_CHECKING:  # the engine (torch) is imported when the command runs: `vila-hd --help` stays fast
    from vila_hd.engine import Conversation, Engine, GenerationOptions


@dataclass
class Item:
    id: Any
    line: int
    question: str | None = None
    images: list[str] = field(default_factory=list)
    error: str | None = None  # the input line itself is unusable

    @property
    def key(self) -> str:
        return json.dumps(self.id)


def read_items(path: str | os.PathLike) -> list[Item]:
    """Parse the input JSONL; a malformed line becomes an item carrying its error. Duplicate ids are refused."""
    items, seen = [], {}
    for number, text in enumerate(_text_lines(path), start=1):
        if not text.strip():
            continue
        item = _parse_line(text, number)
        if item.key in seen:
            raise ValueError(
                f"{path}: id {item.id!r} appears on lines {seen[item.key]} and {number}; ids must be "
                "unique for resuming to work"
            )
        seen[item.key] = number
        items.append(item)
    return items


def _text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of input file ``path``; a file that is not UTF-8 text (an image) is named."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError:
        raise FileFormatError(f"input {os.fspath(path)} is not UTF-8 text (a binary file?); expected JSON lines "
                              "(one request object a line)") from None


def _parse_line(text: str, number: int) -> Item:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return Item(id=number, line=number, error=f"line {number} is not valid JSON: {err}")
    if not isinstance(record, dict):
        return Item(id=number, line=number, error=f"line {number} is not a JSON object")
    item = Item(id=record.get("id", number), line=number)
    question = next((record[k] for k in ("question", "text", "prompt") if k in record), None)
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(question, str):
        item.error = f"line {number} has no 'question' string"
    elif not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        item.error = f"line {number}: 'image' / 'images' must be a path or a list of paths"
    else:
        item.question, item.images = question, images
    return item


def read_done(path: str | os.PathLike, retry_errors: bool = False) -> set[str]:
    """Ids (as JSON keys) already answered in ``path``. Lines that do not parse (a run killed mid-write) are
    dropped, and so are error lines with ``retry_errors``; the file is rewritten only when that changes it."""
    if not os.path.exists(path):
        return set()
    keep, done, changed = [], set(), False
    with open(path, encoding="utf-8") as f:
        for text in f:
            try:
                record = json.loads(text)
                key = json.dumps(record["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                changed = True
                continue
            if retry_errors and "error" in record:
                changed = True
                continue
            keep.append(text if text.endswith("\n") else text + "\n")
            changed |= not text.endswith("\n")
            done.add(key)
    if changed:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return done


def _batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def plan(
    input_path: str | os.PathLike, output_path: str | os.PathLike, retry_errors: bool = False
) -> tuple[list[Item], dict[str, int]]:
    """The items of ``input_path`` not yet in ``output_path``, and the run's counts before any is answered."""
    items = read_items(input_path)
    done = read_done(output_path, retry_errors)
    todo = [item for item in items if item.key not in done]
    return todo, {"total": len(items), "skipped": len(items) - len(todo), "answered": 0, "errors": 0}


def infer(
    engine: Engine,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    options: GenerationOptions | None = None,
    image_root: str | os.PathLike | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Answer every item of ``input_path`` not yet in ``output_path`` (appending to it).

    Returns counts: ``total`` items, ``skipped`` (already done), ``answered``, ``errors``."""
    from tqdm.auto import tqdm

    todo, counts = plan(input_path, output_path, retry_errors)
    root = Path(image_root) if image_root is not None else Path(input_path).resolve().parent
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with (
        open(output_path, "a", encoding="utf-8") as out,
        tqdm(total=len(todo), desc="infer", unit="item", disable=not progress, file=sys.stderr) as bar,
    ):
        for batch in _batches(todo, batch_size):
            for record in _answer_batch(engine, batch, root, options):
                counts["errors" if "error" in record else "answered"] += 1
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    return counts


def _answer_batch(engine: Engine, batch: list[Item], root: Path, options) -> list[dict]:
    records: dict[int, dict] = {}
    ready: list[tuple[int, Conversation]] = []
    for i, item in enumerate(batch):
        base = {"id": item.id, "question": item.question, "images": item.images}
        if item.error:
            records[i] = {**base, "error": item.error}
            continue
        try:
            ready.append((i, engine.single_turn([root / p for p in item.images], item.question)))
        except (ImageLoadError, ValueError) as err:
            records[i] = {**base, "error": str(err)}
    for i, result in _generate(engine, ready, options):
        item = batch[i]
        base = {"id": item.id, "question": item.question, "images": item.images}
        if isinstance(result, Exception):
            records[i] = {**base, "error": f"{type(result).__name__}: {result}"}
        else:
            records[i] = {**base, "answer": result.text, "stats": result.stats.to_dict()}
    return [records[i] for i in range(len(batch))]


def _generate(engine: Engine, ready: list[tuple[int, Conversation]], options):
    """Answer the batch at once; if that fails, one by one so that only the culprit gets the error."""
    if not ready:
        return []
    try:
        results = engine.generate_batch([conv for _, conv in ready], options)
        return [(i, r) for (i, _), r in zip(ready, results)]
    except (ValueError, RuntimeError) as err:
        if len(ready) == 1:
            return [(ready[0][0], err)]
    out = []
    for i, conv in ready:
        try:
            out.append((i, engine.generate(conv, options)))
        except (ValueError, RuntimeError) as err:
            out.append((i, err))
    return out


# --- the command ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="JSONL", help="questions, one JSON object per line")
    parser.add_argument(
        "--output", required=True, metavar="JSONL", help="answers (appended; ids already there are skipped)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="questions per generate call (default: %(default)s)",
    )
    parser.add_argument(
        "--image-root", metavar="DIR", help="folder of relative image paths (default: the input file's folder)"
    )
    parser.add_argument(
        "--retry-errors", action="store_true", help="redo the ids whose earlier attempt recorded an error"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_limit_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vila-hd infer``."""
    prog = "vila-hd infer"
    if not os.path.isfile(args.input):
        print(f"{prog}: error: input file {args.input} does not exist", file=sys.stderr)
        return 1
    try:
        todo, counts = plan(args.input, args.output, args.retry_errors)  # bad ids fail before loading a model
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not todo:  # every item answered: no model to load
        print(_summary(counts, args.output), file=sys.stderr)
        return 0
    engine = load_engine(args, prog, image_cache_size=0)
    if engine is None:
        return 1
    counts = infer(
        engine,
        args.input,
        args.output,
        batch_size=args.batch_size,
        image_root=args.image_root,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
    )
    print(_summary(counts, args.output), file=sys.stderr)
    return 0


def _summary(counts: dict[str, int], output: str) -> str:
    return (f"{counts['answered']} answered, {counts['errors']} errors, {counts['skipped']} already done "
            f"(of {counts['total']}); answers in {output}")


INFER = Command(
    "infer",
    help="batched answers for a JSONL of {id, image(s), question}; resumable, per-item errors recorded",
    add_arguments=add_arguments,
    run=run,
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)

if __name__ == "__main__":
    sys.exit(guarded(INFER.main))

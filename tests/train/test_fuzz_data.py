"""Data-file fuzzing: malformed JSON / JSONL / parquet records, wrong types, missing keys, non-UTF-8 text, lone
surrogates, placeholder / image mismatches, absolute paths and ``..`` escapes, symlink loops, FIFOs.

The properties:
- ``data check`` reports every bad record with a reason from ``vila_hd.compat.datasets.REASONS`` and never crashes;
- training's dataset skips exactly the records ``data check`` reports, with the same reason, and never raises;
- a short training run on a file of planted bad records finishes and its skip counters equal the planted counts.

The default run fuzzes a few hundred records; ``pytest --reliability-full`` (``python -m tests.reliability``) fuzzes
thousands. The counts go to docs/reliability.md.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vila_hd.builder import build_tiny_processor
from vila_hd.compat import datasets as ds
from vila_hd.train.data.check import check_sample, check_sources
from vila_hd.train.data.dataset import EncodedSample, SampleEncoder, SkippedSample, TrainingDataset

GOOD_TURNS = [{"from": "human", "value": "<image>\nWhat color is the car?"}, {"from": "gpt", "value": "Red."}]


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(build_tiny_processor("tiny"), 512, {"num_look_close": 2})


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media folder with good and bad images, and a secret file next to it (outside)."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "media"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    os.symlink(folder / "loop.png", folder / "loop.png")  # a symlink loop
    os.symlink(folder / "gone.png", folder / "dangling.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.png")
    Image.new("RGB", (20, 20)).save(root / "secret.png")  # outside the media folder
    os.symlink(root / "secret.png", folder / "out_link.png")  # links in the folder that lead out of it
    os.symlink(root, folder / "out_dir")
    os.symlink(folder / "a.png", folder / "in_link.png")  # a link that stays inside
    return str(folder)


def agree(source, index: int, encoder, dataset) -> str | None:
    """Check and training see the same thing for record ``index``; returns its reason (None: good)."""
    _, bad = check_sample(source, index, encoder, True)
    item = dataset[index]
    if bad is None:
        assert isinstance(item, EncodedSample), (index, item)
        assert item.input_ids.numel() > 0 and item.num_targets > 0
        return None
    assert bad.reason in ds.REASONS, bad
    assert isinstance(item, SkippedSample) and item.reason == bad.reason, (index, bad, item)
    assert bad.detail and item.detail
    return bad.reason


# --- record strategies ----------------------------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8),
                 st.just("<image>"), st.just([]), st.just({}), st.lists(st.integers(), max_size=2))
PATHS = st.sampled_from(["a.png", "b.jpg", "sub/../a.png", "missing.png", "broken.png", "empty.png", "loop.png",
                         "dangling.png", "fifo.png", "sub", "../secret.png", "sub/../../secret.png", "/etc/passwd",
                         "/dev/zero", "", "a.png\x00x", "\udcff.png", "~/a.png", "./a.png", "out_link.png",
                         "out_dir/secret.png", "in_link.png"])
TEXT = st.one_of(st.sampled_from(["What?", "<image>\nWhat?", "<image><image> two", "", "  ", "\udcff lone",
                                  "x " * 3000, "caf\u00e9 \u4e2d\u6587 \U0001f600"]), st.text(min_size=1, max_size=20))
TURN = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "robot"]), "value": TEXT}),
    st.dictionaries(st.sampled_from(["from", "value", "role"]), JUNK, max_size=3),
    JUNK,
)
BOX = st.one_of(st.none(), st.lists(st.one_of(st.integers(-10, 100), st.floats(allow_nan=True), st.text(max_size=2)),
                                    min_size=3, max_size=5), st.just([[1, 1, 5, 5], None]))
GOOD_PATHS = st.sampled_from(["a.png", "b.jpg", "sub/../a.png"])
GOOD_TEXT = st.sampled_from(["What color is the car?", "Describe the picture.", "Red.", "A blue square."])


@st.composite
def llava_records(draw):
    """A valid record (0-2 images, 1-3 exchanges) with 0-2 of the faults real files hold."""
    paths = draw(st.lists(st.one_of(GOOD_PATHS, GOOD_PATHS, PATHS), max_size=2))
    placeholders = len(paths) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
    turns = []
    for k in range(draw(st.integers(1, 3))):
        text = draw(st.one_of(GOOD_TEXT, GOOD_TEXT, GOOD_TEXT, TEXT))
        if k == 0 and placeholders > 0:
            text = "<image>\n" * placeholders + text
        turns += [{"from": "human", "value": text},
                  {"from": "gpt", "value": draw(st.one_of(GOOD_TEXT, GOOD_TEXT, GOOD_TEXT, TEXT))}]
    record = {"id": draw(st.one_of(st.text(max_size=5), st.integers())), "conversations": turns}
    if paths:
        record["image"] = paths[0] if len(paths) == 1 and draw(st.booleans()) else paths
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        fault = draw(st.sampled_from(["turn", "drop_key", "junk_key", "end_on_human", "swap", "box", "system"]))
        if fault == "turn":
            turns[draw(st.integers(0, len(turns) - 1))] = draw(TURN)
        elif fault == "drop_key":
            record.pop(draw(st.sampled_from(sorted(record))))
        elif fault == "junk_key":
            record[draw(st.sampled_from(["id", "image", "conversations", "box"]))] = draw(JUNK)
        elif fault == "end_on_human":
            del turns[-1]
        elif fault == "swap":
            turns.reverse()
        elif fault == "box":
            record["box"] = draw(BOX)
        else:
            turns.insert(draw(st.integers(0, len(turns))), {"from": "system", "value": "Be brief."})
    return record


RECORD = st.one_of(llava_records(), llava_records(), llava_records(), st.dictionaries(
    st.sampled_from(["id", "image", "images", "conversations", "box", "messages"]), JUNK, max_size=4), JUNK)


def encode_line(record, how: str) -> bytes:
    """One JSONL line: JSON (ASCII escapes, so lone surrogates survive as ``\\udcff``), raw UTF-8 with undecodable
    bytes, or broken JSON."""
    if how == "latin1":
        return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape").replace(b"a", b"\xe9")
    if how == "broken":
        return json.dumps(record)[:-1].encode()
    return json.dumps(record).encode()


def test_fuzzed_llava_jsonl_records(encoder, media, tmp_path, reliability):
    reasons: Counter = Counter()

    @settings(max_examples=reliability.count(150, 2500), deadline=None, database=None,
              derandomize=not reliability.full, suppress_health_check=list(HealthCheck))
    @given(lines=st.lists(st.tuples(RECORD, st.sampled_from(["json"] * 10 + ["latin1", "broken"])), min_size=1,
                          max_size=4))
    def case(lines):
        path = tmp_path / "d.jsonl"
        path.write_bytes(b"\n".join(encode_line(r, how) for r, how in lines) + b"\n")
        source = ds.open_source(ds.make_entry("d", {"path": str(path), "media": media}))
        dataset = TrainingDataset(ds.Mixture([("d", source)], [ds.MixtureTerm("d")]), encoder)
        for i in range(len(source)):
            reasons[agree(source, i, encoder, dataset) or "good"] += 1
        report = check_sources({"d": source}, encoder, workers=2)  # the threaded report agrees too
        assert report.total == len(source) and len(report.bad) == len(source) - sum(
            isinstance(dataset[i], EncodedSample) for i in range(len(source)))

    case()
    assert reasons["good"] and len(reasons) >= 5, reasons
    reliability.add("data", "llava_records", sum(reasons.values()))
    for reason, n in reasons.items():
        reliability.add("data_reasons", reason, n)


MESSAGE_PART = st.one_of(st.fixed_dictionaries({"type": st.just("image")}),
                         st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                         st.dictionaries(st.sampled_from(["type", "text", "image"]), JUNK, max_size=2), JUNK)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                           "content": st.one_of(TEXT, st.lists(MESSAGE_PART, max_size=3))}),
    st.dictionaries(st.sampled_from(["role", "content"]), JUNK, max_size=2), JUNK)
@st.composite
def messages_records(draw):
    """A valid ``messages`` record (typed parts or strings, images by path or bytes) with 0-2 faults."""
    images = draw(st.lists(st.one_of(GOOD_PATHS, GOOD_PATHS, PATHS, st.just({"bytes": b"junk"}),
                                     st.just({"path": "a.png"})), max_size=2))
    placeholders = len(images) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
    text = draw(st.one_of(GOOD_TEXT, GOOD_TEXT, TEXT))
    if draw(st.booleans()):
        user = {"role": "user", "content": [{"type": "image"}] * max(placeholders, 0) + [{"type": "text", "text": text}]}
    else:
        user = {"role": "user", "content": "<image>\n" * max(placeholders, 0) + text}
    messages = [user, {"role": "assistant", "content": draw(st.one_of(GOOD_TEXT, TEXT))}]
    record = {"messages": messages, "images": images, "id": draw(st.text(max_size=4))}
    for _ in range(draw(st.integers(0, 2))):
        fault = draw(st.sampled_from(["message", "part", "drop_key", "junk_key", "box", "end_on_user"]))
        if fault == "message":
            messages[draw(st.integers(0, len(messages) - 1))] = draw(MESSAGE)
        elif fault == "part" and isinstance(messages[0], dict) and isinstance(messages[0].get("content"), list):
            messages[0]["content"] = messages[0]["content"] + [draw(MESSAGE_PART)]
        elif fault == "drop_key" and record:
            record.pop(draw(st.sampled_from(sorted(record))))
        elif fault == "junk_key":
            record[draw(st.sampled_from(["messages", "images", "box"]))] = draw(JUNK)
        elif fault == "box":
            record["box"] = draw(BOX)
        elif fault == "end_on_user" and len(messages) > 1:
            del messages[-1]
    return record


MESSAGES_RECORD = st.one_of(messages_records(), messages_records(), messages_records(), JUNK)


class InMemory:
    """A ``messages`` source over Python records (what MessagesSource hands over once a file is read)."""

    def __init__(self, records, media):
        self.records, self.media = records, media

    def __len__(self):
        return len(self.records)

    def record(self, index):
        return self.records[index]

    def __getitem__(self, index):
        return ds.messages_record_to_sample(self.records[index], index, self.media)


def test_fuzzed_messages_records(encoder, media, reliability):
    reasons: Counter = Counter()

    @settings(max_examples=reliability.count(150, 2500), deadline=None, database=None,
              derandomize=not reliability.full, suppress_health_check=list(HealthCheck))
    @given(records=st.lists(MESSAGES_RECORD, min_size=1, max_size=4))
    def case(records):
        source = InMemory(records, media)
        dataset = TrainingDataset(ds.Mixture([("m", source)], [ds.MixtureTerm("m")]), encoder)
        for i in range(len(source)):
            reasons[agree(source, i, encoder, dataset) or "good"] += 1

    case()
    assert len(reasons) >= 4, reasons
    reliability.add("data", "messages_records", sum(reasons.values()))


# --- named cases ------------------------------------------------------------------------------------------------
PATH_CASES = {
    "a.png": None,
    "sub/../a.png": None,
    "../secret.png": ds.PATH_ESCAPES,
    "sub/../../secret.png": ds.PATH_ESCAPES,
    "/etc/passwd": ds.PATH_ESCAPES,
    "/dev/zero": ds.PATH_ESCAPES,
    "out_link.png": ds.PATH_ESCAPES,  # a symlinked file pointing out of the folder
    "out_dir/secret.png": ds.PATH_ESCAPES,  # through a symlinked folder pointing out of it
    "in_link.png": None,
    "missing.png": ds.MISSING_IMAGE,
    "broken.png": ds.UNREADABLE_IMAGE,
    "empty.png": ds.UNREADABLE_IMAGE,
    "loop.png": ds.UNREADABLE_IMAGE,
    "dangling.png": ds.UNREADABLE_IMAGE,
    "fifo.png": ds.UNREADABLE_IMAGE,
    "sub": ds.UNREADABLE_IMAGE,
    "a.png\x00x": ds.MALFORMED,
}


@pytest.mark.parametrize("image", sorted(PATH_CASES))
def test_image_paths(image, encoder, media, reliability):
    source = InMemory([{"id": "p", "images": [image], "messages": [
        {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]}], media)
    assert agree(source, 0, encoder, dataset_of_encoder(source, encoder)) == PATH_CASES[image]
    if PATH_CASES[image] == ds.PATH_ESCAPES:
        _, bad = check_sample(source, 0, encoder)
        assert "allow_outside_media" in bad.detail and repr(image) in bad.detail
    if image in ("loop.png", "fifo.png"):
        _, bad = check_sample(source, 0, encoder)
        assert {"loop.png": "symbolic links", "fifo.png": "not a regular file"}[image] in bad.detail
    reliability.add("data", "path_cases", 1)


def dataset_of_encoder(source, encoder) -> TrainingDataset:
    return TrainingDataset(ds.Mixture([("d", source)], [ds.MixtureTerm("d")]), encoder)


def test_outside_paths_only_when_the_dataset_allows_them(encoder, media, tmp_path):
    secret = os.path.join(os.path.dirname(media), "secret.png")
    rows = [{"id": "abs", "image": secret, "conversations": GOOD_TURNS},
            {"id": "up", "image": "../secret.png", "conversations": GOOD_TURNS},
            {"id": "link", "image": "out_link.png", "conversations": GOOD_TURNS},
            {"id": "dir", "image": "out_dir/secret.png", "conversations": GOOD_TURNS}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    strict = ds.open_source(ds.make_entry("d", {"path": str(path), "media": media}))
    allowed = ds.open_source(ds.make_entry("d", {"path": str(path), "media": media, "allow_outside_media": True}))
    for i in range(len(rows)):
        assert agree(strict, i, encoder, dataset_of_encoder(strict, encoder)) == ds.PATH_ESCAPES
        assert agree(allowed, i, encoder, dataset_of_encoder(allowed, encoder)) is None
    with pytest.raises(ValueError, match="allow_outside_media must be true or false"):
        ds.make_entry("d", {"path": str(path), "allow_outside_media": "yes"})


def test_non_utf8_files(encoder, media, tmp_path):
    """A JSONL line that is not UTF-8 is one bad record; a JSON document that is not is refused as a whole,
    with a message naming the file."""
    lines = [json.dumps({"id": "ok", "image": "a.png", "conversations": GOOD_TURNS}).encode(),
             '{"id": "latin", "conversations": [{"from": "human", "value": "caf\u00e9"}]}'.encode("latin-1"),
             b"\xff\xfe{\x00", json.dumps({"id": "lone", "conversations": [
                 {"from": "human", "value": "\udcff"}, {"from": "gpt", "value": "x"}]}).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    source = ds.open_source(ds.make_entry("d", {"path": str(path), "media": media}))
    dataset = dataset_of_encoder(source, encoder)
    assert [agree(source, i, encoder, dataset) for i in range(4)] == [None, ds.MALFORMED, ds.MALFORMED, ds.MALFORMED]
    assert "not UTF-8" in check_sample(source, 1, encoder)[1].detail
    assert "not valid Unicode" in check_sample(source, 3, encoder)[1].detail
    document = tmp_path / "d.json"
    document.write_bytes(b'[{"id": "x", "conversations": [{"from": "human", "value": "caf\xe9"}]}]')
    with pytest.raises(ValueError, match=r"d\.json is not a UTF-8 JSON document"):
        ds.open_source(ds.make_entry("d", {"path": str(document), "media": media}))


def test_malformed_parquet_records(encoder, media, tmp_path, reliability):
    datasets = pytest.importorskip("datasets")
    good = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]
    rows = [
        ({"messages": good, "images": ["a.png"]}, None),
        ({"messages": good, "images": []}, ds.PLACEHOLDER_MISMATCH),
        ({"messages": good, "images": ["a.png", "b.jpg"]}, ds.PLACEHOLDER_MISMATCH),
        ({"messages": good[:1], "images": ["a.png"]}, ds.NO_TARGET),
        ({"messages": [good[1], good[0]], "images": ["a.png"]}, ds.MALFORMED),
        ({"messages": [{"role": "robot", "content": "x"}, good[1]], "images": []}, ds.MALFORMED),
        ({"messages": [], "images": []}, ds.EMPTY),
        ({"messages": good, "images": ["../secret.png"]}, ds.PATH_ESCAPES),
        ({"messages": good, "images": ["broken.png"]}, ds.UNREADABLE_IMAGE),
        ({"messages": [{"role": "user", "content": "<image>\n" + "word " * 2000}, good[1]], "images": ["a.png"]},
         ds.TOO_LONG),
    ]
    path = str(tmp_path / "m.parquet")
    datasets.Dataset.from_list([r for r, _ in rows]).to_parquet(path)
    source = ds.open_source(ds.make_entry("m", {"path": path, "media": media, "format": "messages"}))
    dataset = dataset_of_encoder(source, encoder)
    assert [agree(source, i, encoder, dataset) for i in range(len(rows))] == [r for _, r in rows]
    # wrong column types: messages as plain strings, images as numbers
    typed = str(tmp_path / "typed.parquet")
    datasets.Dataset.from_list([{"messages": "hello", "images": [3]}, {"messages": "x", "images": []}]).to_parquet(typed)
    source = ds.open_source(ds.make_entry("t", {"path": typed, "media": media, "format": "messages"}))
    assert [agree(source, i, encoder, dataset_of_encoder(source, encoder)) for i in range(2)] == [ds.MALFORMED] * 2
    reliability.add("data", "parquet_records", len(rows) + 2)


# --- training skips and counts them ------------------------------------------------------------------------------
PLANTED = [
    ({"id": "escape", "image": "../secret.png", "conversations": GOOD_TURNS}, ds.PATH_ESCAPES),
    ({"id": "abs", "image": "/etc/hostname", "conversations": GOOD_TURNS}, ds.PATH_ESCAPES),
    ({"id": "missing", "image": "missing.png", "conversations": GOOD_TURNS}, ds.MISSING_IMAGE),
    ({"id": "broken", "image": "broken.png", "conversations": GOOD_TURNS}, ds.UNREADABLE_IMAGE),
    ({"id": "loop", "image": "loop.png", "conversations": GOOD_TURNS}, ds.UNREADABLE_IMAGE),
    ({"id": "two", "image": ["a.png", "b.jpg"], "conversations": GOOD_TURNS}, ds.PLACEHOLDER_MISMATCH),
    ({"id": "types", "image": "a.png", "conversations": [{"from": ["human"], "value": 3}]}, ds.MALFORMED),
    ({"id": "keys", "image": "a.png"}, ds.EMPTY),
    ({"id": "no-answer", "conversations": GOOD_TURNS[:1], "image": "a.png"}, ds.NO_TARGET),
]


def test_training_skips_and_counts_bad_records(media, tmp_path, reliability):
    pytest.importorskip("deepspeed")
    from train_helpers import losses, stage_dict

    from vila_hd.train.config import stage_from_dict
    from vila_hd.train.stage import run_stage

    good = [{"id": f"g{i}", "image": "a.png" if i % 2 else "b.jpg", "conversations": GOOD_TURNS} for i in range(13)]
    lines = [json.dumps(r).encode() for r in good + [r for r, _ in PLANTED]]
    lines += [b"{broken json", '{"id": "latin", "conversations": []} caf\u00e9'.encode("latin-1")]
    expected = Counter(reason for _, reason in PLANTED) + Counter({ds.MALFORMED: 2})
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    n = len(lines)  # 24 records: one epoch is 6 steps of 4, each record read once
    assert n == 24
    cfg = stage_dict(str(data), str(tmp_path / "run"), max_steps=6, **{"checkpoint.every_steps": 6})
    cfg["data"]["datasets"] = {"toy": {"path": str(data), "media": media}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(stage_from_dict(cfg))
    finally:
        torch.set_num_threads(threads)
    assert sorted(losses(str(tmp_path / "run"))) == [1, 2, 3, 4, 5, 6]
    state = json.load(open(tmp_path / "run" / "checkpoints" / "step_00000006" / "trainer_state.json"))
    assert Counter(state["skipped"]) == expected  # every planted record skipped once, counted by its reason
    # the data check reports the same records
    report = check_sources({"toy": ds.open_source(ds.make_entry("toy", {"path": str(data), "media": media}))},
                           SampleEncoder(build_tiny_processor("tiny"), 512, {"num_look_close": 2}))
    assert report.counts() == expected and report.total == n
    reliability.record("data", "training_planted_bad_records", sum(expected.values()))
    reliability.record("data", "training_skips_counted", sum(expected.values()))


def test_data_check_command(media, tmp_path, capsys):
    from vila_hd.train.cli import data_main

    secret = os.path.join(os.path.dirname(media), "secret.png")
    rows = [{"id": "ok", "image": "a.png", "conversations": GOOD_TURNS},
            {"id": "abs", "image": secret, "conversations": GOOD_TURNS},
            {"id": "up", "image": "../secret.png", "conversations": GOOD_TURNS},
            {"id": "loop", "image": "loop.png", "conversations": GOOD_TURNS},
            {"id": "link", "image": "out_link.png", "conversations": GOOD_TURNS},
            {"id": "dir", "image": "out_dir/secret.png", "conversations": GOOD_TURNS}]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(json.dumps(r) for r in rows) + "\n").encode() + b"\xff\n")
    report = tmp_path / "report.json"
    assert data_main(["check", str(path), "--media", media, "--preset", "tiny", "--json", str(report)]) == 1
    found = {b["id"]: b["reason"] for b in json.loads(report.read_text())["bad"]}
    assert found == {"abs": ds.PATH_ESCAPES, "up": ds.PATH_ESCAPES, "loop": ds.UNREADABLE_IMAGE, "#6": ds.MALFORMED,
                     "link": ds.PATH_ESCAPES, "dir": ds.PATH_ESCAPES}
    assert data_main(["check", str(path), "--media", media, "--preset", "tiny", "--json", str(report),
                      "--allow-outside-media"]) == 1
    assert {b["id"] for b in json.loads(report.read_text())["bad"]} == {"loop", "#6"}
    document = tmp_path / "d.json"
    document.write_bytes(b'[{"id": "x", "conversations": []}\xff]')
    capsys.readouterr()
    assert data_main(["check", str(document), "--media", media]) == 2
    assert "d.json is not a UTF-8 JSON document" in capsys.readouterr().err


def test_without_media_paths_are_relative_to_the_data_file_and_stay_inside(media, tmp_path, monkeypatch):
    """No --media: image paths resolve against the data file's folder (not the current directory) and a ``../``
    escape out of it is refused, also when `data check` runs from that folder; --allow-outside-media lets it in."""
    from vila_hd.train.cli import data_main

    data_dir = os.path.dirname(media)  # holds secret.png, next to the media folder
    rows = [{"id": "ok", "image": "media/a.png", "conversations": GOOD_TURNS},
            {"id": "up", "image": "../data_outside.png", "conversations": GOOD_TURNS},
            {"id": "link", "image": "media/out_link.png", "conversations": GOOD_TURNS}]
    path = os.path.join(data_dir, "nomedia.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    Image.new("RGB", (20, 20)).save(os.path.join(os.path.dirname(data_dir), "data_outside.png"))
    report = tmp_path / "report.json"
    for cwd in (data_dir, tmp_path):  # from the dataset's folder and from elsewhere: the same verdicts
        monkeypatch.chdir(cwd)
        assert data_main(["check", path, "--preset", "tiny", "--json", str(report)]) == 1
        found = {b["id"]: b["reason"] for b in json.loads(report.read_text())["bad"]}
        assert found == {"up": ds.PATH_ESCAPES}, cwd  # out_link.png leads to secret.png: still inside data_dir
    assert data_main(["check", path, "--preset", "tiny", "--json", str(report), "--allow-outside-media"]) == 0
    entry = ds.make_entry("d", {"path": path})
    assert entry.media == data_dir
    with pytest.raises(ds.SampleError, match="outside the media folder") as err:
        ds.open_source(entry)[1]
    assert err.value.reason == ds.PATH_ESCAPES

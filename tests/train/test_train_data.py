"""Training data: assistant-only labels for the shipped chat templates, image expansion, prompt positions,
padding vs packing, and `data check` on a fixture with planted bad samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vila_hd.builder import build_tiny_processor
from vila_hd.compat import datasets as ds
from vila_hd.processing import VilaHDProcessor
from vila_hd.templates import KNOWN_TEMPLATES
from vila_hd.train.data.collate import Collator
from vila_hd.train.data.dataset import IGNORE_INDEX, SampleEncoder, SkippedSample, TrainingDataset
from vila_hd.train.data.packing import pack

LOOK = {"num_look_close": 2}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("tiny")


def _runs(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


CHAT = [{"role": "user", "content": "<image>\nWhat color is the car?"}, {"role": "assistant", "content": "The car is red."},
        {"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "The cat is on the table."}]


@pytest.mark.parametrize("family, end", [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>"), ("vicuna-v1", "<|im_end|>")])
def test_only_assistant_turns_and_their_end_of_turn_carry_labels(processor, family, end):
    proc = VilaHDProcessor(processor.image_processor, processor.tokenizer, processor.layout,
                           chat_template=KNOWN_TEMPLATES[family])
    enc = SampleEncoder(proc, 1024, LOOK)
    sample = enc.encode_text(ds.RawSample("x", CHAT, ["img.png"]))
    runs = [r.strip() for r in _runs(sample.input_ids, sample.labels, proc.tokenizer)]
    assert runs == [f"The car is red.{end}", f"The cat is on the table.{end}"]
    # Nothing of the user turns, the system prompt or the image is trained.
    labelled = proc.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX])
    assert "color" not in labelled and "Where" not in labelled and "<image>" not in labelled


def test_image_expansion_and_prompt_position_match_the_processor(processor):
    enc = SampleEncoder(processor, 1024, LOOK)
    sample = enc.encode_text(ds.RawSample("x", CHAT[:2], ["img.png"]))
    n = processor.num_image_tokens(**LOOK)
    assert int((sample.input_ids == processor.image_token_id).sum()) == n
    # Same ids and prompt position as the inference processor on the same conversation (up to the answer).
    text = processor.apply_chat_template(CHAT[:1], add_generation_prompt=True)
    ref = processor(text=text, images=None if False else [Image.new("RGB", (32, 32))], **LOOK)
    k = ref["input_ids"].shape[1]
    assert torch.equal(sample.input_ids[:k], ref["input_ids"][0])
    assert sample.prompt_positions.tolist() == ref["prompt_positions"].tolist()
    assert (sample.labels[:k] == IGNORE_INDEX).all()


def test_too_long_after_expansion_is_rejected(processor):
    n = processor.num_image_tokens(**LOOK)
    enc = SampleEncoder(processor, n + 10, LOOK)
    with pytest.raises(ds.SampleError) as err:
        enc.encode_text(ds.RawSample("x", CHAT, ["img.png"]))
    assert err.value.reason == ds.TOO_LONG


def test_pack_first_fit_decreasing():
    rows = pack([5, 3, 4, 2, 6], 8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3


def _encoded(processor, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    enc = SampleEncoder(processor, 1024, LOOK)
    samples = [ds.RawSample("a", CHAT[:2], paths[:1], [[2, 2, 20, 20]]),
               ds.RawSample("b", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]),
               ds.RawSample("c", CHAT, paths[1:], [None])]
    return [enc.encode(s, i) for i, s in enumerate(samples)]


def test_collate_padding_and_packing_hold_the_same_tokens(processor, tmp_path):
    items = _encoded(processor, tmp_path)
    size = tuple(processor.image_processor.image_size)
    padded = Collator(processor.tokenizer.pad_token_id, size, 2048)(items)
    packed = Collator(processor.tokenizer.pad_token_id, size, 2048, packing=True)(items)
    assert padded["input_ids"].shape[0] == 3 and packed["input_ids"].shape[0] == 1
    for b in (padded, packed):
        assert b["num_items"]["lm"] == sum(s.num_targets for s in items)
        assert b["num_items"]["selection"] == 1
        assert b["num_placed_images"] == 2 and b["pixel_values"].shape[0] == 2
        assert sorted(b["input_ids"][b["target_ids"] != IGNORE_INDEX].tolist()) != []
    # Packed rows restart positions at every sample; targets never cross a sample boundary.
    pos = packed["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts[:3] == [0, len(items[0].input_ids), len(items[0].input_ids) + len(items[1].input_ids)]
    for s in starts[1:]:
        assert packed["target_ids"][0, s - 1] == IGNORE_INDEX
    # Prompt positions point at the same tokens as in the samples.
    r, c = packed["prompt_index"][1].tolist()
    assert packed["input_ids"][r, c] == items[2].input_ids[items[2].prompt_positions[0]]


def test_batch_without_images_carries_one_unplaced_dummy(processor):
    enc = SampleEncoder(processor, 1024, LOOK)
    item = enc.encode(ds.RawSample("b", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]))
    batch = Collator(0, (448, 448), 1024)([item, SkippedSample(7, "z", ds.MISSING_IMAGE, "gone")])
    assert batch["num_placed_images"] == 0 and batch["pixel_values"].shape == (1, 3, 448, 448)
    assert batch["skipped"] == [(7, "z", ds.MISSING_IMAGE, "gone")]
    empty = Collator(0, (448, 448), 1024)([SkippedSample(1, "q", ds.EMPTY, "")])
    assert empty["num_items"]["lm"] == 0 and empty["input_ids"].shape[0] == 1


# --- data check -------------------------------------------------------------------------------------
def _fixture(tmp_path):
    """A LLaVA JSON with one planted problem per bad sample: (records, {index: reason})."""
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(media / "ok.png")
    (media / "empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(media / "full.jpg", quality=95)
    data = (media / "full.jpg").read_bytes()
    (media / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (media / "notes.png").write_text("not an image")
    qa = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]

    def rec(i, **kw):
        r = {"id": f"s{i}", "image": "ok.png", "conversations": qa}
        r.update(kw)
        return r

    planted = {
        1: (rec(1, image="missing.png"), ds.MISSING_IMAGE),
        2: (rec(2, image="empty.png"), ds.UNREADABLE_IMAGE),
        3: (rec(3, image="truncated.jpg"), ds.UNREADABLE_IMAGE),
        4: (rec(4, image="notes.png"), ds.UNREADABLE_IMAGE),
        5: (rec(5, image="../outside.png"), ds.PATH_ESCAPES),
        6: (rec(6, conversations=[{"from": "human", "value": "<image> <image> two?"}, qa[1]]), ds.PLACEHOLDER_MISMATCH),
        7: (rec(7, conversations=[]), ds.EMPTY),
        8: (rec(8, conversations=[qa[0], {"from": "gpt", "value": 42}]), ds.MALFORMED),
        9: (rec(9, conversations=[qa[0], qa[1], {"from": "human", "value": "and?"}]), ds.MALFORMED),
        10: (rec(10, conversations=[qa[0]]), ds.NO_TARGET),
        11: (rec(11, conversations=[qa[0], {"from": "gpt", "value": "word " * 400}]), ds.TOO_LONG),
        12: (rec(12, box=[10, 10, 5, 5]), ds.BAD_BOX),
        13: (rec(13, box=[100, 100, 120, 120]), ds.BAD_BOX),  # outside the 64x48 image
        14: (rec(14, image=["ok.png", "ok.png"]), ds.PLACEHOLDER_MISMATCH),
    }
    records = []
    for i in range(17):
        if i in planted:
            records.append(planted[i][0])
        elif i == 16:
            records.append(rec(0))  # a duplicate id: a warning, not a bad sample
        else:
            records.append(rec(i, box=[4, 4, 30, 30]) if i == 15 else rec(i))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, media, {i: reason for i, (_, reason) in planted.items()}


def test_data_check_reports_every_planted_bad_sample(tmp_path, capsys):
    from vila_hd.train.cli import data_main

    path, media, planted = _fixture(tmp_path)
    out = tmp_path / "report.json"
    code = data_main(["check", str(path), "--media", str(media), "--preset", "tiny", "--max-length", "300",
                      "--num-look-close", "2", "--json", str(out), "--workers", "2"])
    assert code == 1
    report = json.loads(out.read_text())
    found = {b["index"]: b["reason"] for b in report["bad"]}
    assert found == planted
    assert report["counts"][ds.UNREADABLE_IMAGE] == 3
    assert report["samples"] == {"train.json": 17}
    assert list(report["duplicate_ids"].values()) == [["s0"]]
    text = capsys.readouterr().out
    assert "train.json[1] id=s1: missing image" in text and "bad samples: 14" in text


def test_data_check_of_a_file_names_the_file_in_its_errors(tmp_path, capsys):
    from vila_hd import cli

    path = tmp_path / "mine.json"
    path.write_text('{"id": 1}\n')  # JSON lines under a .json name: not a list
    assert cli.main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"vila-hd data check: error: dataset 'mine.json': {path} must hold a JSON list of samples" in err, err


def test_training_skips_the_same_samples_with_the_same_reasons(tmp_path, processor):
    path, media, planted = _fixture(tmp_path)
    entry = ds.make_entry("train", {"path": str(path), "media": str(media)})
    mixture = ds.build_mixture({"train": entry}, "train")
    dataset = TrainingDataset(mixture, SampleEncoder(processor, 300, LOOK))
    skipped = {i: item.reason for i in range(len(dataset)) if isinstance(item := dataset[i], SkippedSample)}
    assert skipped == planted


def test_data_check_warns_with_index_and_id(tmp_path, capsys):
    """Samples that train, but maybe not as meant: each warning names the record's index and id."""
    from vila_hd.train.cli import data_main
    from vila_hd.train.data import check

    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(media / "a.png")
    answer = {"from": "gpt", "value": "Yes."}
    records = [
        {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nIs it?"}, answer]},
        {"id": "noplace", "image": "a.png", "conversations": [{"from": "human", "value": "Is it?"}, answer]},
        {"id": "two", "image": ["a.png", "a.png"],
         "conversations": [{"from": "human", "value": "<image><image>\nSame?"}, answer]},
        {"id": "sys", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                        answer]},
        {"id": "roles", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "Again?"}, answer]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "report.json"
    code = data_main(["check", str(path), "--media", str(media), "--json", str(out), "--workers", "2"])
    assert code == 0  # warnings do not fail the check
    report = json.loads(out.read_text())
    assert report["bad"] == []
    found = {(w["index"], w["id"], w["kind"]) for w in report["warnings"]}
    assert found == {(1, "noplace", check.PLACEHOLDER_INSERTED), (2, "two", check.MULTI_IMAGE),
                     (3, "sys", check.SYSTEM_TURN), (4, "roles", check.NON_LLAVA_ROLE),
                     (5, "ok", check.DUPLICATE_ID)}
    text = capsys.readouterr().out
    assert "warning: train.json[5] id=ok: duplicate id: also the id of train.json[0]" in text
    assert "warning: train.json[4] id=roles: role other than human/gpt: 'from' ['assistant', 'user']" in text
    assert report["duplicate_ids"] == {"train.json": ["ok"]}

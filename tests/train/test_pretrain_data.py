"""PS3 pre-training data: record parsing, joint image+box crop, GT maps, caption sampling and clean-up."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vila_hd.train.pretrain.data import (
    BoxCaptionDataset,
    RecordError,
    box_maps_for_grids,
    build_caption_cleanup,
    collate_box_caption,
    gt_selection_map,
    parse_record,
    random_resized_crop_with_box,
    read_jsonl,
    sample_crop,
)
from vila_hd.train.pretrain.synthetic import make_records, write_dataset


def fake_tokenizer(texts):
    """Length-8 ids: one id per word (hash mod 50), padded with 0."""
    out = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [1 + hash(w) % 50 for w in text.split()][:8]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# --- records --------------------------------------------------------------------------------------------------------
def test_parse_record_accepts_ours_and_the_references_fields():
    ours = parse_record({"image": "a.jpg", "global_caption": "g", "boxes": [{"box": [1, 2, 3, 4], "caption": "c"}]})
    ref = parse_record({"image": "a.jpg", "global_text": "g", "box": [[1, 2, 3, 4]], "text": ["c"]})
    single = parse_record({"image": "a.jpg", "box": [1, 2, 3, 4], "text": "c"})
    for rec in (ours, ref, single):
        assert rec.boxes[0].box == (1.0, 2.0, 3.0, 4.0) and rec.boxes[0].caption == "c"
    assert ours.global_caption == ref.global_caption == "g" and single.global_caption is None


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"global_caption": "g"}, "missing 'image'"),
        ({"image": "a", "boxes": []}, "neither a global caption"),
        ({"image": "a", "boxes": [{"box": [3, 0, 1, 4], "caption": "c"}]}, r"boxes\[0\].*empty"),
        ({"image": "a", "boxes": [{"box": [0, 0, 1], "caption": "c"}]}, "4 finite numbers"),
        ({"image": "a", "boxes": [{"box": [0, 0, 1, float("nan")], "caption": "c"}]}, "4 finite numbers"),
        ({"image": "a", "boxes": [{"box": [0, 0, 1, 1], "caption": " "}]}, "non-empty string"),
        ({"image": "a", "box": [[0, 0, 1, 1]], "text": ["x", "y"]}, "'box' has 1 entries but 'text' has 2"),
    ],
)
def test_parse_record_errors_name_the_field(raw, match):
    with pytest.raises(RecordError, match=match):
        parse_record(raw, "rec")


def test_read_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"image": "a.png", "global_caption": "g"})
    path.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(RecordError, match=r"d\.jsonl:4: invalid JSON"):
        read_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"image": "b.png", "boxes": [{"box": [0, 0, 0, 1], "caption": "c"}]}))
    with pytest.raises(RecordError, match=r"d\.jsonl:2: boxes\[0\]"):
        read_jsonl(path)


# --- joint transform ------------------------------------------------------------------------------------------------
def test_crop_area_and_ratio_follow_the_settings():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = sample_crop(1000, 700, rng, scale=(0.9, 1.0))
        assert 0 <= left and left + w <= 1000 and 0 <= top and top + h <= 700
        assert 0.9 * 700_000 * 0.99 <= w * h <= 700_000
    assert sample_crop(300, 300, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 300, 300)


@pytest.mark.parametrize("seed", range(6))
def test_box_moves_with_the_image(seed):
    """A red rectangle drawn exactly on the box stays inside the transformed box, and fills its interior."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(300, 600)), int(rng.integers(300, 600))
    x0, y0 = float(rng.integers(20, width // 2)), float(rng.integers(20, height // 2))
    box = (x0, y0, x0 + float(rng.integers(60, width // 2 - 10)), y0 + float(rng.integers(60, height // 2 - 10)))
    array = np.full((height, width, 3), 255, np.uint8)
    array[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = (255, 0, 0)
    out, moved = random_resized_crop_with_box(Image.fromarray(array), box, 224, random.Random(seed), scale=(0.5, 1.0))
    red = np.asarray(out).astype(int)
    red = (red[..., 0] > 200) & (red[..., 1] < 60)
    ys, xs = np.nonzero(red)
    # bicubic ringing spreads at most ~2 output pixels beyond the edge
    assert xs.min() >= moved[0] - 2 and xs.max() <= moved[2] + 2 and ys.min() >= moved[1] - 2 and ys.max() <= moved[3] + 2
    inner = red[int(moved[1]) + 3 : int(moved[3]) - 3, int(moved[0]) + 3 : int(moved[2]) - 3]
    assert inner.size and inner.all()


def test_box_cut_away_by_the_crop_falls_back_to_the_whole_image():
    image = Image.new("RGB", (1000, 1000))
    box = (0.0, 0.0, 3.0, 3.0)  # a corner sliver most crops lose
    for seed in range(30):
        _, moved = random_resized_crop_with_box(image, box, 100, random.Random(seed), scale=(0.2, 0.3))
        assert moved is not None and moved[2] > moved[0] and moved[3] > moved[1]


# --- GT selection maps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, grids",
    [
        ((448, 448), [(16, 16), (32, 32)]),  # common resolution 32
        ((1512, 1512), [(54, 54), (108, 108)]),  # PS3-1.5K
        ((1008, 1512), [(36, 54), (72, 108)]),  # non-square PS3-1.5K
        ((420, 420), [(12, 12), (20, 20)]),  # lcm 60 divides 420
        ((400, 400), [(12, 12), (20, 20)]),  # lcm 60 does not divide 400: full resolution
    ],
)
def test_compact_gt_maps_read_like_full_resolution_ones(hw, grids):
    g = torch.Generator().manual_seed(0)
    h, w = hw
    corners = torch.rand(6, 2, 2, generator=g) * torch.tensor([w, h])
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # a global caption
    boxes[1] = torch.tensor([13.5, 7.2, 14.1, 30.0])  # thinner than a pixel column
    compact = box_maps_for_grids(boxes, hw, grids)
    full = torch.stack([gt_selection_map(b.tolist(), h, w) for b in boxes])
    for grid in grids:
        a = F.interpolate(compact[:, None], size=grid, mode="area")[:, 0] > 0
        b = F.interpolate(full[:, None], size=grid, mode="area")[:, 0] > 0
        assert torch.equal(a, b), grid
    assert compact.shape[-1] <= w


def test_ps3_4k_gt_map_is_small_and_exact():
    hw, grids = (3780, 3780), [(54, 54), (108, 108), (270, 270)]
    boxes = torch.tensor([[100.3, 2000.0, 1234.9, 2100.5], [3000.0, 10.0, 3779.0, 35.0]])
    compact = box_maps_for_grids(boxes, hw, grids)
    assert compact.shape == (2, 540, 540)
    full = torch.stack([gt_selection_map(b.tolist(), *hw) for b in boxes])
    for grid in grids:
        a = F.interpolate(compact[:, None], size=grid, mode="area")[:, 0] > 0
        b = F.interpolate(full[:, None], size=grid, mode="area")[:, 0] > 0
        assert torch.equal(a, b)


# --- dataset --------------------------------------------------------------------------------------------------------
def test_dataset_items_and_global_caption_rate(tmp_path):
    records = make_records(6, seed=0, size=((300, 500), (300, 500)))
    ds = BoxCaptionDataset(records, fake_tokenizer, 224, global_caption_prob=0.25, seed=1)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 224, 224) and item["pixel_values"].dtype == torch.uint8
    assert item["input_ids"].shape == (8,) and item["boxes"].shape == (4,)
    batch = collate_box_caption([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["is_global"].dtype == torch.bool
    # deterministic per (seed, epoch, index); a new epoch draws anew
    assert torch.equal(ds[3]["pixel_values"], ds[3]["pixel_values"])
    draws = []
    for epoch in range(100):
        ds.set_epoch(epoch)
        draws += [bool(ds.choose_caption(ds.records[i], ds.rng_for(i))[1] is None) for i in range(6)]
    assert 0.18 < sum(draws) / len(draws) < 0.32
    never = BoxCaptionDataset(records, fake_tokenizer, 224, global_caption_prob=0.0)
    assert not any(bool(never[i]["is_global"]) for i in range(6))
    only_global = BoxCaptionDataset([{"image": records[0]["image"], "global_caption": "g"}], fake_tokenizer, 224,
                                    global_caption_prob=0.0)
    item = only_global[0]
    assert bool(item["is_global"]) and item["boxes"].tolist() == [0, 0, 224, 224]


def test_dataset_reads_jsonl_and_refuses_escaping_paths(tmp_path):
    path = write_dataset(tmp_path / "data", 2, seed=0, size=(200, 160))
    ds = BoxCaptionDataset(path, fake_tokenizer, 112, image_root=tmp_path / "data")
    assert ds[1]["pixel_values"].shape == (3, 112, 112)
    bad = BoxCaptionDataset([{"image": "../outside.png", "global_caption": "g"}], fake_tokenizer, 112,
                            image_root=tmp_path / "data")
    with pytest.raises(RecordError, match="escapes the image root"):
        bad[0]
    outside = BoxCaptionDataset(
        [{"image": Image.new("RGB", (50, 50)), "boxes": [{"box": [60, 60, 70, 70], "caption": "c"}]}], fake_tokenizer, 112
    )
    with pytest.raises(RecordError, match="outside the 50x50 image"):
        outside[0]
    with pytest.raises(ValueError, match="global_caption_prob"):
        BoxCaptionDataset(path, fake_tokenizer, 112, global_caption_prob=1.5)


def test_dataset_reads_a_datasets_table_lazily():
    datasets = pytest.importorskip("datasets")
    records = make_records(3, seed=0, size=160)
    table = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
    ds = BoxCaptionDataset(table, fake_tokenizer, 112, global_caption_prob=0.0)
    assert len(ds) == 3 and ds[2]["pixel_values"].shape == (3, 112, 112) and not bool(ds[2]["is_global"])
    undecoded = table.cast_column("image", datasets.Image(decode=False))  # cells are {"bytes", "path"}
    raw = BoxCaptionDataset(undecoded, fake_tokenizer, 112, global_caption_prob=0.0)
    assert torch.equal(raw[1]["pixel_values"], ds[1]["pixel_values"])
    bad = datasets.Dataset.from_list([{"image": None, "global_caption": "g"}])
    with pytest.raises(RecordError, match="record 0: missing 'image'"):
        BoxCaptionDataset(bad, fake_tokenizer, 112)[0]


def test_caption_cleanup_hooks():
    cleanup = build_caption_cleanup(["strip_closeup_prefix", "drop_visible_text_sentence", "collapse_whitespace"])
    text = "The image is a close-up of a red sign.  It glows. There is no visible text in the image."
    assert cleanup(text, random.Random(0)) == "a red sign. It glows."
    masked = build_caption_cleanup(["sentence_masking"])
    outs = {masked("A. B. C. D.", random.Random(s)) for s in range(50)}
    assert all(o and set(o.split()) <= {"A.", "B.", "C.", "D."} for o in outs) and len(outs) > 3
    assert build_caption_cleanup([lambda t, rng: t.upper()])("abc", random.Random()) == "ABC"
    with pytest.raises(ValueError, match="unknown caption clean-up 'nope'"):
        build_caption_cleanup(["nope"])

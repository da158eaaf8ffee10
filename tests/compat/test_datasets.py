"""vila_hd.compat.datasets: LLaVA JSON/JSONL, messages datasets, registry YAML, mixtures."""

from __future__ import annotations

import json
import os

import pytest

from vila_hd.compat import datasets as ds


def _write(path, data):
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return str(path)


LLAVA = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
    {"id": "b", "image": ["x.png", "y.png"], "box": [[1, 2, 3, 4], None],
     "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]},
    {"id": "c", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}]},
]


def test_llava_json_and_jsonl_read_the_same(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    js = ds.LlavaSource(ds.make_entry("j", {"path": _write(tmp_path / "d.json", LLAVA), "media": str(media)}))
    jl = ds.LlavaSource(ds.make_entry("l", {"path": _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in LLAVA) + "\n\n"),
                                             "media": str(media)}))
    assert len(js) == len(jl) == 3
    for i in range(3):
        assert js[i] == jl[i]
    b = js[1]
    assert b.images == [str(media / "x.png"), str(media / "y.png")]
    assert b.boxes == [[1.0, 2.0, 3.0, 4.0], None]
    assert [m["role"] for m in js[2].messages] == ["system", "user", "assistant"]
    assert js[2].images == []


def test_missing_placeholders_go_to_the_start_of_the_first_user_turn(tmp_path):
    source = ds.LlavaSource(ds.make_entry("j", {"path": _write(tmp_path / "d.json", LLAVA), "media": str(tmp_path)}))
    fixed = ds.ensure_placeholders(source[1])
    assert fixed.messages[0]["content"] == "<image>\n<image>\nCompare."
    assert ds.ensure_placeholders(source[0]).messages == source[0].messages  # already placed: unchanged
    bad = ds.RawSample("z", [{"role": "user", "content": "<image> <image> Q"}, {"role": "assistant", "content": "A"}],
                       ["one.png"])
    with pytest.raises(ds.SampleError) as err:
        ds.ensure_placeholders(bad)
    assert err.value.reason == ds.PLACEHOLDER_MISMATCH


def test_paths_may_not_escape_the_media_folder(tmp_path):
    rec = {"id": "e", "image": "../secret.png", "conversations": LLAVA[0]["conversations"]}
    with pytest.raises(ds.SampleError) as err:
        ds.llava_record_to_sample(rec, 0, str(tmp_path / "media"))
    assert err.value.reason == ds.PATH_ESCAPES


@pytest.mark.parametrize("record, reason", [
    ({"id": "n", "conversations": []}, ds.EMPTY),
    ({"id": "n", "conversations": [{"from": "human", "value": 3}]}, ds.MALFORMED),
    ({"id": "n", "conversations": [{"from": "robot", "value": "x"}]}, ds.MALFORMED),
    ({"id": "n", "conversations": "hello"}, ds.MALFORMED),
    ({"id": "n", "image": "a.png", "box": [5, 5, 1, 1], "conversations": LLAVA[0]["conversations"]}, ds.BAD_BOX),
])
def test_bad_records_name_their_reason(record, reason):
    with pytest.raises(ds.SampleError) as err:
        ds.llava_record_to_sample(record, 0, None)
    assert err.value.reason == reason


def test_turn_checks():
    user, bot = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    ds.check_turns([user, bot])
    for messages, reason in [([user], ds.NO_TARGET), ([user, bot, user], ds.MALFORMED),
                             ([user, {"role": "assistant", "content": "  "}], ds.MALFORMED),
                             ([user, {"role": "system", "content": "s"}, bot], ds.MALFORMED)]:
        with pytest.raises(ds.SampleError) as err:
            ds.check_turns(messages)
        assert err.value.reason == reason


def test_messages_format_from_json_parquet_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": "m0", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
             "images": ["cat.png"]},
            {"id": "m1", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
             "images": []}]
    jsonl = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "m.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (jsonl, str(tmp_path / "m.parquet"), str(tmp_path / "saved")):
        source = ds.open_source(ds.make_entry("m", {"path": path, "media": str(tmp_path), "format": "messages"}))
        assert len(source) == 2
        s0, s1 = source[0], source[1]
        assert s0.messages[0] == {"role": "user", "content": "<image>What?"}
        assert s0.images == [os.path.join(str(tmp_path), "cat.png")]
        assert s1.images == [] and s1.messages[1]["content"] == "Hello."


def test_registry_paths_are_relative_to_the_registry(tmp_path):
    sub = tmp_path / "reg"
    sub.mkdir()
    _write(sub / "r.yaml", "a: {path: data/a.json, media: img}\nb: {path: /abs/b.parquet}\n")
    reg = ds.load_registry(sub / "r.yaml")
    assert reg["a"].path == str(sub / "data" / "a.json") and reg["a"].media == str(sub / "img")
    assert reg["a"].format == "llava" and reg["b"].format == "messages" and reg["b"].path == "/abs/b.parquet"
    with pytest.raises(ValueError, match="unknown field"):
        ds.make_entry("x", {"path": "p.json", "medai": "typo"})


def test_mixture_parsing():
    terms = ds.parse_mixture("a+b*3+c@0.5+d@0.5*2")
    assert terms == [ds.MixtureTerm("a"), ds.MixtureTerm("b", 3), ds.MixtureTerm("c", 1, 0.5),
                     ds.MixtureTerm("d", 2, 0.5)]
    for bad in ("a+", "a*0", "a@1.5", "a*1.5", "a b"):
        with pytest.raises(ValueError):
            ds.parse_mixture(bad)


def test_mixture_repeats_and_fractions(tmp_path):
    a = [{"id": f"a{i}", "conversations": LLAVA[2]["conversations"]} for i in range(10)]
    b = [{"id": f"b{i}", "conversations": LLAVA[2]["conversations"]} for i in range(4)]
    registry = {"a": ds.make_entry("a", {"path": _write(tmp_path / "a.json", a)}),
                "b": ds.make_entry("b", {"path": _write(tmp_path / "b.json", b)})}
    mix = ds.build_mixture(registry, "a@0.5+b*3", seed=1)
    assert len(mix) == 5 + 12
    ids = [mix[i].id for i in range(len(mix))]
    assert len(set(ids[:5])) == 5 and all(i.startswith("a") for i in ids[:5])
    assert ids[5:] == [f"b{i}" for i in range(4)] * 3
    again = ds.build_mixture(registry, "a@0.5+b*3", seed=1)
    assert [again[i].id for i in range(5)] == ids[:5]  # the fraction is a fixed subset for a seed
    with pytest.raises(KeyError, match="unknown dataset"):
        ds.build_mixture(registry, "a+zzz")

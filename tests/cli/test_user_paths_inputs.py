"""A user's wrong path or wrong file (an image where a checkpoint or a text file belongs) is named in one line,
and nothing is asked of the Hub."""

from __future__ import annotations

import huggingface_hub
import pytest

from vila_hd import hub

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(PNG)
    return path


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    for name in ("snapshot_download", "hf_hub_download", "model_info", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    import transformers.utils.hub as tf_hub

    for name in ("cached_file", "cached_files", "hf_hub_download"):
        if hasattr(tf_hub, name):
            monkeypatch.setattr(tf_hub, name, refuse)


def _loaders():
    from vila_hd.model.modeling import VilaHDForConditionalGeneration
    from vila_hd.processing import VilaHDProcessor
    from vila_hd.ps3.modeling import PS3VisionModel

    return [
        ("VILA-HD checkpoint", VilaHDForConditionalGeneration.from_pretrained),
        ("VILA-HD processor", VilaHDProcessor.from_pretrained),
        ("PS3 checkpoint", PS3VisionModel.from_pretrained),
    ]


@pytest.mark.parametrize("index", range(3))
def test_from_pretrained_refuses_a_file_without_asking_the_hub(png, no_hub, index):
    what, load = _loaders()[index]
    with pytest.raises(NotADirectoryError) as err:
        load(str(png))
    assert str(err.value) == f"{what} {png} is a file; expected a checkpoint directory or a Hub id"


def test_locate_directory_keeps_dirs_and_hub_ids(tmp_path):
    assert hub.locate_directory(tmp_path, "model") == (str(tmp_path), True)
    assert hub.locate_directory("owner/name", "model") == ("owner/name", False)
    with pytest.raises(FileNotFoundError, match="model directory ./nope does not exist"):
        hub.locate_directory("./nope", "model", missing="model directory")


def _text_readers():
    from vila_hd.eval.benchmarks.base import read_jsonl, read_records, read_tsv
    from vila_hd.eval.replies import read_replies
    from vila_hd.infer import read_items

    return [
        ("img.jsonl", read_jsonl, "expected JSON lines"),
        ("img.json", read_records, "expected a JSON file"),
        ("img.tsv", read_tsv, "expected a tab-separated table"),
        ("img.png", read_replies, "expected replies as JSON lines or a JSON list"),
        ("img.png", read_items, "expected JSON lines"),
    ]


@pytest.mark.parametrize("index", range(5))
def test_text_readers_name_a_binary_file(tmp_path, index):
    from vila_hd.errors import FileFormatError

    name, read, expected = _text_readers()[index]
    path = tmp_path / name
    path.write_bytes(PNG)
    with pytest.raises(FileFormatError) as err:
        read(path)
    message = str(err.value)
    assert str(path) in message and "is not UTF-8 text" in message and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("benchmark", ["jsonl", "4kpro"])
def test_eval_benchmark_data_that_is_an_image_is_named(png, benchmark):
    from vila_hd.errors import FileFormatError
    from vila_hd.eval.benchmarks import build_benchmark

    with pytest.raises(FileFormatError, match=f"{png} is not UTF-8 text"):
        build_benchmark(benchmark, str(png)).samples()

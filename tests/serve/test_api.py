"""``vila_hd.load`` and the object it returns: chat (plain and streamed), selection maps, defaults, errors."""

from __future__ import annotations

import pytest
from PIL import Image
from serving_helpers import rgb, save_tiny_checkpoint

import vila_hd
from vila_hd.api import VilaHD
from vila_hd.images import ImageLoadError

QUESTION = "What color is the car?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-ckpt")
    save_tiny_checkpoint(path)
    rgb(0).save(path / "car.png")
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return vila_hd.load(checkpoint, max_new_tokens=8)


def test_load_is_the_public_entry_point(model, checkpoint):
    assert vila_hd.load is vila_hd.api.load
    assert isinstance(model, VilaHD)
    assert model.engine.options.max_new_tokens == 8
    assert "device=cpu" in repr(model) and "float32" in repr(model)


def test_chat_answers_like_the_model(model, checkpoint):
    answer = model.chat(checkpoint / "car.png", QUESTION)
    engine = model.engine
    assert answer == engine.generate(engine.single_turn([rgb(0)], QUESTION)).text
    assert answer and model.last_stats.new_tokens == 8 and model.last_stats.image_tokens == 80
    assert model.chat([rgb(0)], QUESTION) == answer  # PIL images and paths alike
    assert model.chat(None, "Hi") == engine.generate(engine.single_turn(None, "Hi")).text


def test_generation_options_per_call(model, checkpoint):
    short = model.chat(rgb(0), QUESTION, max_new_tokens=3)
    assert model.last_stats.new_tokens == 3 and model.chat(rgb(0), QUESTION).startswith(short)
    model.chat(rgb(0), QUESTION, steps=1, mode="bottom-up")
    assert model.last_stats.tokens_per_image == 48 and model.last_stats.look_close_mode == "after_image"
    model.chat(rgb(0), QUESTION, num_token_look_close=256)
    assert model.last_stats.selected_patches == 256
    greedy = model.chat(rgb(0), QUESTION, temperature=0)
    assert greedy == model.chat(rgb(0), QUESTION)
    with pytest.raises(TypeError, match="unknown generation option 'num_beams'"):
        model.chat(rgb(0), QUESTION, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        model.chat(rgb(0), QUESTION, max_new_tokens=0)


def test_streaming(model):
    answer = model.chat(rgb(0), QUESTION)
    chunks = model.chat(rgb(0), QUESTION, stream=True)
    assert not isinstance(chunks, str)
    chunks = list(chunks)
    assert len(chunks) >= 2 and "".join(chunks) == answer
    assert model.last_stats.new_tokens == 8


def test_leaving_a_stream_early_stops_generation(model):
    stream = model.chat(rgb(0), QUESTION, stream=True, max_new_tokens=200)
    first = next(stream)
    stream.close()
    assert first and model.last_stats.stopped and model.last_stats.new_tokens < 200


def test_selection_for_plotting(model, tmp_path):
    selection = model.selection(rgb(0), QUESTION)
    assert [m.shape for m in selection.maps] == [(16, 16), (32, 32)]
    assert all(((p >= 0) & (p <= 1)).all() for p in selection.probs)
    assert selection.selected_fraction == pytest.approx(0.2)
    assert model.selection(rgb(0), QUESTION, steps=1).selected_fraction == pytest.approx(0.1)
    path = selection.save(tmp_path / "figure.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == selection.figure().size == (1048, 824)


def test_clear_errors(model, tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: not found"):
        model.chat(tmp_path / "nope.png", QUESTION)
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model.chat(rgb(0), "<image> or <image>?")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vila_hd.load(tmp_path / "missing-model")
    with pytest.raises(TypeError, match="unknown generation option 'beams'"):
        vila_hd.load(tmp_path / "missing-model", beams=2)

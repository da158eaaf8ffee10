"""Serving limits (``ServingLimits``): pixels per image, images per prompt, new tokens, prompt tokens after image
expansion. Enforced by the engine -- so chat, infer and ``vila_hd.load`` all get them -- before the model runs,
with messages naming the limit, the value and the flag; configurable from the command line."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

import vila_hd
from vila_hd import cli
from vila_hd.chat import ChatSession
from vila_hd.engine import Engine, GenerationOptions, LimitExceeded, ServingLimits
from vila_hd.images import ImageLoadError
from vila_hd.serve import arguments

QUESTION = "What color is the car?"


def rgb(seed: int, size=(64, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("limits")
    (root / "ckpt").symlink_to(tiny_checkpoint, target_is_directory=True)
    for i in range(3):
        rgb(i).save(root / f"img{i}.png")
    rgb(9, (400, 300)).save(root / "big.png")  # 120 000 pixels
    return root


@pytest.fixture(scope="module")
def base(files):
    return Engine.from_pretrained(files / "ckpt", options=GenerationOptions(max_new_tokens=4))


def limited(base: Engine, **limits) -> Engine:
    """The same model and processor under other limits."""
    return Engine(base.model, base.processor, base.options, limits=ServingLimits(**limits))


class ForwardCounter:
    """Counts LLM decoder calls: a refused request must not reach the model."""

    def __init__(self, engine: Engine):
        self.calls = 0
        self.handle = engine.model.language_model.base_model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_limits_are_validated():
    assert ServingLimits(None, None, None, None).max_images_per_prompt is None
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="must be a positive integer or None"):
            ServingLimits(max_new_tokens=bad)
    assert issubclass(LimitExceeded, ValueError)


def test_image_pixels(base, files):
    engine = limited(base, max_image_pixels=100_000)
    with pytest.raises(ImageLoadError, match=r"big.png has 400 x 300 = 120000 pixels.*max_pixels=100000"):
        engine.single_turn([files / "big.png"], QUESTION)
    assert engine.single_turn([files / "img0.png"], QUESTION).images  # 3072 pixels: fine
    conv = engine.conversation()  # an image that skipped the loader is checked before the model runs
    conv.images.append(rgb(1, (400, 300)))
    conv.messages.append({"role": "user", "content": "<image>\n" + QUESTION})
    with ForwardCounter(engine) as counter, pytest.raises(LimitExceeded) as err:
        engine.generate(conv)
    assert counter.calls == 0
    assert "image 1 of the prompt (400 x 300) pixel count is 120000" in str(err.value)
    assert "max_image_pixels=100000" in str(err.value) and "--limit-image-pixels" in str(err.value)


def test_images_per_prompt(base, files):
    engine = limited(base, max_images_per_prompt=2)
    # refused before any image is read: these paths do not even exist
    with pytest.raises(LimitExceeded, match=r"number of images in the prompt is 3, above the serving limit "
                                            r"max_images_per_prompt=2 .*--limit-images"):
        engine.single_turn([files / "missing-a.png", files / "missing-b.png", files / "missing-c.png"], QUESTION)
    # over several turns
    conv = engine.single_turn([files / "img0.png", files / "img1.png"], QUESTION)
    assert engine.generate(conv).stats.images == 2
    conv.add_assistant("Red.")
    conv.add_image(files / "img2.png")
    conv.add_user("And this one?")
    with ForwardCounter(engine) as counter, pytest.raises(LimitExceeded, match="images in the prompt is 3"):
        engine.generate(conv)
    assert counter.calls == 0


def test_new_tokens(base, files):
    engine = limited(base, max_new_tokens=6)
    conv = engine.single_turn([files / "img0.png"], QUESTION)
    assert engine.generate(conv, max_new_tokens=6).stats.new_tokens <= 6
    with ForwardCounter(engine) as counter, pytest.raises(LimitExceeded) as err:
        engine.generate(conv, max_new_tokens=7)
    assert counter.calls == 0
    assert str(err.value).startswith("the requested max_new_tokens is 7, above the serving limit max_new_tokens=6")
    with pytest.raises(LimitExceeded):  # streaming and selection maps go through the same checks
        engine.stream(conv, max_new_tokens=100)
    with pytest.raises(ImageLoadError, match="max_pixels=1000"):
        limited(base, max_image_pixels=1000).selection(files / "big.png", QUESTION)


def test_prompt_tokens_count_the_expanded_images(base, files):
    text_only = base.generate(base.single_turn([], QUESTION)).stats.prompt_tokens
    with_image = base.generate(base.single_turn([files / "img0.png"], QUESTION)).stats.prompt_tokens
    assert with_image > text_only + 10  # the image placeholder became its image tokens
    engine = limited(base, max_prompt_tokens=with_image - 1)
    assert engine.generate(engine.single_turn([], QUESTION)).text is not None  # the text alone fits
    with ForwardCounter(engine) as counter, pytest.raises(LimitExceeded) as err:
        engine.generate(engine.single_turn([files / "img0.png"], QUESTION))
    assert counter.calls == 0
    assert (f"the prompt after image expansion (1 image(s)) in tokens is {with_image}, above the serving limit "
            f"max_prompt_tokens={with_image - 1}") in str(err.value)
    # in a batch the culprit is named
    convs = [engine.single_turn([], QUESTION), engine.single_turn([files / "img0.png"], QUESTION)]
    with pytest.raises(LimitExceeded, match="the prompt of conversation 1 after image expansion"):
        engine.generate_batch(convs)


def test_prompt_length_is_refused_before_any_image_work(base, files, monkeypatch):
    """A prompt that cannot run costs no image decoding or resizing: the length is known from the text."""
    with_image = base.generate(base.single_turn([files / "img0.png"], QUESTION)).stats.prompt_tokens
    engine = limited(base, max_prompt_tokens=with_image - 1)
    conv = engine.single_turn([files / "img0.png"], QUESTION)

    def no_image_work(*args, **kwargs):
        raise AssertionError("images were preprocessed for a prompt over the limit")

    monkeypatch.setattr(engine.processor.image_processor, "preprocess", no_image_work)
    with pytest.raises(LimitExceeded, match=f"is {with_image}, above the serving limit"):
        engine.generate(conv)


def test_prompt_tokens_default_to_the_context_length(base, files, monkeypatch):
    engine = limited(base)  # default limits: max_prompt_tokens None -> the LLM's context length
    monkeypatch.setattr(engine.model.config.text_config, "max_position_embeddings", 20)
    with pytest.raises(LimitExceeded, match=r"above the model's context length 20 \(max_position_embeddings\)"):
        engine.generate(engine.single_turn([files / "img0.png"], QUESTION))


def test_python_api_takes_limits(files):
    model = vila_hd.load(files / "ckpt", device="cpu", max_new_tokens=4,
                         limits=ServingLimits(max_new_tokens=8, max_images_per_prompt=1))
    assert model.chat(str(files / "img0.png"), QUESTION) is not None
    with pytest.raises(LimitExceeded, match="max_new_tokens=8"):
        model.chat(str(files / "img0.png"), QUESTION, max_new_tokens=9)
    with pytest.raises(LimitExceeded, match="max_images_per_prompt=1"):
        model.chat([str(files / "img0.png"), str(files / "img1.png")], QUESTION)


# --- chat -----------------------------------------------------------------------------------------------------
def test_chat_session_refuses_images_and_settings_over_the_limits(base, files):
    engine = limited(base, max_images_per_prompt=1, max_new_tokens=5)
    session = ChatSession(engine, GenerationOptions(max_new_tokens=4), out=io.StringIO(), err=io.StringIO())
    assert session.add_images([str(files / "img0.png")])
    assert not session.add_images([str(files / "img1.png")])
    assert "number of images in this conversation is 2, above the serving limit max_images_per_prompt=1" in \
        session.err.getvalue()
    assert len(session.conversation.pending_images) == 1
    session.cmd_set("max_new_tokens 50")
    assert "requested max_new_tokens is 50" in session.err.getvalue()
    assert session.options.max_new_tokens == 4  # unchanged
    assert session.ask(QUESTION, stream=False) is not None


def run_cli(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_command_line_limits(files, monkeypatch, capsys):
    common = ["chat", "--model", str(files / "ckpt"), "--max-new-tokens", "3", "--prompt", QUESTION, "--json"]
    code, out, err = run_cli(monkeypatch, capsys, [*common, "--image", str(files / "img0.png"),
                                                   str(files / "img1.png"), "--limit-images", "1"])
    assert code == 1 and "number of images in the prompt is 2" in err and "--limit-images" in err
    code, out, err = run_cli(monkeypatch, capsys, [*common, "--image", str(files / "big.png"),
                                                   "--limit-image-pixels", "1000"])
    assert code == 1 and "big.png has 400 x 300 = 120000 pixels" in err
    code, out, err = run_cli(monkeypatch, capsys, [*common, "--limit-new-tokens", "2"])
    assert code == 1 and "requested max_new_tokens is 3, above the serving limit max_new_tokens=2" in err
    code, out, err = run_cli(monkeypatch, capsys, [*common, "--image", str(files / "img0.png"),
                                                   "--limit-prompt-tokens", "10"])
    assert code == 1 and "max_prompt_tokens=10" in err
    code, out, err = run_cli(monkeypatch, capsys, [*common, "--image", str(files / "big.png"),
                                                   "--limit-image-pixels", "none", "--limit-prompt-tokens", "none"])
    assert code == 0 and json.loads(out)["stats"]["images"] == 1


def test_limit_flags_parse(files):
    parser = cli.build_parser()
    args = parser.parse_args(["infer", "--model", "m", "--input", "i", "--output", "o", "--limit-images", "none",
                              "--limit-new-tokens", "64"])
    limits = arguments.serving_limits(args)
    assert limits == ServingLimits(max_images_per_prompt=None, max_new_tokens=64)
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--model", "m", "--limit-images", "0"])


# --- infer ----------------------------------------------------------------------------------------------------
def test_infer_records_limit_errors_per_item(files, tmp_path, capsys):
    rows = [
        {"id": "ok", "image": "img0.png", "question": QUESTION},
        {"id": "too-many", "images": ["img0.png", "img1.png", "img2.png"], "question": QUESTION},
        {"id": "too-big", "image": "big.png", "question": QUESTION},
        {"id": "text", "question": QUESTION},
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("img0.png", "img1.png", "img2.png", "big.png"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    answers = tmp_path / "a.jsonl"
    code = cli.main(["infer", "--model", str(files / "ckpt"), "--input", str(questions), "--output", str(answers),
                     "--max-new-tokens", "3", "--no-progress", "--limit-images", "2",
                     "--limit-image-pixels", "100000", "--batch-size", "4"])
    assert code == 0
    out = {r["id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert "answer" in out["ok"] and "answer" in out["text"]
    assert "max_images_per_prompt=2" in out["too-many"]["error"]
    assert "max_pixels=100000" in out["too-big"]["error"] and "big.png" in out["too-big"]["error"]
    assert "2 answered, 2 errors" in capsys.readouterr().err

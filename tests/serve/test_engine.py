"""The generation engine on a tiny checkpoint: loading (device/dtype, adapters, missing paths), options,
conversations, streaming (chunks before the end, stopping), stats, batching and selection maps."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch
from PIL import Image
from serving_helpers import rgb

from vila_hd.dtypes import resolve_dtype as choose_dtype
from vila_hd.engine import Conversation, Engine, GenerationOptions
from vila_hd.engine.streaming import _TextChunks
from vila_hd.images import ImageLoadError
from vila_hd.loading import choose_device
from vila_hd.loading import load_pretrained as load_model

QUESTION = "What color is the car?"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint, options=GenerationOptions(max_new_tokens=8))


def reference_answer(engine, images, text, n=8, **kw):
    """The answer computed without the engine: processor + model.generate, greedy."""
    processor, model = engine.processor, engine.model
    content = "<image>\n" * len(images) + text
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = processor(text=prompt, images=images or None, **kw)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class Gate:
    """Holds the LLM decoder at its ``after``-th call until ``release()`` (or a timeout): lets a test act
    while generation is provably still running."""

    def __init__(self, engine, after: int = 3, timeout: float = 10.0):
        self.calls, self.after, self.timeout = 0, after, timeout
        self.released = threading.Event()
        self.timed_out = False
        self.handle = engine.model.language_model.base_model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        if self.calls >= self.after and not self.released.is_set():
            self.timed_out |= not self.released.wait(self.timeout)

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        self.handle.remove()


# --- options and loading -----------------------------------------------------------------------------------
def test_options_validate_and_update():
    options = GenerationOptions(num_token_look_close=300)
    steps = options.updated(steps="3")
    assert (steps.num_look_close, steps.num_token_look_close) == (3, None)
    assert options.updated(mode="bottom-up").look_close_mode == "after_image"
    assert GenerationOptions(num_look_close="all").num_look_close == "all"
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(num_look_close=-1),
        dict(num_look_close="x"),
        dict(look_close_mode="sideways"),
        dict(num_look_close=1, num_token_look_close=2),
    ):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)
    with pytest.raises(TypeError, match="unknown generation option 'beams'"):
        options.updated(beams=4)


def test_device_and_dtype_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device(None).type == expected
    assert choose_dtype(None, torch.device("cpu")) == torch.float32
    assert choose_dtype("auto", torch.device("cpu")) == torch.float32
    assert choose_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        choose_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_loaded_on_cpu_in_fp32(engine):
    assert engine.input_device.type == "cpu" and engine.model.dtype == torch.float32
    assert not engine.model.training


def test_missing_or_wrong_model_paths(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./relative/missing/dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt is a file"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a LoRA adapter directory"):
        load_model(checkpoint, adapter=checkpoint)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_load_4bit_without_gpu_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="--load-4bit needs bitsandbytes and a CUDA GPU"):
        load_model(checkpoint, load_4bit=True)


def test_adapter_detected_from_adapter_config(checkpoint, tmp_path, engine):
    peft = pytest.importorskip("peft")
    base, _ = load_model(checkpoint)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)", init_lora_weights=False
    )
    torch.manual_seed(1)
    lora = peft.get_peft_model(base, config)
    for name, param in lora.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.5)  # an adapter that visibly changes the answer
    lora.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(checkpoint)

    image = rgb(0)
    answers = {}
    for name, kwargs in {
        "as --model": dict(model=tmp_path / "adapter"),
        "as --adapter": dict(model=checkpoint, adapter=tmp_path / "adapter"),
        "unmerged": dict(model=tmp_path / "adapter", merge_adapter=False),
    }.items():
        adapted = Engine(*load_model(**kwargs), options=engine.options)
        answers[name] = adapted.generate(adapted.single_turn([image], QUESTION)).token_ids
    plain = engine.generate(engine.single_turn([image], QUESTION)).token_ids
    assert answers["as --model"] == answers["as --adapter"] == answers["unmerged"]
    assert answers["as --model"] != plain

    with pytest.raises(ValueError, match="is itself an adapter"):
        load_model(tmp_path / "adapter", adapter=tmp_path / "adapter")
    saved["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not name its base model"):
        load_model(tmp_path / "adapter")


# --- conversations -----------------------------------------------------------------------------------------
def test_conversation_places_images_and_undoes_failed_turns(tmp_path):
    conv = Conversation(system="Be brief.")
    conv.add_image(rgb(1))
    conv.add_user("first")
    conv.add_assistant("answer")
    conv.add_image(rgb(2))
    conv.add_image(rgb(3))
    conv.add_user("second")
    assert [m["content"] for m in conv.messages] == ["<image>\nfirst", "answer", "<image>\n<image>\nsecond"]
    assert len(conv.images) == 3 and not conv.pending_images
    assert conv.chat_messages()[0] == {"role": "system", "content": "Be brief."}
    conv.pop_user()
    assert len(conv.images) == 1 and len(conv.pending_images) == 2 and conv.messages[-1]["role"] == "assistant"
    with pytest.raises(ValueError, match="contains the image placeholder"):
        conv.add_user("look at <image>")
    with pytest.raises(ImageLoadError, match="missing.png"):
        conv.add_image(tmp_path / "missing.png")
    conv.clear()
    assert conv.messages == [] and conv.images == [] and conv.pending_images == []
    assert conv.system == "Be brief."


def test_later_turns_reuse_the_preprocessed_images(engine, monkeypatch):
    """A conversation's images are resized once: later turns take them from the engine's cache (same answers as
    without it), and the cache keeps only the most recent images."""
    calls = []
    preprocess = engine.processor.image_processor.preprocess

    def counting(images, **kwargs):
        calls.append(len(images))
        return preprocess(images, **kwargs)

    monkeypatch.setattr(engine.processor.image_processor, "preprocess", counting)
    uncached = Engine(engine.model, engine.processor, engine.options, image_cache_size=0)
    answers = []
    for eng in (engine, uncached):
        calls.clear()
        conv = eng.conversation()
        conv.add_image(rgb(4))
        conv.add_user(QUESTION)
        first = eng.generate(conv).text
        conv.add_assistant(first)
        conv.add_image(rgb(5))
        conv.add_user("And the second picture?")
        answers.append((first, eng.generate(conv).text, list(calls)))
    assert answers[0][2] == [1, 1] and answers[1][2] == [1, 1, 1]  # the first image is resized once, or twice
    assert answers[0][:2] == answers[1][:2]
    small = Engine(engine.model, engine.processor, engine.options, image_cache_size=1)
    small._pixel_values([rgb(1), rgb(2)])
    assert len(small._pixel_cache) == 1
    with pytest.raises(ValueError, match="image_cache_size"):
        Engine(engine.model, engine.processor, image_cache_size=-1)


def test_single_turn_with_placeholders(engine):
    conv = engine.single_turn([rgb(1), rgb(2)], "Compare <image> with <image>.")
    assert conv.messages[-1]["content"] == "Compare <image> with <image>." and len(conv.images) == 2
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        engine.single_turn([rgb(1), rgb(2)], "Only <image>.")
    with pytest.raises(ValueError, match="does not end with a user message"):
        conv.add_assistant("x")
        engine.generate(conv)


# --- generation --------------------------------------------------------------------------------------------
def test_generate_matches_the_model(engine):
    image = rgb(0)
    result = engine.generate(engine.single_turn([image], QUESTION))
    assert result.text == reference_answer(engine, [image], QUESTION)
    assert result.text and result.stats.new_tokens == 8
    text_only = engine.generate(engine.single_turn(None, "Hi"))
    assert text_only.text == reference_answer(engine, [], "Hi")
    assert text_only.stats.images == 0 and text_only.selection() is None


def test_greedy_overrides_sampling_defaults_of_the_checkpoint(engine):
    conv = engine.single_turn([rgb(0)], QUESTION)
    greedy = engine.generate(conv).text
    config = engine.model.generation_config
    saved = (config.do_sample, config.temperature, config.top_p)
    config.do_sample, config.temperature, config.top_p = True, 5.0, 0.9
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = engine.generate(conv, temperature=0).text
    finally:
        config.do_sample, config.temperature, config.top_p = saved
    assert again == greedy


def test_stream_yields_chunks_before_generation_ends(engine):
    conv = engine.single_turn([rgb(0)], QUESTION)
    gate = Gate(engine)
    try:
        generation = engine.stream(conv, max_new_tokens=8)
        chunks, running_at_first_chunk = [], None
        for chunk in generation:
            if not chunks:
                running_at_first_chunk = not generation.done
                gate.release()
            chunks.append(chunk)
    finally:
        gate.close()
    assert not gate.timed_out, "the first chunk did not arrive while the model was still generating"
    assert running_at_first_chunk
    assert len(chunks) >= 2
    assert "".join(chunks) == generation.result.text == engine.generate(conv).text


def test_stop_ends_the_answer_early(engine):
    conv = engine.single_turn([rgb(0)], QUESTION)
    gate = Gate(engine)
    try:
        generation = engine.stream(conv, max_new_tokens=40)
        for _ in generation:
            generation.stop()
            gate.release()
        result = generation.wait()
    finally:
        gate.close()
    assert result.stats.stopped and generation.stop_requested
    assert 1 <= result.stats.new_tokens <= 3
    full = engine.generate(conv, max_new_tokens=40)
    assert full.text.startswith(result.text) and not full.stats.stopped


def test_errors_in_the_generation_thread_reach_the_caller(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "generate", broken)
    generation = engine.stream(engine.single_turn(None, "Hi"))
    with pytest.raises(RuntimeError, match="boom"):
        list(generation)


def test_text_chunks_wait_for_whole_characters(engine):
    tokenizer = engine.processor.tokenizer
    ids = tokenizer("é!", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids[:1]).endswith("\ufffd"), "the tiny tokenizer should split é into bytes"
    chunks = _TextChunks(tokenizer)
    chunks.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    for i in ids:
        chunks.put(torch.tensor([i]))
    chunks.end()
    out = []
    while (item := chunks.queue.get()) is not None:
        out.append(item)
    assert "".join(out) == "é!" and all("\ufffd" not in c for c in out)


# --- stats and selection -------------------------------------------------------------------------------------
def test_stats_follow_the_selection_settings(engine):
    conv = engine.single_turn([rgb(0)], QUESTION)
    two = engine.generate(conv)
    one = engine.generate(conv, steps=1)
    bottom_up = engine.generate(conv, steps=1, mode="bottom-up")
    assert (two.stats.tokens_per_image, one.stats.tokens_per_image) == (16 + 64, 16 + 32)
    assert (two.stats.selected_pct, one.stats.selected_pct) == (20.0, 10.0)
    assert two.stats.prompt_tokens - one.stats.prompt_tokens == 32
    for result in (two, one):
        assert sum(int(m.sum()) for m in result.selection_maps) == result.stats.selected_patches
    assert two.stats.prefix_s > 0 and bottom_up.stats.prefix_s == 0
    assert bottom_up.stats.look_close_mode == "after_image"
    s = two.stats
    assert min(s.preprocess_s, s.encode_s, s.prefill_s, s.decode_s) >= 0
    assert s.preprocess_s + s.prefix_s + s.encode_s + s.prefill_s + s.decode_s <= s.total_s + 1e-3
    assert s.tokens_per_s > 0
    text = s.format()
    assert "80 per image x 1 image(s)" in text and "20.0%" in text and "prefix" in text and "tokens/s" in text
    assert s.to_dict()["look_close_mode"] == "top-down"


def test_batch_matches_single_answers(engine):
    convs = [
        engine.single_turn([rgb(0)], QUESTION),
        engine.single_turn(None, "Hi"),
        engine.single_turn([rgb(1), rgb(2)], "What changed?"),
    ]
    batch = engine.generate_batch(convs)
    single = [engine.generate(c) for c in convs]
    assert [r.text for r in batch] == [r.text for r in single]
    assert [r.stats.images for r in batch] == [1, 0, 2]
    assert [r.stats.prompt_tokens for r in batch] == [r.stats.prompt_tokens for r in single]
    assert [m.shape for m in batch[2].selection_maps] == [(2, 16, 16), (2, 32, 32)]
    torch.testing.assert_close(batch[2].selection_maps[0], single[2].selection_maps[0])


def test_selection_maps_for_plotting(engine, tmp_path):
    image = rgb(0)
    selection = engine.selection(image, QUESTION)
    assert [m.shape for m in selection.maps] == [(16, 16), (32, 32)]
    assert [p.shape for p in selection.probs] == [(16, 16), (32, 32)]
    assert selection.selected_fraction == pytest.approx(0.2)
    answered = engine.generate(engine.single_turn([image], QUESTION)).selection()
    for a, b in zip(answered.maps, selection.maps):
        torch.testing.assert_close(a, b)
    path = selection.save(tmp_path / "sel.png")
    with Image.open(path) as png:
        # 320x240 shown 512x384 per scale: 2 columns of (512 + 8) + 8, two rows of (384 + 24) + 8.
        assert png.format == "PNG" and png.size == (2 * 520 + 8, 2 * 408 + 8)

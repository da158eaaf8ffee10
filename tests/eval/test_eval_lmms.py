"""The lmms-eval model class, checked against a stand-in of lmms-eval's interface when lmms-eval is absent."""

from __future__ import annotations

import abc
import importlib
import sys
import types
from dataclasses import dataclass

import pytest
from PIL import Image

from vila_hd.eval.predictor import Prediction


class StubLmms(abc.ABC):
    """What lmms-eval's ``lmms_eval.api.model.lmms`` provides: rank / world size, task_dict, abstract methods."""

    def __init__(self) -> None:
        self._rank, self._world_size = 0, 1
        self.task_dict: dict = {}

    @abc.abstractmethod
    def loglikelihood(self, requests): ...

    @abc.abstractmethod
    def generate_until(self, requests): ...

    @abc.abstractmethod
    def generate_until_multi_round(self, requests): ...

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size


@pytest.fixture
def stub_lmms_eval(monkeypatch):
    """Install ``lmms_eval`` stand-in modules (registry, model base, model tables) unless the real one is here."""
    registry: dict[str, type] = {}

    def register_model(*names):
        def decorate(cls):
            for name in names:
                assert name not in registry, f"model {name} already registered"
                registry[name] = cls
            return cls
        return decorate

    modules = {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
        "lmms_eval.api.registry": types.ModuleType("lmms_eval.api.registry"),
        "lmms_eval.models": types.ModuleType("lmms_eval.models"),
    }
    modules["lmms_eval.api.model"].lmms = StubLmms
    modules["lmms_eval.api.registry"].register_model = register_model
    modules["lmms_eval.models"].AVAILABLE_SIMPLE_MODELS = {}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    import vila_hd.eval.lmms_eval_model as adapter

    monkeypatch.setattr(adapter, "_CLASS", None)
    return registry, modules["lmms_eval.models"].AVAILABLE_SIMPLE_MODELS


@dataclass
class Request:
    args: tuple


class FakePredictor:
    def __init__(self):
        self.calls = []

    def __call__(self, images, prompt, options):
        self.calls.append((images, prompt, dict(options)))
        return Prediction("B. red\nUSER: next question")

    def continuation_losses(self, images, prompt, continuations, options):
        self.calls.append((images, prompt, list(continuations)))
        return [(2.5, 3, True) for _ in continuations]


def test_model_class_is_built_lazily_and_registered(stub_lmms_eval):
    registry, table = stub_lmms_eval
    adapter = importlib.import_module("vila_hd.eval.lmms_eval_model")
    cls = adapter.register()
    assert issubclass(cls, StubLmms) and registry["vila_hd"] is cls
    assert table["vila_hd"] == "vila_hd.eval.lmms_eval_model.VilaHDLmms"
    assert adapter.VilaHDLmms is cls  # the dotted path lmms-eval imports resolves to the same class


def test_generate_until_and_loglikelihood(stub_lmms_eval):
    adapter = importlib.import_module("vila_hd.eval.lmms_eval_model")
    predictor = FakePredictor()
    model = adapter.VilaHDLmms(predictor=predictor, steps="4", mode="top-down", max_new_tokens="32")
    image = Image.new("RGB", (32, 32))
    model.task_dict = {"vstar": {"test": {7: {"image": image}}}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    replies = model.generate_until([Request(("Which colour?", {"until": ["USER:"], "max_new_tokens": 5,
                                                               "do_sample": False, "num_beams": 1},
                                             to_visual, 7, "vstar", "test"))])
    assert replies == ["B. red\n"]
    images, prompt, options = predictor.calls[-1]
    assert images == [image] and prompt == "Which colour?"
    assert options == {"max_new_tokens": 5, "steps": 4, "mode": "top-down", "temperature": 0}
    results = model.loglikelihood([Request(("Which colour?", lambda doc: " red", to_visual, 7, "vstar", "test"))])
    assert results == [(-2.5, True)] and predictor.calls[-1][2] == [" red"]
    # a question's options are scored in one call (the image and context run once), in request order
    model.task_dict["vstar"]["test"][8] = {"image": image}
    predictor.continuation_losses = lambda images, prompt, conts, options: (
        predictor.calls.append((images, prompt, list(conts))) or [(float(len(c)), len(c), False) for c in conts])
    before = len(predictor.calls)
    options = [(" red", 7), (" blue", 8), (" green", 7), (" teal", 7)]
    results = model.loglikelihood([Request(("Which colour?", c, to_visual, d, "vstar", "test")) for c, d in options])
    assert results == [(-4.0, False), (-5.0, False), (-6.0, False), (-5.0, False)]
    assert [call[2] for call in predictor.calls[before:]] == [[" red", " green", " teal"], [" blue"]]
    with pytest.raises(NotImplementedError):
        model.generate_until_multi_round([])


def test_video_inputs_are_refused(stub_lmms_eval):
    adapter = importlib.import_module("vila_hd.eval.lmms_eval_model")
    model = adapter.VilaHDLmms(predictor=FakePredictor())
    model.task_dict = {"t": {"s": {0: {}}}}
    with pytest.raises(ValueError, match="video"):
        model.generate_until([Request(("Q", {}, lambda doc: ["clip.mp4"], 0, "t", "s"))])


def test_missing_lmms_eval_is_a_clear_error(monkeypatch):
    adapter = importlib.import_module("vila_hd.eval.lmms_eval_model")
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval...` fail
    monkeypatch.setattr(adapter, "_CLASS", None)
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        adapter.build_model_class()
    assert adapter.cut_at_stop("abc</s>def", "</s>") == "abc"
    assert adapter.cut_at_stop("abc", None) == "abc"

"""Loading a checkpoint cannot run code, and a local path is never taken for a Hub id.

- A planted pickle (``.bin`` / ``.pt`` whose ``__reduce__`` would create a marker file) goes through every loading
  entry point -- PS3 and VILA-HD ``from_pretrained``, the VILA layout loader, ``engine.load_model`` /
  ``vila_hd.load`` (model and LoRA adapter), the training resume (DeepSpeed state and RNG files) -- and is
  refused without being executed.
- The packages never ``eval`` / ``exec``, never unpickle outside ``torch.load(weights_only=True)``, never pass
  ``trust_remote_code=True`` (an AST scan of vila_hd/ llava_compat/ train/ eval/).
- Local-looking paths that do not exist (``./x``, ``/abs/x``, ``~/x``, ``x/y/z``) raise a clear error with the Hub
  client (and every socket) made to fail the test if called.
"""

from __future__ import annotations

import ast
import copy
import os
import pickle
import shutil
import socket
import sys

import pytest
import testpaths
import torch

ROOT = testpaths.REPO_ROOT
PACKAGES = ["vila_hd", "llava_compat", "train", "eval"]


# --- the planted pickle -------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str, marker: str, legacy: bool = False) -> str:
    """Write a malicious pickle at ``path``: torch's zip format, or a bare pickle stream (``legacy``)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"weight": torch.zeros(2), "payload": _Payload(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def marker(tmp_path, reliability):
    path = str(tmp_path / "PAYLOAD_RAN")
    yield path
    assert not os.path.exists(path), "a planted pickle was executed"
    reliability.add("loading", "planted_pickle_cases", 1)


def test_the_planted_pickle_is_live(tmp_path):
    """Sanity: plain unpickling does run the payload (so the tests below would notice an unsafe loader)."""
    marker = str(tmp_path / "ran")
    with open(plant(str(tmp_path / "evil.bin"), marker, legacy=True), "rb") as f:
        pickle.load(f)  # noqa: S301 - the point of the test
    assert os.path.exists(marker)


# --- checkpoints to plant into (`tiny`: conftest's tiny model, seed 0) --------------------------------------------
def _replace_weights(directory: str, marker: str, name: str = "pytorch_model.bin", legacy: bool = False) -> None:
    for file in os.listdir(directory):
        if file.endswith(".safetensors") or file.endswith(".safetensors.index.json"):
            os.remove(os.path.join(directory, file))
    plant(os.path.join(directory, name), marker, legacy)


@pytest.fixture
def vila_hd_dir(tiny, tmp_path):
    model, processor = tiny
    path = str(tmp_path / "vila_hd")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_vila_hd_from_pretrained_refuses_pickles(vila_hd_dir, marker, name, legacy):
    from vila_hd.model import VilaHDForConditionalGeneration

    _replace_weights(vila_hd_dir, marker, name, legacy)
    with pytest.raises(OSError, match=f"only pickled weights \\({name}\\).*safetensors only"):
        VilaHDForConditionalGeneration.from_pretrained(vila_hd_dir)


def test_from_pretrained_refuses_to_be_asked_for_pickles(vila_hd_dir, marker):
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.ps3 import PS3VisionModel

    _replace_weights(vila_hd_dir, marker)
    for kwargs in ({"use_safetensors": False}, {"weights_only": False}):
        with pytest.raises(ValueError, match="safetensors only"):
            VilaHDForConditionalGeneration.from_pretrained(vila_hd_dir, **kwargs)
        with pytest.raises(ValueError, match="safetensors only"):
            PS3VisionModel.from_pretrained(vila_hd_dir, **kwargs)


def test_ps3_from_pretrained_refuses_pickles(tiny, tmp_path, marker):
    from vila_hd.ps3 import PS3ImageProcessor, PS3VisionModel

    path = str(tmp_path / "ps3")
    tiny[0].vision_tower.save_pretrained(path)
    assert PS3VisionModel.from_pretrained(path) is not None  # the safetensors original loads
    _replace_weights(path, marker)
    with pytest.raises(OSError, match="PS3 checkpoint .* only pickled weights"):
        PS3VisionModel.from_pretrained(path)
    tiny[1].image_processor.save_pretrained(path)
    assert PS3ImageProcessor.from_pretrained(path).image_size  # a processor has no weights to refuse


@pytest.mark.parametrize("part", ["llm", "vision_tower", "mm_projector"])
def test_vila_layout_loader_refuses_pickles(tiny, tmp_path, marker, part):
    from vila_hd.compat.vila_checkpoint import export_vila_checkpoint
    from vila_hd.hub import CheckpointError
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.modeling import load_vila_model

    path = str(tmp_path / "vila")
    export_vila_checkpoint(*tiny, path)
    _replace_weights(os.path.join(path, part), marker)
    for load in (load_vila_model, VilaHDForConditionalGeneration.from_pretrained):
        with pytest.raises((OSError, CheckpointError), match="only pickled weights|only safetensors are loaded"):
            load(path)


def test_engine_and_api_refuse_pickled_models(vila_hd_dir, marker):
    import vila_hd
    from vila_hd.loading import load_pretrained as load_model

    _replace_weights(vila_hd_dir, marker)
    with pytest.raises(OSError, match="only pickled weights"):
        load_model(vila_hd_dir, device="cpu")
    with pytest.raises(OSError, match="only pickled weights"):
        vila_hd.load(vila_hd_dir, device="cpu")


def test_engine_refuses_a_pickled_lora_adapter(tiny, vila_hd_dir, tmp_path, marker):
    peft = pytest.importorskip("peft")
    from vila_hd.loading import load_pretrained as load_model

    language_model = copy.deepcopy(tiny[0].language_model)  # peft wraps in place: the shared model stays as it is
    adapter = str(tmp_path / "adapter")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=vila_hd_dir)
    peft.get_peft_model(language_model, config).save_pretrained(adapter)
    _replace_weights(adapter, marker, "adapter_model.bin")
    with pytest.raises(OSError, match="LoRA adapter .* only pickled weights"):
        load_model(vila_hd_dir, adapter, device="cpu")
    # peft itself reads a .bin adapter with weights_only=True: refused as well, not executed
    with pytest.raises(pickle.UnpicklingError):
        peft.utils.load_peft_weights(adapter, device="cpu")


# --- training resume ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepspeed_engine():
    pytest.importorskip("deepspeed")
    import deepspeed

    from vila_hd.train.trainer import init_distributed

    init_distributed()
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


@pytest.mark.parametrize("target", ["engine/mp_rank_00_model_states.pt",
                                    "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank_00000.pt"])
@pytest.mark.parametrize("legacy", [False, True])
def test_training_resume_refuses_planted_pickles(deepspeed_engine, tmp_path, marker, target, legacy):
    from vila_hd.train import checkpoint as ckpt

    out = str(tmp_path / "run")
    path = ckpt.save(deepspeed_engine, out, 1, {"note": "test"})
    assert ckpt.load(deepspeed_engine, path)["step"] == 1  # the genuine checkpoint resumes
    plant(os.path.join(path, target), marker, legacy)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=f"{os.path.basename(target)} holds objects other than"):
        ckpt.load(deepspeed_engine, path)
    # DeepSpeed's own reader is back in place afterwards
    assert "load" not in vars(deepspeed_engine.checkpoint_engine)


# --- the packages never run code from data ------------------------------------------------------------------------
def _findings(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append((node.lineno, f"{name}()"))
        if owner in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and name in (
                "load", "loads", "open", "Unpickler"):
            found.append((node.lineno, f"{owner}.{name}()"))
        if isinstance(func, ast.Name) and name == "Unpickler":
            found.append((node.lineno, "Unpickler()"))
        if owner == "torch" and name == "load":
            only = keywords.get("weights_only")
            if not (isinstance(only, ast.Constant) and only.value is True):
                found.append((node.lineno, "torch.load() without weights_only=True"))
        if owner == "yaml" and (name in ("unsafe_load", "full_load") or (name == "load" and "Loader" in keywords)):
            found.append((node.lineno, f"yaml.{name}()"))
        if owner == "os" and name in ("system", "popen"):
            found.append((node.lineno, f"os.{name}()"))
        for key in ("trust_remote_code", "weights_only", "allow_pickle", "shell"):
            value = keywords.get(key)
            bad = key in ("trust_remote_code", "allow_pickle", "shell") and isinstance(value, ast.Constant) and \
                value.value is True
            if bad or (key == "weights_only" and isinstance(value, ast.Constant) and value.value is False):
                found.append((node.lineno, f"{key}={value.value}"))
    return found


# Loaders of our own classes that refuse custom code themselves (refuse_custom_code, then transformers with
# trust_remote_code=False) or build from objects already loaded; any other ``X.from_pretrained`` / ``X.from_config``
# (transformers' Auto* classes, peft) must pass ``trust_remote_code=False`` in the call.
OWN_LOADERS = {
    "VilaHDForConditionalGeneration": "vila_hd.model.modeling", "VilaHDProcessor": "vila_hd.processing",
    "PS3VisionModel": "vila_hd.ps3.modeling", "PS3TextModel": "vila_hd.ps3.modeling",
    "PS3Model": "vila_hd.ps3.modeling", "PS3ImageProcessor": "vila_hd.ps3.image_processing",
    "PS3Tokenizer": "vila_hd.ps3.tokenization", "Engine": "vila_hd.engine",
    "TokenLayoutSpec": "vila_hd.model.token_layout",
}
LOADER_METHODS = ("from_pretrained", "from_config")


def _owner_name(node: ast.AST) -> str:
    """``Auto`` of ``Auto.f``, ``AutoModel`` of ``transformers.AutoModel.f``, ``super()`` of ``super().f``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return f"{node.func.id}()"
    return ast.dump(node)[:40]


def _loader_findings(tree: ast.AST) -> list[tuple[int, str]]:
    """``X.from_pretrained(...)`` / ``X.from_config(...)`` of a class not in OWN_LOADERS without
    ``trust_remote_code=False``; a loader handed on uncalled only as ``strict_from_pretrained``'s first argument
    (which adds ``trust_remote_code=False``)."""
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    handed_on = {id(n.args[0]) for n in calls.values()
                 if isinstance(n.func, ast.Name) and n.func.id == "strict_from_pretrained" and n.args}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in LOADER_METHODS):
            continue
        owner = _owner_name(node.value)
        if owner in OWN_LOADERS or id(node) in handed_on:
            continue
        if id(node) not in calls:
            found.append((node.lineno, f"{owner}.{node.attr} handed on uncalled"))
            continue
        value = {k.arg: k.value for k in calls[id(node)].keywords}.get("trust_remote_code")
        if not (isinstance(value, ast.Constant) and value.value is False):
            found.append((node.lineno, f"{owner}.{node.attr}() without trust_remote_code=False"))
    return found


def package_files() -> list[str]:
    files = []
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def test_no_code_execution_from_data_in_the_packages(reliability):
    problems = []
    files = package_files()
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        problems += [f"{os.path.relpath(path, ROOT)}:{line}: {what}"
                     for line, what in _findings(tree) + _loader_findings(tree)]
    assert len(files) > 50
    assert not problems, "\n".join(problems)
    reliability.record("loading", "files_scanned", len(files))


def test_the_scan_finds_what_it_looks_for():
    source = """
eval(cfg["x"]); exec(code); torch.load(p); torch.load(p, weights_only=False); pickle.loads(b)
AutoModel.from_pretrained(p, trust_remote_code=True); yaml.load(s, Loader=yaml.Loader); np.load(p, allow_pickle=True)
torch.load(p, weights_only=True); model.eval(); yaml.safe_load(s)
"""
    kinds = sorted(what for _, what in _findings(ast.parse(source)))
    assert kinds == sorted(["eval()", "exec()", "torch.load() without weights_only=True",
                            "torch.load() without weights_only=True", "weights_only=False", "pickle.loads()",
                            "trust_remote_code=True", "yaml.load()", "allow_pickle=True"])


def test_the_scan_finds_loaders_without_trust_remote_code_false():
    source = """
AutoTokenizer.from_pretrained(p); AutoConfig.from_pretrained(p, trust_remote_code=True)
transformers.AutoModelForCausalLM.from_config(c); PeftModel.from_pretrained(m, p, **kw)
load = AutoProcessor.from_pretrained; strict_from_pretrained(super().from_pretrained, p, "x")
AutoImageProcessor.from_pretrained(p, trust_remote_code=False); VilaHDProcessor.from_pretrained(p)
PS3VisionModel.from_pretrained(p); TokenLayoutSpec.from_config(c)
"""
    kinds = sorted(what for _, what in _loader_findings(ast.parse(source)))
    assert kinds == sorted(["AutoTokenizer.from_pretrained() without trust_remote_code=False",
                            "AutoConfig.from_pretrained() without trust_remote_code=False",
                            "AutoModelForCausalLM.from_config() without trust_remote_code=False",
                            "PeftModel.from_pretrained() without trust_remote_code=False",
                            "AutoProcessor.from_pretrained handed on uncalled"])


@pytest.mark.parametrize("owner", sorted(OWN_LOADERS))
def test_the_scans_own_loaders_are_ours(owner):
    """Each class the scan lets call ``from_pretrained`` / ``from_config`` freely defines them in our package
    (so the allowance cannot cover a transformers class of the same name); that they refuse an ``auto_map`` is
    tests/loading/test_custom_code.py's."""
    import importlib

    cls = getattr(importlib.import_module(OWN_LOADERS[owner]), owner)
    methods = [getattr(cls, m) for m in LOADER_METHODS if hasattr(cls, m)]
    own = [m for m in methods if getattr(m, "__module__", "").startswith(tuple(PACKAGES))]
    assert own, f"{owner}: none of {LOADER_METHODS} is defined in {PACKAGES}"


# --- local paths are never Hub ids ---------------------------------------------------------------------------------
HUB_FUNCTIONS = ("hf_hub_download", "snapshot_download", "get_hf_file_metadata", "model_info", "list_repo_files",
                 "repo_info", "file_exists", "hf_hub_url")


@pytest.fixture
def no_hub(monkeypatch):
    """Every Hub client function and every socket connection records the call and fails."""
    import huggingface_hub  # noqa: F401
    import transformers.utils.hub  # noqa: F401

    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(f"{name}{args}")
            raise AssertionError(f"unexpected Hub call {name}{args}")
        return call

    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(
                ("huggingface_hub", "transformers", "peft", "vila_hd", "llava_compat", "train")):
            continue
        for attr in HUB_FUNCTIONS:
            if callable(getattr(module, attr, None)):
                monkeypatch.setattr(module, attr, refuse(f"{module_name}.{attr}"), raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    yield calls
    assert not calls, f"the Hub was called: {calls}"


def _entry_points():
    import vila_hd
    from vila_hd.hub import resolve_model_dir
    from vila_hd.loading import load_pretrained as load_model
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.modeling import load_vila_model
    from vila_hd.processing import VilaHDProcessor
    from vila_hd.ps3 import PS3ImageProcessor, PS3Model, PS3Tokenizer, PS3VisionModel

    return {
        "PS3VisionModel": PS3VisionModel.from_pretrained,
        "PS3Model": PS3Model.from_pretrained,
        "PS3ImageProcessor": PS3ImageProcessor.from_pretrained,
        "PS3Tokenizer": PS3Tokenizer.from_pretrained,
        "VilaHDForConditionalGeneration": VilaHDForConditionalGeneration.from_pretrained,
        "VilaHDProcessor": VilaHDProcessor.from_pretrained,
        "resolve_model_dir": resolve_model_dir,
        "load_model": lambda p: load_model(p, device="cpu"),
        "load_model(adapter=...)": lambda p: load_model(ROOT, p, device="cpu"),
        "vila_hd.load": lambda p: vila_hd.load(p, device="cpu"),
        "load_vila_model": load_vila_model,
    }


ENTRY_POINTS = ["PS3VisionModel", "PS3Model", "PS3ImageProcessor", "PS3Tokenizer", "VilaHDForConditionalGeneration",
                "VilaHDProcessor", "resolve_model_dir", "load_model", "load_model(adapter=...)", "vila_hd.load",
                "load_vila_model"]
LOCAL_LOOKING = ["./x", "/abs/x", "~/x", "x/y/z", "../x", "x/", "owner/name/sub"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_missing_local_paths_are_errors_not_downloads(entry, tmp_path, monkeypatch, no_hub, reliability):
    monkeypatch.chdir(tmp_path)  # the relative paths do not exist here
    load = _entry_points()[entry]
    for path in LOCAL_LOOKING:
        path = path.replace("/abs/", str(tmp_path / "abs") + "/").replace("~/x", "~/vila-hd-missing-x")
        with pytest.raises((FileNotFoundError, OSError)) as err:
            load(path)
        assert path in str(err.value) or os.path.expanduser(path) in str(err.value), (entry, path, err.value)
        assert "does not exist" in str(err.value) or "not found" in str(err.value).lower(), (entry, path, err.value)
    reliability.add("loading", "missing_path_cases", len(LOCAL_LOOKING))


def test_existing_local_checkpoints_load_without_the_hub(vila_hd_dir, tmp_path, monkeypatch, no_hub):
    from vila_hd.loading import load_pretrained as load_model

    model, processor = load_model(vila_hd_dir, device="cpu")
    assert model.config.model_type == "vila_hd" and processor.image_token
    # a path given with ~ is expanded, not sent to the Hub
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(vila_hd_dir, tmp_path / "ckpt")
    model, _ = load_model("~/ckpt", device="cpu")
    assert model is not None


def test_hub_ids_still_go_to_the_hub(monkeypatch):
    """The guard only stops local-looking paths: ``owner/name`` is downloaded (here: a stub)."""
    import huggingface_hub

    from vila_hd import hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or "/nowhere")
    assert hub.resolve_model_dir("nvidia/VILA-HD-8B-PS3-4K-SigLIP2") == "/nowhere"
    assert asked == ["nvidia/VILA-HD-8B-PS3-4K-SigLIP2"]
    assert hub.is_hub_id("owner/name") and not hub.is_hub_id("./x") and not hub.is_hub_id("a/b/c")
    assert not hub.is_hub_id("a/../b") and not hub.is_hub_id("/abs") and not hub.is_hub_id("~/x")


def test_checkpoints_written_by_the_stack_hold_no_pickles(vila_hd_dir):
    names = os.listdir(vila_hd_dir)
    assert any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]

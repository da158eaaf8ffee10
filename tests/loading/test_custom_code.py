"""No code from a checkpoint directory ever runs (issue #13 section 3).

A checkpoint directory is planted with an ``auto_map`` (transformers' pointer to custom code) in one of the files
transformers reads it from -- ``config.json`` (with an unknown ``model_type``), ``tokenizer_config.json``,
``processor_config.json``, ``preprocessor_config.json``, a nested sub-config, and the VILA layout's
``llm/config.json`` / ``vision_tower/preprocessor_config.json`` -- next to an ``evil.py`` that writes a marker file
when it is imported. ``vila-hd chat`` and ``vila-hd data check`` (the installed console script, ``y`` answered on
stdin to any "run the custom code?" prompt) and every library loader refuse the directory with one error naming
the key and the file; the marker never appears. A sanity test shows the plant is live: transformers told to trust
remote code does import ``evil.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import fresh_job_env

from vila_hd.hub import CustomCodeError

EXE = os.path.join(os.path.dirname(sys.executable), "vila-hd")
ERROR_LINE = re.compile(r"^vila-hd( [a-z-]+)*: error: ")
EVIL = "import os\nopen(os.environ.get('EVIL_MARKER', {marker!r}), 'w').write('ran')\n"
# where the plant goes (a file of the checkpoint, relative) -> (JSON path to the dict holding auto_map, its value)
PLANTS = {
    "config.json": ((), {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}),
    "tokenizer_config.json": ((), {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    "processor_config.json": ((), {"AutoProcessor": "evil.EvilProcessor"}),
    "preprocessor_config.json": ((), {"AutoImageProcessor": "evil.EvilImageProcessor"}),
    "config.json:text_config": (("text_config",), {"AutoConfig": "evil.EvilConfig"}),
}
VILA_PLANTS = {
    "llm/config.json": ((), {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
    "llm/tokenizer_config.json": ((), {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    "vision_tower/preprocessor_config.json": ((), {"AutoImageProcessor": "evil.EvilImageProcessor"}),
}


def plant(root: Path, where: str, marker: Path) -> str:
    """Put ``auto_map`` into ``root/<file>`` (at the JSON path of ``where``) and ``evil.py`` beside it; returns the
    file's name relative to ``root`` (as the error names it)."""
    file, json_path, code_map = _plant_spec(where)
    path = root / file
    data = json.loads(path.read_text())
    if file.endswith("config.json") and not json_path and "model_type" in data:
        data["model_type"] = "evil_model"  # a type transformers does not know: only the planted code could build it
    target = data
    for key in json_path:
        target = target.setdefault(key, {})
    target["auto_map"] = code_map
    path.write_text(json.dumps(data))
    (path.parent / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return file


def _plant_spec(where: str) -> tuple[str, tuple[str, ...], dict]:
    json_path, code_map = {**PLANTS, **VILA_PLANTS}[where]
    return where.split(":")[0], json_path, code_map


@pytest.fixture
def marker(tmp_path, reliability):
    path = tmp_path / "EVIL_CODE_RAN"
    yield path
    assert not path.exists(), "code planted in a checkpoint directory ran"
    reliability.add("contents", "planted_code_cases", 1)


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the session's tiny checkpoint (our single-directory format), to plant into."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def vila_original(tiny, tmp_path_factory) -> Path:
    from vila_hd.compat.vila_checkpoint import export_vila_checkpoint

    root = tmp_path_factory.mktemp("vila") / "ckpt"
    export_vila_checkpoint(*tiny, root)
    return root


@pytest.fixture
def vila_checkpoint(vila_original, tmp_path) -> Path:
    return Path(shutil.copytree(vila_original, tmp_path / "vila"))


@pytest.fixture
def planted(request, checkpoint, vila_original, tmp_path, marker):
    """``(directory, file named in the error)`` for the plant ``request.param``."""
    where = request.param
    root = Path(shutil.copytree(vila_original, tmp_path / "vila")) if where in VILA_PLANTS else checkpoint
    return root, plant(root, where, marker)


def _run(env_home: Path, *args) -> subprocess.CompletedProcess:
    env = fresh_job_env()
    env.pop("PYTHONPATH", None)
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(env_home / "hf"), HF_MODULES_CACHE=str(env_home / "modules"),
               TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *map(str, args)], cwd=env_home, env=env, input="y\n" * 5, capture_output=True,
                          encoding="utf-8", timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, code: int, file: str) -> None:
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Do you wish to run the custom code" not in proc.stdout + err, err[-3000:]
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, err[-3000:]
    assert "auto_map" in lines[0] and f" in {file} " in lines[0], lines[0]


# --- the plant is live ----------------------------------------------------------------------------------------
LIVE = {"config.json": "AutoConfig", "tokenizer_config.json": "AutoTokenizer",
        "preprocessor_config.json": "AutoImageProcessor"}


def test_the_planted_code_is_live(checkpoint, tmp_path):
    """transformers told to trust remote code imports ``evil.py`` for each kind of plant (so the refusals below
    are what keeps it from running). In a child process, with its own module cache."""
    dirs = {}
    for where in LIVE:
        root = Path(shutil.copytree(checkpoint, tmp_path / where.replace(".", "_")))
        plant(root, where, tmp_path / f"ran_{where}")
        dirs[where] = str(root)
    script = ("import os, sys, json, transformers\n"
              "for where, (cls, path) in json.loads(sys.argv[1]).items():\n"
              "    os.environ['EVIL_MARKER'] = sys.argv[2] + '/ran_' + where\n"
              "    try: getattr(transformers, cls).from_pretrained(path, trust_remote_code=True)\n"
              "    except Exception: pass  # the module was imported before the missing class was looked up\n")
    env = {**fresh_job_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    args = json.dumps({w: (LIVE[w], d) for w, d in dirs.items()})
    subprocess.run([sys.executable, "-c", script, args, str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.glob("ran_*")) == sorted(f"ran_{w}" for w in LIVE)


# --- through the installed vila-hd, "y" answered ---------------------------------------------------------------
CHAT_PLANTS = ["config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
               "llm/config.json"]
DATA_CHECK_PLANTS = ["config.json", "tokenizer_config.json", "llm/config.json"]


@pytest.mark.parametrize("planted", CHAT_PLANTS, indirect=True)
def test_chat_refuses_a_checkpoint_naming_custom_code(planted, tmp_path, marker, reliability):
    root, file = planted
    proc = _run(tmp_path, "chat", "--model", root, "--prompt", "hi")
    assert_refused(proc, 1, file)
    reliability.add("contents", "cli_runs", 1)


@pytest.mark.parametrize("planted", DATA_CHECK_PLANTS, indirect=True)
def test_data_check_refuses_a_checkpoint_naming_custom_code(planted, tmp_path, marker, reliability):
    """``data check`` exits 2 when it cannot check at all (1 is its "bad samples found")."""
    root, file = planted
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "A"}]}]))
    proc = _run(tmp_path, "data", "check", data, "--model", root, "--no-images")
    assert_refused(proc, 2, file)
    reliability.add("contents", "cli_runs", 1)


# --- the library's loaders ----------------------------------------------------------------------------------------
def _loaders():
    import vila_hd
    from vila_hd.hub import resolve_model_dir
    from vila_hd.loading import load_pretrained as load_model
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.modeling import load_vila_model
    from vila_hd.model.vila_layout import read_vila_config
    from vila_hd.processing import VilaHDProcessor, load_vila_processor

    return {
        "VilaHDForConditionalGeneration": VilaHDForConditionalGeneration.from_pretrained,
        "VilaHDProcessor": VilaHDProcessor.from_pretrained,
        "load_model": lambda p: load_model(p, device="cpu"),
        "vila_hd.load": lambda p: vila_hd.load(p, device="cpu"),
        "resolve_model_dir": resolve_model_dir,
        "load_vila_model": load_vila_model,
        "load_vila_processor": load_vila_processor,
        "read_vila_config": read_vila_config,
    }


OUR_LOADERS = ["VilaHDForConditionalGeneration", "VilaHDProcessor", "load_model", "vila_hd.load", "resolve_model_dir"]
VILA_LOADERS = OUR_LOADERS + ["load_vila_model", "load_vila_processor", "read_vila_config"]


@pytest.mark.parametrize("planted", list(PLANTS) + list(VILA_PLANTS), indirect=True)
def test_every_loader_refuses_a_planted_directory(planted, marker, reliability):
    root, file = planted
    names = VILA_LOADERS if "/" in file else OUR_LOADERS
    loaders = _loaders()
    for name in names:
        with pytest.raises(CustomCodeError, match=rf"key (\w+\.)*auto_map in {re.escape(file)} points at code to run "
                                                  rf"\(evil\.py\)") as err:
            loaders[name](str(root))
        assert str(root) in str(err.value), name
    reliability.add("contents", "loader_refusals", len(names))


@pytest.fixture
def ps3_dir(tiny, tmp_path) -> Path:
    """A PS3 checkpoint: vision tower, image processor and a PS3 tokenizer config (naming this directory)."""
    path = tmp_path / "ps3"
    tiny[0].vision_tower.save_pretrained(path)
    tiny[1].image_processor.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_name": str(path), "context_length": 16}))
    return path


@pytest.mark.parametrize("where", ["config.json", "preprocessor_config.json", "tokenizer_config.json"])
def test_ps3_loaders_refuse_a_planted_directory(ps3_dir, where, marker, reliability):
    from vila_hd.ps3 import PS3ImageProcessor, PS3Model, PS3Tokenizer, PS3VisionModel

    plant(ps3_dir, where, marker)
    for load in (PS3VisionModel.from_pretrained, PS3Model.from_pretrained, PS3ImageProcessor.from_pretrained,
                 PS3Tokenizer.from_pretrained, lambda p: PS3Tokenizer(p)):
        with pytest.raises(CustomCodeError, match=rf"auto_map in {re.escape(where)} "):
            load(str(ps3_dir))
    reliability.add("contents", "loader_refusals", 5)


def test_builder_and_stage_init_refuse_a_planted_llm(tiny, ps3_dir, tmp_path, marker):
    """The start of stage 1 (``init: {ps3, llm}``): the LLM directory is checked before transformers reads it."""
    from vila_hd.builder import build_vila_hd
    from vila_hd.train.config import InitConfig, StageConfig
    from vila_hd.train.stage import load_init_processor

    llm = tmp_path / "llm"
    tiny[0].language_model.save_pretrained(llm)
    tiny[1].tokenizer.save_pretrained(llm)
    plant(llm, "config.json", marker)
    for run in (lambda: build_vila_hd(ps3_dir, llm),
                lambda: load_init_processor(StageConfig(init=InitConfig(ps3=str(ps3_dir), llm=str(llm))))):
        with pytest.raises(CustomCodeError, match=r"key auto_map in config.json points at code to run"):
            run()


def test_an_adapter_directory_naming_custom_code_is_refused(checkpoint, tmp_path, marker):
    from vila_hd.hub import refuse_unsafe_adapter
    from vila_hd.loading import load_pretrained as load_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(checkpoint)}))
    (adapter / "tokenizer_config.json").write_text("{}")
    plant(adapter, "tokenizer_config.json", marker)
    with pytest.raises(CustomCodeError, match="LoRA adapter .* auto_map in tokenizer_config.json"):
        refuse_unsafe_adapter(adapter)
    with pytest.raises(CustomCodeError, match="auto_map in tokenizer_config.json"):
        load_model(str(checkpoint), str(adapter), device="cpu")


def test_asking_for_remote_code_is_refused(checkpoint):
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.ps3 import PS3ImageProcessor

    with pytest.raises(CustomCodeError, match="trust_remote_code=True is refused"):
        VilaHDForConditionalGeneration.from_pretrained(str(checkpoint), trust_remote_code=True)
    with pytest.raises(ValueError, match="never runs remote code"):
        PS3ImageProcessor.from_pretrained(str(checkpoint), trust_remote_code=True)


def test_an_empty_auto_map_and_unreadable_configs_are_left_alone(checkpoint):
    """``auto_map: {}`` names no code (transformers writes none); a config that does not parse is the loader's to
    report (see tests/cli/test_cli_errors.py), not a custom-code refusal."""
    from vila_hd.hub import refuse_custom_code

    data = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**data, "auto_map": {}}))
    (checkpoint / "processor_config.json").write_text("{not json")
    refuse_custom_code(checkpoint)


def test_hub_style_references_name_the_repository(tmp_path):
    from vila_hd.hub import refuse_custom_code

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "someone/repo--modeling.Evil"}}))
    with pytest.raises(CustomCodeError, match=r"\(someone/repo: modeling\.py\)"):
        refuse_custom_code(tmp_path)

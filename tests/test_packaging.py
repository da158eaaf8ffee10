"""What a plain ``pip install .`` installs: the wheel built from the source tree holds the one ``vila_hd``
namespace (every source module under it, nothing generic such as ``train`` or ``eval`` at top level) and the
recipes as package data, found through ``importlib.resources``."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from vila_hd import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"vila_hd": "vila_hd", "train": "vila_hd/train", "eval": "vila_hd/eval", "llava_compat": "vila_hd/compat",
           "configs": "vila_hd/configs"}
PACKAGING = ("setup.cfg", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names in a wheel built (no isolation, no network) from a copy of the source tree."""
    tree = tmp_path_factory.mktemp("src")
    for name in PACKAGING:
        shutil.copy(ROOT / name, tree / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def source_files(suffixes: tuple[str, ...]) -> set[str]:
    """Where each tracked source file of the mapped folders lands in the wheel."""
    found = set()
    for folder, target in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                found.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def test_the_wheel_installs_one_namespace(wheel_names):
    tops = {name.split("/")[0] for name in wheel_names}
    assert tops == {"vila_hd", "vila_hd-0.1.0.dist-info"}


def test_every_module_and_recipe_is_in_the_wheel(wheel_names):
    assert source_files((".py",)) - wheel_names == set()
    recipes = {n for n in source_files((".yaml", ".json")) if n.startswith("vila_hd/configs/")}
    assert recipes and recipes - wheel_names == set()
    assert {"vila_hd/configs/stages/lora.yaml", "vila_hd/configs/deepspeed/zero2.json",
            "vila_hd/configs/demo/sft.yaml"} <= wheel_names


def test_recipes_are_found_through_the_package():
    assert configs.path("stages", "lora.yaml").is_file()
    assert configs.path("deepspeed", "zero3.json").is_file()
    assert os.path.samefile(configs.path(), ROOT / "configs")  # this checkout: the editable install maps it


def test_the_repository_folders_are_not_importable_on_their_own(tmp_path):
    code = "import importlib.util as u; print([n for n in ('train', 'eval', 'llava_compat') if u.find_spec(n)])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_a_shipped_recipe_is_found_by_the_name_the_docs_use_from_any_folder(tmp_path, monkeypatch):
    from vila_hd.train.config import load_stage
    from vila_hd.train.pretrain.config import load_pretrain_config

    monkeypatch.chdir(tmp_path)
    shipped = str(configs.path("ps3", "tiny_demo.yaml"))
    for name in ("configs/ps3/tiny_demo.yaml", "ps3/tiny_demo.yaml", "tiny_demo.yaml", "tiny_demo"):
        assert configs.find(name, "ps3") == shipped, name
    assert load_stage("configs/stages/lora.yaml").lora.r > 0  # the README's path, outside a clone
    assert load_pretrain_config("tiny_demo").max_steps >= 1
    for missing in ("configs/ps3/nope.yaml", "nope", "../configs/ps3/tiny_demo.yaml", str(tmp_path / "nope.yaml")):
        assert configs.find(missing, "ps3") == missing  # the caller's open names it as written
    own = tmp_path / "configs" / "ps3" / "tiny_demo.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("max_steps: 3\n")
    assert configs.find("configs/ps3/tiny_demo.yaml", "ps3") == "configs/ps3/tiny_demo.yaml"  # a user's own wins

"""Every user error is one line, every nonsense value refused (issue #13 section 6).

A user error (a corrupt or malicious file, a bad flag or recipe key, a full disk) exits with code 1 after one
``vila-hd[ COMMAND]: error: ...`` line naming the culprit (a bad flag: argparse's exit 2); ``vila-hd --debug``
shows its traceback; a bug keeps its traceback. Most cases run in-process through ``vila_hd.cli.main``; a
handful through the installed ``vila-hd`` executable, as a user runs it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vila_hd import arguments, cli, errors

EXE = os.path.join(os.path.dirname(sys.executable), "vila-hd")
ERROR_LINE = re.compile(r"^vila-hd( [a-z-]+)*: error: ")


def one_error_line(err: str, *culprits: str) -> str:
    """The single error line of ``err`` (stderr), after checking it names every culprit and has no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """``vila-hd ARGV`` in-process: (exit code, stderr); argparse's exits become their code."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture()
def recipe(tmp_path) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"stage": "t", "init": {"preset": "tiny"}, "output_dir": str(tmp_path / "out"),
                                    "trainable": {"projector": 1e-3}, "deepspeed": "zero2"}))
    return path


# --- recipe keys: refused with the key named (exit 1), before anything is built or written -----------------
@pytest.mark.parametrize("override, culprit", [
    ("bogus.key=1", "unknown key(s) ['bogus']"),
    ("max_steps=-1", "max_steps: expected a value >= 1, got -1"),
    ("max_steps=0", "max_steps"),
    ("trainable.projector=nan", "trainable.projector: a learning rate must be a positive finite number"),
    ("trainable.projector=.inf", "trainable.projector"),
    ("seed=[1,2]", "seed: expected an integer, got [1, 2]"),
    ("seed=-1", "seed: expected a value in 0..18446744073709551615"),
    ("seed=true", "seed: expected an integer, got True"),
    ("epochs=.nan", "epochs: expected a finite number"),
    ("data.num_workers=-1", "data.num_workers: expected a value >= 0"),
    ("data.max_length=4096.5", "data.max_length: expected an integer"),
    ("logging.tensorboard=1", "logging.tensorboard: expected true or false, got 1"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ("optim.warmup_ratio=2", "optim.warmup_ratio: expected a value in [0, 1]"),
    ("lora.r=0", "lora.r: expected a value >= 1"),
    ("deepspeed=/etc/passwd", "deepspeed: /etc/passwd is not a DeepSpeed JSON config"),
    ("deepspeed=zero9", "deepspeed: 'zero9' is neither a file nor a name"),
])
def test_train_refuses_nonsense_recipe_values(capsys, recipe, tmp_path, override, culprit):
    code, err = run_main(capsys, "train", recipe, "--set", override)
    assert code == 1
    one_error_line(err, str(recipe), culprit)
    assert not (tmp_path / "out").exists()  # refused before the model is built or a checkpoint written


def test_recipe_values_of_the_right_type_are_kept(recipe):
    from vila_hd.train.config import load_stage

    config = load_stage(recipe, ["max_steps=3", "trainable.projector=2e-5", "optim.betas=[0.8, 0.9]",
                                 "data.num_workers=0", "seed=18446744073709551615"])
    assert (config.max_steps, config.trainable["projector"], config.optim.betas) == (3, 2e-5, (0.8, 0.9))
    assert config.seed == 2**64 - 1 and config.data.num_workers == 0


def test_a_recipe_that_is_not_yaml_names_its_file(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("init: {preset: tiny\nstage: [")
    code, err = run_main(capsys, "train", bad)
    assert code == 1
    one_error_line(err, f"recipe {bad}")


def test_a_missing_recipe_names_its_file(capsys, tmp_path):
    code, err = run_main(capsys, "train", tmp_path / "nope.yaml")
    assert code == 1
    one_error_line(err, f"{tmp_path / 'nope.yaml'}: No such file or directory")


# --- flags: argparse refuses them with the flag named (exit 2) --------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["chat", "--model", "m", "--temperature", "inf"], "--temperature"),
    (["chat", "--model", "m", "--temperature", "nan"], "--temperature"),
    (["chat", "--model", "m", "--seed", "99999999999999999999999"], "--seed"),
    (["chat", "--model", "m", "--seed", "-1"], "--seed"),
    (["infer", "--model", "m", "--input", "i", "--output", "o", "--seed", str(2**64)], "--seed"),
    (["data", "check", "x.json", "--workers", "-1"], "--workers"),
    (["data", "check", "x.json", "--workers", "0"], "--workers"),
    (["finetune-lora", "--model", "m", "--data", "d", "--lr", "nan"], "--lr"),
    (["finetune-lora", "--model", "m", "--data", "d", "--rank", "-4"], "--rank"),
    (["finetune-lora", "--model", "m", "--data", "d", "--epochs", "inf"], "--epochs"),
])
def test_nonsense_flags_are_refused_by_name(capsys, argv, flag):
    code, err = run_main(capsys, *argv)
    assert code == 2
    assert f"argument {flag}" in err.splitlines()[-1], err


def test_seed_bounds_are_torchs():
    import torch

    assert arguments.seed_arg(str(2**64 - 1)) == 2**64 - 1
    torch.manual_seed(arguments.seed_arg(str(2**64 - 1)))  # the largest accepted seed is one torch takes
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)  # and the first refused is one torch refuses too


def test_data_check_refuses_set_keys_it_does_not_read(capsys, recipe, tmp_path):
    code, err = run_main(capsys, "data", "check", recipe, "--set", "seed=3", "--no-images")
    assert code == 2
    line = err.splitlines()[-1]
    assert "--set seed=3" in line and "init, data.registry, data.datasets, data.mixture, data.max_length" in line
    data = tmp_path / "d.json"
    data.write_text("[]")
    code, err = run_main(capsys, "data", "check", data, "--set", "data.max_length=64")
    assert code == 2 and "not one" in err.splitlines()[-1]


# --- files: a corrupt or malicious checkpoint file is named ---------------------------------------------
@pytest.fixture()
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def test_corrupt_safetensors_is_named(capsys, checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    code, err = run_main(capsys, "chat", "--model", checkpoint, "--prompt", "hi")
    assert code == 1
    one_error_line(err, f"{checkpoint / 'model.safetensors'} is not a valid safetensors file")


def test_convert_names_a_corrupt_safetensors_file(capsys, checkpoint, tmp_path):
    (checkpoint / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{bad json")
    code, err = run_main(capsys, "convert", "--to", "vila", checkpoint, tmp_path / "out")
    assert code == 1
    one_error_line(err, f"{checkpoint / 'model.safetensors'} is not a valid safetensors file")


def test_an_eval_string_dtype_is_refused_not_looked_up(capsys, checkpoint, tmp_path):
    marker = tmp_path / "ran"
    config = json.loads((checkpoint / "config.json").read_text())
    config["dtype"] = f"__import__('os').system('touch {marker}')"
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, err = run_main(capsys, "chat", "--model", checkpoint, "--prompt", "hi")
    assert code == 1
    one_error_line(err, str(checkpoint), "config.json", "dtype=", "is not a torch dtype")
    assert not marker.exists()


def test_an_unsafe_chat_template_is_named(capsys, checkpoint):
    (checkpoint / "chat_template.jinja").write_text("{{ messages[0].content.__class__.__mro__ }}")
    code, err = run_main(capsys, "chat", "--model", checkpoint, "--prompt", "hi")
    assert code == 1
    one_error_line(err, f"the chat template in {checkpoint / 'chat_template.jinja'} cannot be used", "unsafe")


def test_a_full_disk_names_the_output(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    import transformers.modeling_utils as modeling_utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "out"
    code, err = run_main(capsys, "convert", "--to", "hf", tiny_checkpoint, out)
    assert code == 1
    one_error_line(err, f"{out}: No space left on device", "the disk is full")


def test_os_errors_say_what_to_do():
    denied = errors.describe(PermissionError(errno.EACCES, "Permission denied", "/data/x.json"))
    assert denied == "/data/x.json: Permission denied (check the file's permissions, or choose another path)"
    assert errors.is_user_error(PermissionError(errno.EACCES, "Permission denied"))


# --- --debug, and bugs -------------------------------------------------------------------------------------
def test_debug_shows_the_traceback_of_a_user_error(recipe):
    with pytest.raises(errors.ConfigError, match="max_steps"):
        cli.main(["--debug", "train", str(recipe), "--set", "max_steps=-1"])


def leaf_commands(commands, prefix=()):
    for command in commands:
        if command.subcommands:
            yield from leaf_commands(command.subcommands, (*prefix, command.name))
        else:
            yield (*prefix, command.name)


@pytest.mark.parametrize("names", list(leaf_commands(cli.COMMANDS.values())), ids=" ".join)
def test_every_commands_help_lists_debug(capsys, names):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*names, "--help"])
    assert exit_info.value.code == 0
    assert "--debug" in capsys.readouterr().out


def hide_module(monkeypatch, hidden: str) -> None:
    """Make ``importlib.util.find_spec`` report ``hidden`` as not installed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a))


@pytest.mark.parametrize(
    "extra, module, argv",
    [
        ("train", "deepspeed", ["train", "no-recipe.yaml"]),
        ("train", "peft", ["train", "lora"]),  # the shipped LoRA recipe
        ("train", "deepspeed", ["finetune-lora", "--model", "m", "--data", "d.json", "--output-dir", "out"]),
        ("train", "peft", ["finetune-lora", "--model", "m", "--data", "d.json", "--output-dir", "out"]),
        ("train", "peft", ["merge-lora", "--adapter", "a", "--out", "out"]),
        ("train", "deepspeed", ["pretrain", "no-recipe.yaml"]),
        ("train", "deepspeed", ["demo", "--out", "out"]),
        ("serve", "uvicorn", ["serve", "--model", "m"]),
    ],
    ids=lambda value: value if isinstance(value, str) else value[0],
)
def test_a_missing_extra_is_named_before_any_work(capsys, monkeypatch, tmp_path, extra, module, argv):
    monkeypatch.chdir(tmp_path)
    hide_module(monkeypatch, module)
    code, err = run_main(capsys, *argv)
    line = one_error_line(err, f"vila-hd {argv[0]}", f"'{extra}' extra", f"({module} not installed)",
                          f"pip install 'vila-hd[{extra}]'")
    assert code == 1 and line.startswith("vila-hd: error: "), err
    assert list(tmp_path.iterdir()) == []  # refused before reading or writing anything


@pytest.mark.parametrize(
    "module, argv, culprit",
    [
        ("deepspeed", ["merge-lora", "--adapter", "no-adapter", "--out", "out"], "no-adapter"),  # peft is enough
        ("peft", ["train", "no-recipe.yaml"], "no-recipe.yaml"),  # a recipe without LoRA: DeepSpeed is enough
    ],
    ids=lambda value: value if isinstance(value, str) else value[0],
)
def test_only_what_a_command_imports_is_required(capsys, monkeypatch, tmp_path, module, argv, culprit):
    monkeypatch.chdir(tmp_path)
    hide_module(monkeypatch, module)
    code, err = run_main(capsys, *argv)
    assert code != 0 and "extra" not in err and culprit in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import vila_hd.train.cli

    def broken(argv):
        return {}["missing"]

    monkeypatch.setattr(vila_hd.train.cli.MERGE_LORA, "run", broken)
    with pytest.raises(KeyError):
        cli.main(["merge-lora", "--adapter", "a", "--out", "b"])
    assert not errors.is_user_error(TypeError("x")) and not errors.is_user_error(AttributeError("y"))


def test_a_value_error_from_a_library_is_a_bug_but_ours_is_a_refusal():
    import torch

    try:
        torch.zeros(2).view(3)
    except RuntimeError as err:
        assert not errors.is_user_error(err)
    try:
        int("x")
    except ValueError as err:
        assert not errors.is_user_error(err)  # raised inside Python, not by project code
    from vila_hd.train.config import stage_from_dict

    with pytest.raises(ValueError) as info:
        stage_from_dict({"init": {"preset": "tiny"}, "precision": "fp8"})
    assert errors.is_user_error(info.value)


# --- through the installed executable -----------------------------------------------------------------------
def vila_hd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([EXE, *map(str, args)], cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                          timeout=300)


def test_executable_one_line_errors_and_debug(recipe, tmp_path, checkpoint):
    bogus = vila_hd("train", recipe, "--set", "bogus.key=1", cwd=tmp_path)
    assert bogus.returncode == 1
    one_error_line(bogus.stderr, "unknown key(s) ['bogus']")

    debug = vila_hd("--debug", "train", recipe, "--set", "bogus.key=1", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr

    seed = vila_hd("chat", "--model", checkpoint, "--seed", "99999999999999999999999", cwd=tmp_path)
    assert seed.returncode == 2 and "Traceback" not in seed.stderr
    assert "argument --seed" in seed.stderr.splitlines()[-1]

    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    corrupt = vila_hd("convert", "--to", "vila", checkpoint, tmp_path / "out", cwd=tmp_path)
    assert corrupt.returncode == 1
    one_error_line(corrupt.stderr, f"{checkpoint / 'model.safetensors'} is not a valid safetensors file")


def test_executable_full_disk_on_dev_full(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yo"}]}]))
    full = vila_hd("data", "check", data, "--no-images", "--json", "/dev/full", cwd=tmp_path)
    assert full.returncode == 1
    one_error_line(full.stderr, "/dev/full: No space left on device", "the disk is full")


def test_project_error_types_are_user_errors(capsys, monkeypatch):
    from vila_hd.eval.benchmarks.base import FormatError
    from vila_hd.eval.harness import MissingRepliesError
    from vila_hd.images import ImageLoadError
    from vila_hd.train.checkpoint import UnsafeCheckpointError
    from vila_hd.train.pretrain.data import RecordError

    for kind in (FormatError, MissingRepliesError, UnsafeCheckpointError, RecordError, ImageLoadError):
        assert issubclass(kind, errors.VilaHDError) and issubclass(kind, ValueError), kind
    assert issubclass(UnsafeCheckpointError, RuntimeError)  # what callers caught before
    import vila_hd.train.cli

    def refuse(argv):
        raise UnsafeCheckpointError("/ckpt/step_2/model_states.pt holds objects other than tensors")

    monkeypatch.setattr(vila_hd.train.cli.MERGE_LORA, "run", refuse)
    code, err = run_main(capsys, "merge-lora", "--adapter", "a", "--out", "b")
    assert code == 1
    one_error_line(err, "/ckpt/step_2/model_states.pt holds objects other than tensors")


# --- the `python -m` entry points (torchrun / deepspeed launch these) behave as `vila-hd` does ------------------
@pytest.mark.parametrize("module, argv, code, stream, expected", [
    ("vila_hd.train.cli", ["train", "nope.yaml"], 1, "stderr", "vila-hd: error: nope.yaml: No such file"),
    ("vila_hd.train.pretrain.loop", ["nope.yaml"], 1, "stderr", "vila-hd: error: nope.yaml: No such file"),
    ("vila_hd.eval.cli", ["eval", "--benchmark", "jsonl", "--data", ".", "--model", "m", "--output", "o"], 1,
     "stderr", "vila-hd: error: "),
    ("vila_hd.train.cli", ["--help"], 0, "stdout", "  finetune-lora  LoRA fine-tuning"),
    ("vila_hd.eval.cli", [], 2, "stderr", "usage: python -m vila_hd.eval.cli {eval,synth} ..."),
    ("vila_hd.serve.cli", ["--help"], 0, "stdout", "usage: vila-hd serve"),
])
def test_module_entry_points_report_like_vila_hd(tmp_path, module, argv, code, stream, expected):
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    out = getattr(proc, stream)
    assert proc.returncode == code and expected in out, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr

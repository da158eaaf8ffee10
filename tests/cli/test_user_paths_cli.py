"""What a new user sees from ``convert`` / ``eval`` / ``infer`` / ``merge-lora``: help texts written for users (no
reStructuredText markup, no internal docstrings), and no DeepSpeed banner from commands that never train (one
subprocess each through the installed ``vila-hd``: the banner is printed once per process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from train_helpers import fresh_job_env

from vila_hd import cli

BANNER = "Setting accelerator to"  # DeepSpeed's accelerator detection on a machine without a GPU


@pytest.mark.parametrize("command", [["convert"], ["infer"], ["eval"], ["chat"]])
def test_help_descriptions_are_user_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for markup in ("``", ":func:", ":class:", ":mod:", "Command lines of", "eval_main", "Entry point"):
        assert markup not in out, (command, markup)
    description = out.split("\n\n")[1]  # the paragraph after the usage lines
    assert len(description) > 20 and not description.startswith(("usage:", "options:")), description


def vila_hd(*args: str, cwd) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "vila-hd")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("vila-hd") or pytest.fail("no vila-hd console script: install the package")
    env = {**fresh_job_env(), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, encoding="utf-8", timeout=300)


def test_convert_prints_no_deepspeed_banner(tiny_checkpoint, tmp_path):
    proc = vila_hd("convert", "--to", "hf", str(tiny_checkpoint), str(tmp_path / "hf"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert BANNER not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stdout.strip().endswith(f"wrote hf checkpoint to {tmp_path / 'hf'}")


def test_merge_lora_prints_no_deepspeed_banner(tiny_checkpoint, tmp_path):
    pytest.importorskip("peft")
    from vila_hd.train.config import LoraConfig
    from vila_hd.train.lora import apply_lora, load_base_model, save_adapter

    model, processor = load_base_model(str(tiny_checkpoint))
    adapter = tmp_path / "adapter"
    save_adapter(apply_lora(model, LoraConfig(r=2, alpha=4), ["llm"]), str(adapter), processor, str(tiny_checkpoint))
    proc = vila_hd("merge-lora", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert BANNER not in proc.stderr + proc.stdout, proc.stderr
    assert (tmp_path / "merged" / "config.json").is_file()

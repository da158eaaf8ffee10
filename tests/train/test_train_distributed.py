"""Two processes (gloo on CPU) under torchrun: a ZeRO-2 stage, then a ZeRO-3 bf16 stage started from its
export. The 2-process ZeRO-2 losses match a 1-process run of the same global batch (same samples per step,
loss normalised by the global number of target tokens)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import testpaths
import torch
import yaml
from safetensors.torch import load_file
from tolerances import fp_approx
from train_helpers import fresh_job_env, losses, make_dataset, one_thread, stage_dict  # noqa: F401

pytest.importorskip("deepspeed")

from vila_hd.model.parts import part_of  # noqa: E402
from vila_hd.train.config import stage_from_dict  # noqa: E402
from vila_hd.train.stage import run_stage  # noqa: E402

ROOT = testpaths.REPO_ROOT


def torchrun(config: dict, tmp_path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = fresh_job_env()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vila_hd.train.cli", "train", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_zero2_then_zero3_stages_on_two_processes(tmp_path, one_thread):  # noqa: F811
    data = make_dataset(str(tmp_path / "data"), n=8)
    align = stage_dict(data, str(tmp_path / "align"), max_steps=3, trainable={"projector": 1e-2},
                       **{"checkpoint.every_steps": 2, "deepspeed": "zero2"})
    torchrun(align, tmp_path, "align")
    # Same recipe in one process: identical samples per step, identical global normalisation.
    single = dict(align, output_dir=str(tmp_path / "align_1proc"))
    run_stage(stage_from_dict(single))
    two, one = losses(align["output_dir"]), losses(single["output_dir"])
    for step in (1, 2, 3):
        assert two[step] == fp_approx(one[step]), (step, two, one)

    first = load_file(os.path.join(align["output_dir"], "final", "model.safetensors"))
    from vila_hd.builder import build_tiny_model

    init, _ = build_tiny_model("tiny", seed=42)
    for name, value in init.state_dict().items():
        if name in first:
            same = torch.equal(first[name], value)
            assert same != (part_of(name) == "projector"), name

    sft = stage_dict(data, str(tmp_path / "sft"), max_steps=3, precision="bf16", deepspeed="zero3",
                     init={"model": os.path.join(align["output_dir"], "final")},
                     trainable={"projector": 1e-3, "prompt_head": 1e-3, "selection": 1e-3, "vision_tower": 1e-3,
                                "llm": 1e-3}, **{"checkpoint.every_steps": 2})
    torchrun(sft, tmp_path, "sft")
    curve = losses(sft["output_dir"])
    assert sorted(curve) == [1, 2, 3] and all(v == v and v < 100 for v in curve.values())
    from vila_hd.model import VilaHDForConditionalGeneration

    model, info = VilaHDForConditionalGeneration.from_pretrained(os.path.join(sft["output_dir"], "final"),
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    second = load_file(os.path.join(sft["output_dir"], "final", "model.safetensors"))
    for name, value in second.items():
        before = first[name].to(value.dtype)
        if part_of(name) is None:
            assert torch.equal(value, before), name  # never trained
        elif name.endswith("layers.2.weight") or "selection_feature_proj.fc1.weight" in name:
            assert not torch.equal(value, before), name  # trained under ZeRO-3 (partitions gathered at export)
    checkpoints = os.listdir(os.path.join(sft["output_dir"], "checkpoints"))
    assert "step_00000002" in checkpoints and "step_00000003" in checkpoints

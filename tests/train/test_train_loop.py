"""The DeepSpeed training loop in one process (CPU, gloo): memorisation, frozen parts, exact resume,
a SIGKILL while a checkpoint is written, LoRA save / reload / merge."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import testpaths
import torch
from safetensors.torch import load_file
from tolerances import assert_fp_close
from train_helpers import fresh_job_env, lm_losses, losses, make_dataset, one_thread, stage_dict  # noqa: F401

pytest.importorskip("deepspeed")

from vila_hd.builder import build_tiny_model  # noqa: E402
from vila_hd.model.parts import part_of  # noqa: E402
from vila_hd.train.config import stage_from_dict  # noqa: E402
from vila_hd.train.stage import run_stage  # noqa: E402

ROOT = testpaths.REPO_ROOT


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):  # noqa: F811
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), n=8)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """6 steps in one go (the reference of the resume tests)."""
    out = str(tmp_path_factory.mktemp("full"))
    run_stage(stage_from_dict(stage_dict(data, out)))
    return out


def test_memorisation_loss_goes_down_and_frozen_parts_stay_bit_identical(data, tmp_path):
    out = str(tmp_path / "mem")
    cfg = stage_from_dict(stage_dict(data, out, max_steps=14, trainable={"projector": 1e-2, "llm": 1e-2},
                                     **{"batch.global_batch_size": 8, "checkpoint.every_steps": 100,
                                        "loss.selection_weight": 0.0}))
    run = run_stage(cfg)
    curve = lm_losses(out)
    assert curve[14] < 0.4 * curve[1] and max(curve[s] for s in (12, 13, 14)) < min(curve[s] for s in (1, 2, 3)), curve
    initial, _ = build_tiny_model("tiny", seed=cfg.seed)
    before = initial.state_dict()
    after = load_file(os.path.join(out, "final", "model.safetensors"))
    trained = changed = 0
    for name, value in before.items():
        if name not in after:  # tied / non-persistent entries
            continue
        if part_of(name) in ("projector", "llm"):
            trained += 1
            changed += not torch.equal(after[name], value)
        else:
            assert torch.equal(after[name], value), f"frozen {name} changed"
    assert changed == trained > 0  # every trainable tensor moved
    assert run.metrics["step"] == 14


def test_resume_continues_exactly(data, uninterrupted, tmp_path):
    out = str(tmp_path / "resumed")
    cfg = stage_from_dict(stage_dict(data, out))
    run_stage(cfg, until=3)  # "preempted" after step 3 (its checkpoint written)
    assert sorted(losses(out)) == [1, 2, 3]
    run_stage(cfg)  # picks up checkpoints/latest
    ref, got = losses(uninterrupted), losses(out)
    for step in range(1, 7):
        assert got[step] == ref[step], (step, got[step], ref[step])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000004", "step_00000006"]


KILL_SCRIPT = """
import os, signal, sys, json
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch; torch.set_num_threads(1)
import vila_hd.train.checkpoint as ck
from vila_hd.train.config import stage_from_dict
from vila_hd.train.stage import run_stage
from train_helpers import stage_dict
publish = ck._publish
def dying_publish(tmp, final):
    if final.endswith("step_00000004"):
        os.kill(os.getpid(), signal.SIGKILL)  # everything written, not yet renamed
    publish(tmp, final)
ck._publish = dying_publish
run_stage(stage_from_dict(stage_dict({data!r}, {out!r})))
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(data, uninterrupted, tmp_path):
    out = str(tmp_path / "killed")
    script = KILL_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=data, out=out)
    env = fresh_job_env()  # a fresh one-process job
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == [".tmp-step_00000004", "latest", "step_00000002"]
    with open(os.path.join(root, "latest")) as f:
        assert f.read() == "step_00000002"
    run_stage(stage_from_dict(stage_dict(data, out)))
    assert not os.path.exists(os.path.join(root, ".tmp-step_00000004"))
    ref, got = losses(uninterrupted), losses(out)
    for step in range(3, 7):  # steps 3 and 4 were run twice: the resumed values are the last ones logged
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def test_lora_checkpoint_reload_and_merge(data, tmp_path):
    from transformers import AutoModelForImageTextToText  # noqa: F401  (registers nothing; import check)

    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.train.cli import merge_lora_main
    from vila_hd.train.lora import load_adapter_model

    out = str(tmp_path / "lora")
    cfg = stage_from_dict(stage_dict(data, out, max_steps=3, trainable={"llm": 1e-2, "projector": 1e-2,
                                                                        "prompt_head": 1e-2, "selection": 1e-2},
                                     lora={"r": 4, "alpha": 8, "dropout": 0.1},
                                     **{"checkpoint.every_steps": 2}))
    run = run_stage(cfg)
    adapter = os.path.join(out, "final")
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_00000002", "adapter", "adapter_model.safetensors"))
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors")).keys()
    assert any("lora_A" in k for k in keys) and any("mm_projector" in k for k in keys)
    assert any("selection_feature_proj" in k for k in keys)

    model, processor = run.model.eval(), run.processor
    inputs = processor(text=processor.apply_chat_template([{"role": "user", "content": "Where is the cat?"}]))
    with torch.no_grad():
        trained = model(**inputs).logits
        reloaded, _ = load_adapter_model(adapter)
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, trained, rtol=0, atol=0)
    # An adapter of any checkpoint loads too (here step 2: different weights from the final ones).
    with torch.no_grad():
        earlier, _ = load_adapter_model(os.path.join(out, "checkpoints", "step_00000002", "adapter"))
        assert not torch.equal(earlier.eval()(**inputs).logits, trained)

    merged_dir = str(tmp_path / "merged")
    assert merge_lora_main(["--adapter", adapter, "--out", merged_dir]) == 0
    merged, info = VilaHDForConditionalGeneration.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert_fp_close(merged.eval()(**inputs).logits, trained)
    # The inference loader of chat / eval takes the adapter directory directly.
    from vila_hd.loading import load_pretrained as load_model

    chat_model, _ = load_model(adapter, device="cpu", dtype="float32")
    with torch.no_grad():
        assert_fp_close(chat_model(**inputs).logits, trained)


def test_finetune_lora_cli_on_a_custom_dataset_then_data_check_and_merge(data, tmp_path, tiny_checkpoint):
    """The README's worked example on a tiny checkpoint: data check -> finetune-lora -> merge-lora -> chat."""
    from vila_hd.loading import load_pretrained as load_model
    from vila_hd.train.cli import data_main, finetune_lora_main, merge_lora_main

    base = str(tiny_checkpoint)
    media = os.path.join(os.path.dirname(data), "images")
    assert data_main(["check", data, "--media", media, "--model", base, "--num-look-close", "2"]) == 0
    out = str(tmp_path / "lora")
    code = finetune_lora_main(["--model", base, "--data", data, "--media", media, "--output-dir", out, "--rank", "4",
                               "--micro-batch-size", "2", "--global-batch-size", "4", "--max-length", "512",
                               "--set", "max_steps=2", "--set", "precision=fp32", "--set", "look_close.num_look_close=2",
                               "--set", "look_close.num_token_look_close=null", "--set", "logging.progress_bar=false",
                               "--set", "logging.tensorboard=false", "--set", "data.num_workers=0"])
    assert code == 0
    assert merge_lora_main(["--adapter", os.path.join(out, "final"), "--out", str(tmp_path / "merged")]) == 0
    merged, processor = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32")
    inputs = processor(text=processor.apply_chat_template([{"role": "user", "content": "Where is the cat?"}]))
    out_ids = merged.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out_ids.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_a_stage_that_cannot_learn_fails_at_start(data, tmp_path):
    with pytest.raises(ValueError, match="trains nothing"):
        run_stage(stage_from_dict(stage_dict(data, str(tmp_path / "none"), trainable={})))
    # Every sample of this data set is rejected (its images are missing): no label to learn from.
    import json

    broken = tmp_path / "broken.json"
    records = json.load(open(data))
    for r in records:
        r["image"] = "missing.png"
    broken.write_text(json.dumps(records))
    cfg = stage_dict(str(broken), str(tmp_path / "nolabels"))
    cfg["data"]["datasets"]["toy"]["media"] = os.path.join(os.path.dirname(data), "images")
    with pytest.raises(RuntimeError, match=r"no trainable labels.*missing image"):
        run_stage(stage_from_dict(cfg))

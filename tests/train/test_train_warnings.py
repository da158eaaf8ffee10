"""What a user sees during ``vila-hd finetune-lora``: the progress bar, and none of the warnings that are ours to
fix -- DataLoader workers beyond the cores, transformers' ``is_gradient_checkpointing`` FutureWarning (read by
peft), DeepSpeed's accelerator / op-build banners."""

from __future__ import annotations

import os
import subprocess
import sys

from train_helpers import fresh_job_env, make_dataset

from vila_hd.train.stage import loader_workers

VILA_HD = os.path.join(os.path.dirname(sys.executable), "vila-hd")
NOISE = ("worker processes in total", "is_gradient_checkpointing", "FutureWarning", "Setting accelerator to",
         "Setting ds_accelerator to", "built successfully", "Traceback")


def test_default_loader_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(None) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(None) == 4
    assert loader_workers(0) == 0 and loader_workers(6) == 6  # a recipe's own value is kept


def test_finetune_lora_prints_no_library_noise(tiny_checkpoint, tmp_path):
    data = make_dataset(str(tmp_path / "data"), n=4)
    env = dict(fresh_job_env(), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [VILA_HD, "finetune-lora", "--model", str(tiny_checkpoint), "--data", data, "--media",
         str(tmp_path / "data" / "images"), "--output-dir", str(tmp_path / "lora"), "--set", "max_steps=2",
         "--set", "batch.global_batch_size=2", "--set", "precision=fp32", "--set", "logging.tensorboard=false"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train:" in proc.stderr and "2/2" in proc.stderr  # the progress bar stays
    for noise in NOISE:
        assert noise not in proc.stderr, (noise, proc.stderr[-2000:])
        assert noise not in proc.stdout, (noise, proc.stdout[-2000:])


def test_lora_wrap_and_adapter_load_raise_no_deprecation_warning(tiny, tmp_path):
    """peft reads transformers' deprecated ``is_gradient_checkpointing``; wrapping (training) and loading an
    adapter (chat / eval / merge) must not surface that FutureWarning."""
    import copy
    import warnings

    from vila_hd.loading import _apply_adapter
    from vila_hd.train.config import LoraConfig
    from vila_hd.train.lora import apply_lora, save_adapter

    model, processor = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(copy.deepcopy(model), LoraConfig(r=2, alpha=2, dropout=0.0), ["llm", "projector"])
        save_adapter(peft_model, str(tmp_path / "adapter"), processor, str(base))
        _apply_adapter(copy.deepcopy(model), str(tmp_path / "adapter"), merge=False)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]

"""Tiny training fixtures shared by the training tests (and the subprocess scripts they launch)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

QA = [("What color is the car?", "The car is red."), ("How many people are in the picture?", "There are two people."),
      ("Read the text on the sign.", "The sign says stop."), ("Where is the cat?", "The cat is on the table."),
      ("What is written at the bottom?", "Numbers 0123456789."), ("Describe the image.", "A street with a tree.")]


# What a launcher (and an in-process one-process run, see vila_hd.train.trainer.init_distributed) puts in the environment.
LAUNCHER_ENV = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})


def fresh_job_env() -> dict[str, str]:
    """This process's environment without the launcher variables: a subprocess starts a job of its own (an
    inherited MASTER_PORT would still be held by this process's group)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention (x50)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(folder: str, n: int = 8, seed: int = 0) -> str:
    """A LLaVA JSON of ``n`` samples (images, a few boxes, one text-only sample); returns its path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if i % 4 != 3:
            name = f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(
                os.path.join(folder, "images", name))
            rec["image"] = name
            if i % 2 == 0:
                rec["box"] = [4, 4, 40, 30]
        records.append(rec)
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def stage_dict(data: str, output_dir: str, **overrides) -> dict:
    """A tiny-preset stage recipe (fp32 so frozen weights stay bit-identical; no bar, no TensorBoard)."""
    folder = os.path.dirname(data)
    cfg = {
        "stage": "test",
        "init": {"preset": "tiny"},
        "output_dir": output_dir,
        "trainable": {"projector": 3e-3, "llm": 3e-3},
        "data": {"datasets": {"toy": {"path": data, "media": os.path.join(folder, "images")}},
                 "max_length": 512, "num_workers": 0},
        "look_close": {"num_look_close": 2, "num_token_look_close": None},
        "loss": {"selection_weight": 1.0},
        "optim": {"warmup_steps": 1},
        "batch": {"micro_batch_size": 2, "global_batch_size": 4},
        "max_steps": 6,
        "precision": "fp32",
        "deepspeed": "zero2",
        "gradient_checkpointing": {"llm": True, "vision_tower": True},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def losses(output_dir: str) -> dict[int, float]:
    """Total loss per step from metrics.jsonl (the last entry of a step wins)."""
    out = {}
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def lm_losses(output_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss/lm"]
    return out


def step_samples(processor, folder, look_close: dict, uint8_pixels: bool = False) -> list:
    """Three encoded samples for the training forward: one image with a box, text only, two images (one boxed)."""
    from vila_hd.compat import datasets as ds
    from vila_hd.train.data.dataset import SampleEncoder

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (50 + 20 * i, 80, 3), dtype=np.uint8)).save(paths[-1])
    qa = [{"role": "user", "content": "<image>\nWhat color is the car?"}, {"role": "assistant", "content": "Red."}]
    raw = [ds.RawSample("a", qa, paths[:1], [[5, 5, 40, 30]]),
           ds.RawSample("b", [{"role": "user", "content": "Read the sign."}, {"role": "assistant", "content": "Stop."}]),
           ds.RawSample("c", [{"role": "user", "content": "<image>\n<image>\nCompare."},
                              {"role": "assistant", "content": "The second is larger."}], paths[1:], [None, [0, 0, 60, 60]])]
    enc = SampleEncoder(processor, 2048, look_close, uint8_pixels=uint8_pixels)
    return [enc.encode(s, i) for i, s in enumerate(raw)]

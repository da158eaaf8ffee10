"""GPU checks (run where a CUDA device is lent; skipped elsewhere by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from vila_hd.ps3 import PS3VisionModel
from vila_hd.ps3.configuration import tiny_vision_config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def test_ps3_cuda_matches_cpu():
    torch.manual_seed(0)
    model = PS3VisionModel(tiny_vision_config([378, 756, 1512])).eval()
    x = torch.randn(2, 3, 1512, 1512)
    # "all" makes the selection independent of rounding near top-k ties, so the tokens line up.
    cpu = model(x, num_look_close="all", output_layers=[-2])
    gpu = model.cuda()(x.cuda(), num_look_close="all", output_layers=[-2])
    assert gpu.last_hidden_state.shape == cpu.last_hidden_state.shape == (2, 15309, 32)
    torch.testing.assert_close(gpu.last_hidden_state.cpu(), cpu.last_hidden_state, rtol=1e-4, atol=1e-4)
    for a, b in zip(cpu.selection_probs, gpu.selection_probs):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    steps = model(x.cuda(), num_look_close=3, output_layers=[-2])
    assert steps.last_hidden_state.shape == (2, 729 + 3 * 2560, 32)
    assert [int(m.sum()) for m in steps.selection_maps] == [2 * 3 * 512, 2 * 3 * 2048]
    half = model.to(torch.bfloat16)(x.cuda().bfloat16(), num_look_close=3, output_layers=[-2])
    assert half.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(half.last_hidden_state).all()
    assert half.last_hidden_state.shape == steps.last_hidden_state.shape


@torch.no_grad()
def test_vila_hd_generation_cuda_matches_cpu():
    from PIL import Image

    from vila_hd.model.tiny import build_tiny_model

    model, processor = build_tiny_model("tiny", seed=1)
    chat = [{"role": "user", "content": "<image>\nWhat colour is the small square?"}]
    inputs = processor(text=processor.apply_chat_template(chat), images=[Image.new("RGB", (640, 480), "teal")])
    cpu = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    gpu = model.cuda().generate(**inputs.to("cuda"), max_new_tokens=8, do_sample=False)
    assert torch.equal(cpu, gpu.cpu())

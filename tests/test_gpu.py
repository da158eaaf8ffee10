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

    from vila_hd.builder import build_tiny_model

    model, processor = build_tiny_model("tiny", seed=1)
    chat = [{"role": "user", "content": "<image>\nWhat colour is the small square?"}]
    inputs = processor(text=processor.apply_chat_template(chat), images=[Image.new("RGB", (640, 480), "teal")])
    cpu = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    gpu = model.cuda().generate(**inputs.to("cuda"), max_new_tokens=8, do_sample=False)
    assert torch.equal(cpu, gpu.cpu())


@torch.no_grad()
def test_merged_prefix_attention_on_cuda_matches_concatenation():
    """cuDNN/flash log-sum-exp statistics merge into the concatenated attention (bf16 and fp32)."""
    from vila_hd.ps3.layers import Attention

    torch.manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        attn = Attention(1152, 16, "concat").cuda().to(dtype)
        x = torch.randn(6, 2560, 1152, device="cuda", dtype=dtype)
        for prefix_batch in (1, 6):
            prefix = tuple(torch.randn(prefix_batch, 729, 1152, device="cuda", dtype=dtype) for _ in range(2))
            attn.prefix_mode = "concat"
            joined, _ = attn(x, prefix)
            attn.prefix_mode = "merge"
            merged, _ = attn(x, prefix)
            torch.testing.assert_close(merged.float(), joined.float(), rtol=tol, atol=tol)


@torch.no_grad()
def test_low_res_cuda_graph_replays_the_eager_pass():
    torch.manual_seed(0)
    model = PS3VisionModel(tiny_vision_config([378, 756, 1512])).eval().cuda()
    enc = model.vision_model
    x, y = torch.randn(2, 1, 3, 1512, 1512, device="cuda").unbind(0)
    enc.config.low_res_cuda_graph = False
    eager_x, eager_y = enc.encode_low_res(x), enc.encode_low_res(y)
    enc.config.low_res_cuda_graph = True
    graph_x = enc.encode_low_res(x)
    graph_y = enc.encode_low_res(y)  # a replay must not overwrite what the first call returned
    assert len(enc._low_res_graphs) == 1
    for eager, graph in ((eager_x, graph_x), (eager_y, graph_y)):
        for a, b in zip(eager.hidden_states + [k for kv in eager.kv_cache for k in kv],
                        graph.hidden_states + [k for kv in graph.kv_cache for k in kv]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph.selection_features, eager.selection_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph.highres_selection_features, eager.highres_selection_features,
                                   rtol=1e-5, atol=1e-5)
    enc.trunk.blocks[0].mlp.fc1.weight.add_(0.5)  # in-place updates are seen by the replay
    enc.config.low_res_cuda_graph = False
    eager = enc.encode_low_res(x).hidden_states[-1]
    enc.config.low_res_cuda_graph = True
    torch.testing.assert_close(enc.encode_low_res(x).hidden_states[-1], eager, rtol=1e-5, atol=1e-5)
    model.to(torch.bfloat16)  # new weight memory: the graphs are captured again
    half = enc.encode_low_res(x.bfloat16())
    assert half.hidden_states[-1].dtype == torch.bfloat16 and len(enc._low_res_graphs) == 1
    with torch.enable_grad():  # autograd never replays a graph
        enc.encode_low_res(x.bfloat16())
    assert len(enc._low_res_graphs) == 1


@torch.no_grad()
def test_segment_attention_on_cuda_matches_the_masked_path():
    from vila_hd.model.attention import segment_attention, segment_table

    torch.manual_seed(0)
    q = torch.randn(2, 12, 700, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    segments = (((0, 300), (300, 650)), ((0, 700),))
    ours, _ = segment_attention(torch.nn.Module(), q, k, v, None, segments=segment_table(segments))
    for r, spans in enumerate(segments):
        for start, end in spans:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[r:r + 1, :, start:end], k[r:r + 1, :, start:end].repeat_interleave(6, 1),
                v[r:r + 1, :, start:end].repeat_interleave(6, 1), is_causal=True).transpose(1, 2)
            torch.testing.assert_close(ours[r:r + 1, start:end], ref, rtol=2e-2, atol=2e-2)


def test_the_training_forward_and_look_close_never_synchronise_on_cuda(tmp_path):
    """What tests/train/test_train_step.py counts on the CPU, checked by CUDA itself: torch raises on any operation that
    waits for the device (including blocking copies from the host)."""
    from train_helpers import step_samples

    from vila_hd.builder import build_tiny_model
    from vila_hd.train.data.collate import Collator
    from vila_hd.train.model_step import VilaHDTrainStep
    from vila_hd.train.trainer import _to_device

    model, processor = build_tiny_model("tiny", seed=3)
    model = model.cuda().train()
    look = {"num_look_close": 2}
    low_res = model.image_token_layout((448, 448), **look).num_low_res_tokens
    collate = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, packing=True,
                       image_token_id=processor.image_token_id, low_res_tokens=low_res)
    batch = _to_device(collate(step_samples(processor, tmp_path, look, uint8_pixels=True)), torch.device("cuda"))
    step = VilaHDTrainStep(model, look, normalize=processor.image_processor.normalize)
    enc = model.vision_tower.vision_model
    pixels = torch.randn(2, 3, 448, 448, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(batch)
        with torch.no_grad():
            enc.look_close(enc.encode_low_res(pixels), num_look_close=2, prompt=torch.randn(2, enc.width, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["lm"]).item()

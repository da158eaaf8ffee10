"""End-to-end VILA-HD latency per 3840x2160 image + a one-sentence question + 1 generated token.

The real VILA-HD-8B-4K architecture (PS3-4K-SigLIP2 + Qwen2-7B) with random weights in bf16 at 6%,
18% and 35% selection, next to transformers' ``Qwen2VLForConditionalGeneration`` with the Qwen2-VL-7B
architecture (random weights) on the same image at native resolution and at a 4 MP cap, all in one run.
Components are timed separately (PS3 = low-res pass + look-close; prefix = the LLM over the top-down
prefix; prefill = the LLM over the full sequence); "total" is ``generate(max_new_tokens=1)``.
Without CUDA it runs tiny widths with the real geometry (numbers then say nothing about GPU speed).

    python bench/vila_hd_latency.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from vila_hd.model import VilaHDForConditionalGeneration, preset_config
from vila_hd.model.tiny import build_tiny_tokenizer, tiny_config
from vila_hd.processing import VilaHDProcessor

QUESTION = "What is written on the small red sign next to the blue door?"
SELECTIONS = {"6%": 2, "18%": 6, "35%": 12}  # look-close steps of 2560 patches at 4K


@dataclass
class Row:
    model: str
    setting: str
    llm_tokens: int
    prefix_ms: float
    vision_ms: float
    prefill_ms: float
    total_ms: float
    peak_mem_gib: float


def timed(fn, device, iters: int, warmup: int = 2) -> float:
    """Median milliseconds over ``iters`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# --- VILA-HD ------------------------------------------------------------------------------------
def build_vila_hd(real: bool, device, dtype):
    tokenizer = build_tiny_tokenizer()  # token ids only matter for the layout, not for speed
    if real:
        config = preset_config(
            "VILA-HD-8B-4K",
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            prompt_end_token_ids=tokenizer("<|im_end|>\n<|im_start|>assistant", add_special_tokens=False).input_ids,
        )
        config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        config.text_config.pad_token_id = tokenizer.pad_token_id
    else:
        config = tiny_config("tiny-4K", tokenizer=tokenizer, text_overrides={"max_position_embeddings": 32768})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VilaHDForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), VilaHDProcessor.from_config(config, tokenizer)


def vila_hd_rows(model, processor, image, device, iters: int) -> list[Row]:
    text = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    rows = []
    for setting, steps in SELECTIONS.items():
        inputs = processor(text=text, images=[image], num_look_close=steps).to(device)
        _reset_peak(device)
        with torch.inference_mode():
            rows.append(_vila_hd_row(model, inputs, setting, steps, device, iters))
        rows[-1].peak_mem_gib = _peak(device)
        print(_fmt(rows[-1]), flush=True)
    return rows


def _vila_hd_row(model, inputs, setting: str, steps: int, device, iters: int) -> Row:
    pixels = inputs["pixel_values"].to(model.dtype)
    n_tokens = inputs["input_ids"].shape[1]
    # The prefix pass sees the prompt up to the question's end with the image's low-res tokens only.
    high_res = model.image_token_layout(num_look_close=steps).num_high_res_tokens
    prefix_len = int(inputs["prompt_positions"][0]) + 1 - high_res
    prompt = torch.randn(1, model.config.vision_config.hidden_size, device=device, dtype=model.dtype)
    hidden = model.config.text_config.hidden_size
    label = "VILA-HD-8B-4K" if hidden == 3584 else "VILA-HD tiny-4K"

    def vision():
        low = model.encode_low_res(pixels)
        model.vision_tower.vision_model.look_close(
            low, num_look_close=steps, prompt=prompt, output_layers=[model.config.vision_feature_layer],
            selection_group_size=model.config.downsample)

    def llm_pass(length):
        embeds = torch.randn(1, length, hidden, device=device, dtype=model.dtype)
        return lambda: model.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    return Row(label, setting, n_tokens, timed(llm_pass(prefix_len), device, iters), timed(vision, device, iters),
               timed(llm_pass(n_tokens), device, iters),
               timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), device, iters),
               float("nan"))


# --- Qwen2-VL -----------------------------------------------------------------------------------
def build_qwen2_vl(real: bool, device, dtype):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if real:
        text = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
    else:
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=152064, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def qwen_grid(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of 28, scaled down under ``max_pixels``."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if max_pixels is not None and h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    return h // 14, w // 14


def qwen2_vl_rows(model, image_size, device, iters: int) -> list[Row]:
    rows = []
    for setting, cap in (("native", None), ("4 MP cap", 4_000_000)):
        _reset_peak(device)
        with torch.inference_mode():
            rows.append(_qwen_row(model, image_size, setting, cap, device, iters))
        rows[-1].peak_mem_gib = _peak(device)
        print(_fmt(rows[-1]), flush=True)
    return rows


def _qwen_row(model, image_size, setting: str, cap: int | None, device, iters: int) -> Row:
    cfg = model.config
    gh, gw = qwen_grid(*image_size, cap)
    n_image = gh * gw // 4
    question = torch.randint(1000, 2000, (24,), device=device)
    ids = torch.cat([torch.tensor([cfg.vision_start_token_id], device=device),
                     torch.full((n_image,), cfg.image_token_id, device=device),
                     torch.tensor([cfg.vision_end_token_id], device=device), question])[None]
    pixels = torch.randn(gh * gw, 3 * 2 * 14 * 14, device=device, dtype=model.dtype)
    grid = torch.tensor([[1, gh, gw]], device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid)
    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    embeds = torch.randn(1, ids.shape[1], cfg.text_config.hidden_size, device=device, dtype=model.dtype)
    vision_ms = timed(lambda: visual(pixels, grid_thw=grid), device, iters)
    prefill_ms = timed(lambda: model.model.language_model(inputs_embeds=embeds), device, iters)
    total_ms = timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), device, iters)
    return Row("Qwen2-VL-7B", f"{setting} {gh * 14}x{gw * 14}", ids.shape[1], 0.0, vision_ms, prefill_ms,
               total_ms, float("nan"))


def _fmt(r: Row) -> str:
    return (f"{r.model:14s} {r.setting:22s} llm_tokens={r.llm_tokens:6d} prefix={r.prefix_ms:7.1f} ms "
            f"vision={r.vision_ms:7.1f} ms prefill={r.prefill_ms:7.1f} ms total={r.total_ms:7.1f} ms "
            f"peak={r.peak_mem_gib:5.1f} GiB")


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-qwen", action="store_true", help="skip the Qwen2-VL-7B comparison")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    real = device.type == "cuda"
    dtype = torch.bfloat16 if real else torch.float32
    image = Image.new("RGB", (3840, 2160), (120, 130, 140))
    print(f"device={device} dtype={dtype} sizes={'real' if real else 'tiny widths, real geometry'} batch=1")
    model, processor = build_vila_hd(real, device, dtype)
    rows = vila_hd_rows(model, processor, image, device, args.iters)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_qwen:
        rows += qwen2_vl_rows(build_qwen2_vl(real, device, dtype), image.size, device, args.iters)
        ours = next(r for r in rows if r.setting == "18%")
        native = next(r for r in rows if r.setting.startswith("native"))
        print(f"VILA-HD-4K at 18% is {native.total_ms / ours.total_ms:.2f}x faster than Qwen2-VL-7B at native resolution")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()

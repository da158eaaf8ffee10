"""Training throughput of a VILA-HD SFT step: tokens/s, samples/s, peak memory and MFU, with and without
packing, through the real training path (DeepSpeed engine, ZeRO-2, bf16, VilaHDTrainStep, everything
trainable including the box-supervised selection loss).

Model: PS3-1.5K (SO400M, scales 378/756/1512, 10,240 patches per image in training) + a Qwen2-1.5B-shaped
LLM, random weights (speed does not depend on weight values). Data: synthetic SFT samples (one image each,
a few text-only ones, answers of varied length) so that padding has something to waste and packing
something to gain.

MFU = model FLOPs / (step time x peak), model FLOPs as in :mod:`vila_hd.train.flops`: 6 x N x tokens for the LLM
(N without the input embedding and the LM head) + 6 x N_head x target tokens (where the step runs the head) + attention 12 x layers x width x sum(seq_len^2) (full-attention
convention of PaLM / torchtitan), the PS3 trunk 6 x N_v x patches + its attention, and the top-down prefix
pass (forward only). Peak: 989 TFLOP/s (H100/H200 bf16 dense) unless --peak-tflops is given.

    torchrun --nproc_per_node 1 bench/train_throughput.py            # GPU: the real sizes
    python bench/train_throughput.py --preset tiny --steps 3          # CPU: tiny sizes (numbers mean nothing)

``--profile DIR``: after the timed steps, 2 more steps under ``torch.profiler`` (see ``bench/profiling.py``):
DIR/kernels.txt (top kernels), DIR/summary.json (wall vs GPU busy time, time per kernel category), and
DIR/trace.json with ``--profile-trace``. With ``--packing both`` each mode gets DIR/packing_on, DIR/packing_off.

``--compile``: regional ``torch.compile`` (each LLM decoder layer and PS3 block, see ``train/compile.py``;
``--compile-mode``, ``--compile-backend``); compilation and recompilation for new shapes fall in the warm-up
steps (raise ``--warmup`` if the timed steps still see new shapes), and the header line says whether it is on.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN2_1_5B = dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)


def build_model(preset: str, attn: str | None):
    """Random-weight model and the ids the synthetic data needs: (model, image_token_id, look_close)."""
    from vila_hd.builder import build_tiny_model
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.configuration import VilaHDConfig
    from vila_hd.ps3 import preset_config

    if preset == "tiny":
        model, processor = build_tiny_model("tiny")
        return model, processor.image_token_id, {"num_look_close": 2}
    vision = preset_config("PS3-1.5K-SigLIP2", max_select_num=2560).vision_config
    text = dict(QWEN2_1_5B)
    config = VilaHDConfig(vision_config=vision, text_config=text, image_token_id=151646, num_look_close=None,
                          num_token_look_close=10240)
    if attn:
        config.text_config._attn_implementation = attn
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = VilaHDForConditionalGeneration(config)
    return model, 151646, {"num_token_look_close": 10240}


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    """SigLIP's normalisation (mean = std = 0.5) of uint8 pixels, on their device, as the training step does."""
    return pixels.float() / 127.5 - 1.0


def synthetic_samples(model, image_token_id: int, look_close: dict, n: int, max_length: int, seed: int = 0):
    """EncodedSample-like items: [prompt][image tokens + "\\n"][question] [answer] with varied lengths."""
    from vila_hd.train.data.dataset import EncodedSample

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    size = model.config.vision_config.ps3_scales[-1]
    n_img = model.image_token_layout(None, **look_close).num_tokens
    scale = max_length / 8192
    out = []
    for i in range(n):
        text_only = i % 8 == 7
        head = int(20 * scale) + 1
        question = int(torch.randint(20, 120, (1,), generator=g)) * max(scale, 0.05)
        answer = int(torch.randint(30, 1200, (1,), generator=g) * max(scale, 0.05)) + 2
        if text_only:
            question += int(1500 * scale)
        ids = torch.randint(10, min(vocab, 150000) - 10, (head + int(question) + answer,), generator=g)
        prompt = head + int(question) - 1
        pieces, positions, pixels = [ids[:head]], [], None
        if not text_only:
            pieces.append(torch.full((n_img,), image_token_id))
            pieces.append(torch.tensor([198]))
            prompt += n_img + 1
            positions = [prompt]
            pixels = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)  # as the loader gives
        pieces.append(ids[head:])
        input_ids = torch.cat(pieces)[:max_length]
        labels = torch.full_like(input_ids, -100)
        labels[-answer:] = input_ids[-answer:]
        boxes = torch.tensor([[0.1, 0.2, 0.4, 0.5]]) if pixels is not None and i % 2 == 0 else \
            (torch.full((1, 4), float("nan")) if pixels is not None else None)
        out.append(EncodedSample(input_ids, labels, torch.tensor(positions, dtype=torch.long), pixels, boxes,
                                 id=str(i), index=i))
    return out


class SyntheticData:
    def __init__(self, batches):
        self.batches = batches
        self.steps_per_epoch = len(batches)

    def micro_batches(self, start, total):
        for step in range(start, total):
            yield self.batches[step % len(self.batches)]


def run(args, packing: bool, profile_dir: str | None = None) -> dict:
    from vila_hd.train.data.collate import Collator
    from vila_hd.train.flops import FlopsModel
    from vila_hd.train.model_step import VilaHDTrainStep
    from vila_hd.train.trainer import Trainer, TrainerSettings, _peak_flops

    cuda = torch.cuda.is_available()
    model, image_token_id, look = build_model(args.preset, args.attn)
    dtype = torch.bfloat16 if (cuda or args.bf16) else torch.float32
    model = model.to(dtype)
    llm = model.language_model
    if args.checkpoint_llm:
        enable = getattr(llm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.vision_tower.vision_model.gradient_checkpointing = args.checkpoint_vision
    if args.compile:
        from torch._dynamo.utils import counters

        from vila_hd.train.compile import compile_blocks

        torch._dynamo.reset()  # each packing mode compiles afresh (recompile limits count per process)
        counters.clear()
        compile_blocks(model, _compile_config(args))
    never = ("prior_prompt", "trunk.norm.", "trunk.attn_pool.")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(k in name for k in never))
    step = VilaHDTrainStep(model, look, llm_attention=args.llm_attention, normalize=_normalize).train()
    samples = synthetic_samples(model, image_token_id, look, args.samples_per_step * (args.steps + args.warmup),
                                args.max_length)
    size = tuple([model.config.vision_config.ps3_scales[-1]] * 2)
    collate = Collator(0, size, args.max_length, packing=packing, image_token_id=image_token_id,
                       low_res_tokens=model.image_token_layout(size, **look).num_low_res_tokens)
    k = args.samples_per_step
    batches = [collate(samples[i:i + k]) for i in range(0, len(samples), k)]
    params = [p for p in model.parameters() if p.requires_grad]
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                 "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
                 "steps_per_print": 10**9}
    settings = TrainerSettings(output_dir=args.output_dir, deepspeed_config=ds_config, micro_batch_size=k,
                               total_steps=args.steps + args.warmup, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                               loss_weights={"lm": 1.0, "selection": 1.0}, progress_bar=False, tensorboard=False,
                               hidden_size=model.config.text_config.hidden_size, peak_tflops=args.peak_tflops)
    trainer = Trainer(step, [{"params": params, "lr": 1e-5, "name": "all"}], SyntheticData(batches), settings)
    layout = model.image_token_layout(None, **look)
    flops_model = FlopsModel.from_model(model, layout)
    times, tokens, n_samples, flops, slots = [], [], [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer._optimizer_step([batch])
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(batch["num_tokens"])
            slots.append(batch["input_ids"].numel())
            n_samples.append(batch["num_samples"])
            flops.append(flops_model.batch(batch))
    t = statistics.median(times)
    per_step_tokens = statistics.mean(tokens)
    peak = _peak_flops(settings)
    result = {
        "packing": packing,
        "rows_x_length": list(batches[-1]["input_ids"].shape),
        "samples_per_step": k,
        "tokens_per_step": per_step_tokens,
        "padding_fraction": 1 - sum(tokens) / sum(slots),  # over the timed steps
        "step_s_median": t,
        "tokens_per_s": per_step_tokens / t,
        "samples_per_s": statistics.mean(n_samples) / t,
        "model_tflops_per_step": statistics.mean(flops) / 1e12,
        "achieved_tflops": statistics.mean(flops) / t / 1e12,
        "mfu": statistics.mean(flops) / t / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    if args.compile:
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
    if profile_dir:
        from profiling import profile_steps  # bench/ is sys.path[0] when this file runs as a script

        extra, optimizer_step = itertools.cycle(batches[args.warmup:] or batches), trainer._optimizer_step
        summary = profile_steps(lambda: optimizer_step([next(extra)]), profile_dir, steps=2, trace=args.profile_trace)
        result["profile"] = {"dir": profile_dir, "gpu_busy_share": summary["step_busy_share"]}
    del trainer, step, model, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["1.5b", "tiny"], default=None,
                        help="1.5b: PS3-1.5K + Qwen2-1.5B shapes (default on CUDA); tiny (default on CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples-per-step", type=int, default=4, help="samples per micro-batch (one GPU)")
    parser.add_argument("--max-length", type=int, default=None, help="row length (default 8192; tiny 512)")
    parser.add_argument("--packing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--attn", default=None, help="LLM attention implementation (sdpa, flex_attention, ...)")
    parser.add_argument("--llm-attention", default="auto", choices=["auto", "segments", "model"],
                        help="training attention for multi-sample rows: segment attention (auto: when the LLM runs "
                             "SDPA) or the LLM's own implementation with a block mask (model)")
    parser.add_argument("--no-checkpoint-llm", dest="checkpoint_llm", action="store_false")
    parser.add_argument("--no-checkpoint-vision", dest="checkpoint_vision", action="store_false")
    parser.add_argument("--bf16", action="store_true", help="bf16 on CPU too")
    parser.add_argument("--compile", action="store_true",
                        help="regional torch.compile of the LLM decoder layers and PS3 blocks (train/compile.py); "
                             "compilation happens in the warm-up steps")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: from the GPU name)")
    parser.add_argument("--output-dir", default="outputs/bench_train")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", metavar="DIR", help="profile 2 extra steps; write kernels.txt, summary.json here")
    parser.add_argument("--profile-trace", action="store_true", help="with --profile: also DIR/trace.json (large)")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("1.5b" if torch.cuda.is_available() else "tiny")
    args.max_length = args.max_length or (8192 if args.preset != "tiny" else 512)
    if args.compile:
        try:
            _compile_config(args)  # a bad --compile-mode fails here, before the models are built
        except ValueError as err:
            parser.error(str(err))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    from vila_hd.train.trainer import init_distributed

    init_distributed()
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.packing]
    results = [run(args, packing, _profile_dir(args.profile, packing, len(modes) > 1)) for packing in modes]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; model: {args.preset}; ZeRO-2, {'bf16' if torch.cuda.is_available() or args.bf16 else 'fp32'}; "
          f"compile: {_compile_label(args)}; LLM attention: {args.llm_attention}")
    print("MFU = (6 N T + 6 N_head T_target + 12 L d sum s^2 for the LLM, 6 N_v P + attention for PS3, 2 N T' for "
          "the prefix pass) "
          "/ (step time x peak)")
    header = ["packing", "rows_x_length", "tokens_per_step", "padding_fraction", "step_s_median", "tokens_per_s",
              "samples_per_s", "achieved_tflops", "mfu", "peak_memory_gib"]
    header += ["compiled_graphs", "graph_breaks"] if args.compile else []
    for r in results:
        print("  ".join(f"{h}={_fmt(r[h])}" for h in header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "preset": args.preset, "compile": _compile_label(args), "results": results},
                      f, indent=2)
    return 0


def _compile_config(args):
    from vila_hd.train.config import CompileConfig

    config = CompileConfig(enabled=True, backend=args.compile_backend, mode=args.compile_mode)
    config.validate()
    return config


def _compile_label(args) -> str:
    if not args.compile:
        return "off"
    return f"blocks ({args.compile_backend}, mode={args.compile_mode or 'default'})"


def _profile_dir(root: str | None, packing: bool, several: bool) -> str | None:
    if root is None or not several:
        return root
    return os.path.join(root, "packing_on" if packing else "packing_off")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())

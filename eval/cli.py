"""The evaluation commands of ``vila-hd``: ``EVAL`` (``vila-hd eval``) and ``SYNTH`` (``vila-hd synth``).

    vila-hd eval --benchmark vstar --data vstar_bench/ --model DIR_OR_HUB_ID --output outputs/eval/vstar
    vila-hd eval --benchmark hrbench --data hr_bench_4k.tsv --model M --output out/hr4k --sweep steps=1,2,4,6
    vila-hd eval --benchmark textvqa --data TextVQA_0.5.1_val.json --replies answers.jsonl --output out/tvqa
    torchrun --nproc-per-node 8 -m vila_hd.eval.cli eval --benchmark mme-realworld --data MME_RealWorld.json --model M ...
    vila-hd synth --out data/synth --image-size 1512 --low-res 378 --train 1000 --test 200

Run the same ``eval`` command again to resume an interrupted run. Benchmarks, formats and outputs:
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from vila_hd import dtypes
from vila_hd.arguments import Command, UsageError, dispatch, guarded, positive_int
from vila_hd.eval import synthetic
from vila_hd.eval.benchmarks import ALIASES, BENCHMARKS, FormatError, build_benchmark
from vila_hd.eval.benchmarks.base import ANSWER_PARSERS
from vila_hd.eval.replies import REPLY_FORMATS, load_replies, read_replies  # noqa: F401  (read_replies: public here)
from vila_hd.serve.arguments import add_generation_arguments, add_limit_arguments, load_engine

GENERATION_FIELDS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                     "top_k": "top_k", "steps": "steps", "tokens": "tokens", "mode": "mode"}


EVAL_DESCRIPTION = """Score a model (--model) or saved replies (--replies) on a benchmark.

examples:
  vila-hd eval --benchmark vstar --data vstar_bench/ --model DIR_OR_HUB_ID --output outputs/eval/vstar
  vila-hd eval --benchmark hrbench --data hr_bench_4k.tsv --model M --output out/hr4k --sweep steps=1,2,4,6
  vila-hd eval --benchmark textvqa --data TextVQA_0.5.1_val.json --replies answers.jsonl --output out/tvqa

Run the same command again to resume an interrupted run."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("benchmark")
    data.add_argument("--benchmark", required=True, metavar="NAME",
                      help=f"one of {', '.join(sorted(BENCHMARKS))} (aliases: {', '.join(sorted(ALIASES))})")
    data.add_argument("--data", required=True, metavar="PATH", help="the benchmark file or folder, as published")
    data.add_argument("--image-root", metavar="DIR", help="image folder (default: next to the data file)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="bench_options",
                      help="benchmark option, e.g. rule=fixed (mme-realworld), questions=FILE (textvqa), "
                           "metric=contains (jsonl)")
    data.add_argument("--instruction", help="replace the benchmark's answer instruction in the prompts")
    data.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples")
    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, metavar="DIR", help="output folder (resumed when it exists)")
    run.add_argument("--mc-mode", choices=["generate", "likelihood"], default="generate",
                     help="multiple choice: parse the generated reply, or pick the option with the lowest mean "
                          "loss (V*Bench's protocol) (default: %(default)s)")
    run.add_argument("--sweep", metavar="KEY=V1,V2,...",
                     help="run at several selection budgets, e.g. steps=1,2,4,6 or tokens=2000,4000; writes "
                          "sweep.json / sweep.md / sweep.png")
    run.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                     help="samples answered per generate call (generate mode; a failing batch is redone sample by "
                          "sample) (default: %(default)s)")
    run.add_argument("--answer-parser", choices=ANSWER_PARSERS, default="official",
                     help="how a multiple-choice reply's letter is read: the benchmark's official scorer's rule, "
                          "or this project's robust parser (docs/evaluation.md) (default: %(default)s)")
    run.add_argument("--retry-errors", action="store_true", help="redo samples that failed in an earlier run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = parser.add_argument_group("model (or --replies)")
    model.add_argument("--model", metavar="DIR_OR_HUB_ID", help="checkpoint directory or Hub id")
    model.add_argument("--replies", metavar="FILE",
                       help="score saved replies instead of running a model: JSONL of {id, prediction} (a "
                            "samples.jsonl of an earlier run), an lmms-eval samples log, a VLMEvalKit result "
                            "xlsx/tsv, MME-RealWorld's results JSON or LLaVA's answer JSONL")
    model.add_argument("--replies-format", choices=REPLY_FORMATS, default="auto",
                       help="the --replies file's format (default: detected from its content)")
    model.add_argument("--allow-missing", action="store_true",
                       help="with --replies, score questions without a reply as wrong (counted in the summary) "
                            "instead of refusing the run")
    model.add_argument("--adapter", metavar="DIR_OR_HUB_ID", help="LoRA adapter to apply on --model")
    model.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda:LOCAL_RANK under torchrun, else auto)")
    model.add_argument("--dtype", choices=["auto", *dtypes.CHOICES], default="auto")
    model.add_argument("--device-map", metavar="MAP", help="'auto' spreads the model over the visible GPUs")
    model.add_argument("--load-4bit", action="store_true", help="4-bit LLM weights (bitsandbytes, CUDA)")
    add_generation_arguments(parser)
    add_limit_arguments(parser)  # load_engine reads them (vila_hd.serve.arguments.serving_limits)
    parser.set_defaults(max_new_tokens=64)


def run_eval(args: argparse.Namespace) -> int:
    """``vila-hd eval``: returns the exit code (2 for bad arguments, 1 for a failed run)."""
    from vila_hd.eval.harness import distributed_rank_world, run_benchmark, summary_markdown
    from vila_hd.eval.sweep import parse_budgets, run_sweep, sweep_markdown

    if args.model is None and args.replies is None:
        raise UsageError("give --model (run a model) or --replies (score saved replies)")
    if args.model is not None and args.replies is not None:
        raise UsageError("give --model (run a model) or --replies (score saved replies), not both")
    if args.replies is not None and not os.path.isfile(args.replies):
        what = "is a directory, not a file" if os.path.isdir(args.replies) else "does not exist"
        raise UsageError(f"--replies: {args.replies} {what}")  # exit code 2, as a missing --data file
    if args.replies and (args.sweep or args.mc_mode == "likelihood"):
        raise UsageError("--sweep and --mc-mode likelihood need a model (--model)")
    try:
        budgets = parse_budgets(args.sweep) if args.sweep else None
        options = _key_values(args.bench_options)
        benchmark = build_benchmark(args.benchmark, args.data, image_root=args.image_root,
                                    instruction=args.instruction, answer_parser=args.answer_parser, **options)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    try:
        benchmark.samples()  # a malformed file fails here, before a model is loaded
        predictor, replies, run_info = _model_or_replies(args, benchmark)
        if predictor is None and replies is None:
            return 1
        common = dict(predictor=predictor, replies=replies, limit=args.limit, mc_mode=args.mc_mode,
                      retry_errors=args.retry_errors, run_info=run_info, progress=not args.no_progress,
                      batch_size=args.batch_size, allow_missing=args.allow_missing)
        generation = generation_dict(args)
        if budgets:
            result = run_sweep(benchmark, args.output, budgets, generation=generation, **common)
            if result is not None:
                print(sweep_markdown(result), end="")
            return 0
        summary = run_benchmark(benchmark, args.output, generation=generation, **common)
    except (FormatError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"vila-hd eval: error: {err}", file=sys.stderr)
        return 1
    if summary is not None:
        print(summary_markdown(summary), end="")
    else:
        rank, world = distributed_rank_world()
        print(f"rank {rank}/{world} done; the last process to finish writes the summary", file=sys.stderr)
    return 0


def generation_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options given on the command line (unset ones left to the checkpoint)."""
    return {name: getattr(args, attr) for name, attr in GENERATION_FIELDS.items() if getattr(args, attr) is not None}


def _model_or_replies(args: argparse.Namespace, benchmark):
    if args.replies:
        replies = load_replies(args.replies, benchmark, args.replies_format)
        return None, replies, {"replies_file": os.path.abspath(args.replies)}
    from vila_hd.eval.predictor import EnginePredictor

    if args.device is None and args.device_map is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    engine = load_engine(args, "vila-hd eval", image_cache_size=0)
    if engine is None:
        return None, None, None
    return EnginePredictor(engine), None, {"model": args.model, "adapter": args.adapter}


def _key_values(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out


EVAL = Command("eval", help="run benchmarks", add_arguments=add_eval_arguments, run=run_eval,
               description=EVAL_DESCRIPTION, epilog="Formats, scoring rules and outputs: docs/evaluation.md.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
SYNTH = Command("synth", help="generate the synthetic high-resolution benchmark", add_arguments=synthetic.add_arguments,
                run=synthetic.run, description=synthetic.DESCRIPTION, epilog=synthetic.EPILOG)
# The commands on their own, for Python callers (argv -> exit code) and tests.
eval_main, synth_main, build_eval_parser = EVAL.main, SYNTH.main, EVAL.parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vila_hd.eval.cli eval ...`` / ``python -m vila_hd.eval.cli synth ...`` (also under torchrun)."""
    return dispatch((EVAL, SYNTH), list(sys.argv[1:] if argv is None else argv), "python -m vila_hd.eval.cli")


if __name__ == "__main__":
    sys.exit(guarded(main))

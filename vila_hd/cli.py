"""``vila-hd``: one entry point, one subcommand per job. Dispatch only; the work lives in the modules.

    vila-hd chat --model DIR_OR_HUB_ID [--image PATH ...] [--prompt TEXT [--json]]
    vila-hd infer --model DIR_OR_HUB_ID --input questions.jsonl --output answers.jsonl
    vila-hd demo | convert | train | finetune-lora | merge-lora | data | eval | synth | pretrain | serve ...
                           forwarded to the function that parses them (see FORWARDED)

Bad arguments exit with code 2 (argparse's message); a model that cannot be loaded, or any other
failure of a command, prints ``vila-hd <command>: error: ...`` and exits with code 1. One handler in
:func:`main` covers every subcommand: a user error (see :func:`vila_hd.errors.is_user_error`: the project's
errors, a corrupt safetensors / JSON / YAML file, a bad chat template, a missing file, a full disk) prints one
line, ``vila-hd: error: ...``, and exits with code 1; ``vila-hd --debug COMMAND ...`` (``--debug`` may also
come anywhere after the command) prints its traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vila_hd import __version__, errors

DEBUG_FLAG = "--debug"

# Subcommands whose own function parses their arguments: ``vila-hd NAME ARGS`` calls ``module.function(ARGS)``.
FORWARDED = {
    "train": ("vila_hd.train.cli", "train_main", "train one VILA-HD stage from its YAML recipe"),
    "finetune-lora": ("vila_hd.train.cli", "finetune_lora_main", "LoRA fine-tuning (adapters keep the projector)"),
    "merge-lora": ("vila_hd.train.cli", "merge_lora_main", "fold a LoRA adapter into its base checkpoint"),
    "data": ("vila_hd.train.cli", "data_main", "data tools (`vila-hd data check`)"),
    "pretrain": ("vila_hd.train.pretrain.loop", "pretrain_main", "PS3 localized contrastive pre-training"),
    "eval": ("vila_hd.eval.cli", "eval_main", "run benchmarks"),
    "synth": ("vila_hd.eval.cli", "synth_main", "generate the synthetic high-resolution benchmark"),
    "convert": ("vila_hd.compat.convert", "main", "convert checkpoints between the VILA layout and our single directory"),
    "serve": ("vila_hd.serve.cli", "serve_main", "OpenAI-compatible HTTP server"),
    "demo": ("vila_hd.demo", "main", "train a tiny VILA-HD on a synthetic high-res task and report what selection buys"),
}


# --- argument types (argparse turns their ValueErrors into exit code 2 with the message) -------------------
def number_arg(kind: type, accept: Callable[[Any], bool], expected: str, out_of_range: str | None = None,
               also: tuple[str, ...] = ()) -> Callable[[str], Any]:
    """An argparse type: ``kind(value)`` (int or float) kept when ``accept`` holds; words in ``also`` pass as
    they are. The message says ``expected ...`` (``out_of_range`` for a number outside the range)."""

    def parse(value: str):
        if value in also:
            return value
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not accept(number):
            raise argparse.ArgumentTypeError(f"expected {out_of_range or expected}, got {value!r}")
        return number

    parse.__name__ = f"{kind.__name__} ({expected})"  # argparse names the type in its own messages
    return parse


SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1

look_close_arg = number_arg(int, lambda n: n >= 0, "a non-negative integer or 'all'", also=("all",))
positive_int = number_arg(int, lambda n: n >= 1, "a positive integer")
non_negative_int = number_arg(int, lambda n: n >= 0, "an integer >= 0")
positive_float = number_arg(float, lambda n: 0 < n < math.inf, "a number > 0", "a finite number > 0")
non_negative_float = number_arg(float, lambda n: 0 <= n < math.inf, "a number >= 0", "a finite number >= 0")
seed_arg = number_arg(int, lambda n: 0 <= n <= SEED_MAX, f"an integer in 0..{SEED_MAX}",
                      f"an integer in 0..{SEED_MAX} (2**64 - 1)")  # the seeds torch accepts
probability = number_arg(float, lambda n: 0 < n <= 1, "a number in (0, 1]")


# --- options shared by the commands that load a model ----------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_HUB_ID",
        help="checkpoint directory or Hub id (our layout or VILA's); a LoRA adapter directory works "
        "too (its base comes from adapter_config.json)",
    )
    group.add_argument("--adapter", metavar="DIR_OR_HUB_ID", help="LoRA adapter to apply on --model")
    group.add_argument("--device", help="cuda, cuda:1, cpu, mps... (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="weights dtype (default auto: bfloat16 on a GPU, float32 on the CPU)",
    )
    group.add_argument(
        "--device-map",
        metavar="MAP",
        help="'auto' spreads the model over all visible GPUs (accelerate); overrides --device",
    )
    group.add_argument(
        "--load-4bit", action="store_true", help="4-bit LLM weights with bitsandbytes (needs a CUDA GPU)"
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=512,
        metavar="N",
        help="most tokens per answer (default: %(default)s)",
    )
    group.add_argument(
        "--temperature",
        type=non_negative_float,
        metavar="T",
        help="0 decodes greedily (reproducible); > 0 samples (default: the checkpoint's "
        "generation config, greedy when it sets nothing)",
    )
    group.add_argument("--top-p", type=probability, metavar="P", help="nucleus sampling threshold")
    group.add_argument("--top-k", type=positive_int, metavar="K", help="top-k sampling")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=look_close_arg,
        metavar="N|all",
        help="PS3 look-close steps per image (default: the checkpoint's)",
    )
    budget.add_argument(
        "--tokens",
        type=look_close_arg,
        metavar="N|all",
        help="high-res patches to select per image, instead of --steps",
    )
    group.add_argument(
        "--mode",
        choices=["top-down", "bottom-up"],
        help="top-down: the question steers patch selection; bottom-up: image saliency only "
        "(default: the checkpoint's)",
    )
    group.add_argument("--seed", type=seed_arg, metavar="N", help=f"seed for sampling (0..{SEED_MAX})")


def limit_arg(value: str) -> int | None:
    """A positive integer, or ``none`` (no limit)."""
    if value.lower() == "none":
        return None
    return positive_int(value)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    from vila_hd.engine import ServingLimits

    defaults = ServingLimits()
    group = parser.add_argument_group(
        "serving limits", "what one request may cost; a request over a limit is refused with a message ('none' lifts one)"
    )
    group.add_argument(
        "--limit-image-pixels",
        type=limit_arg,
        default=defaults.max_image_pixels,
        metavar="N",
        help="most pixels per image, checked before decoding (default: %(default)s)",
    )
    group.add_argument(
        "--limit-images",
        type=limit_arg,
        default=defaults.max_images_per_prompt,
        metavar="N",
        help="most images per prompt (conversation) (default: %(default)s)",
    )
    group.add_argument(
        "--limit-new-tokens",
        type=limit_arg,
        default=defaults.max_new_tokens,
        metavar="N",
        help="largest max_new_tokens a request may ask for (default: %(default)s)",
    )
    group.add_argument(
        "--limit-prompt-tokens",
        type=limit_arg,
        default=defaults.max_prompt_tokens,
        metavar="N",
        help="most prompt tokens after image expansion (default: the model's context length)",
    )


def serving_limits(args: argparse.Namespace):
    from vila_hd.engine import ServingLimits

    return ServingLimits(
        max_image_pixels=args.limit_image_pixels,
        max_images_per_prompt=args.limit_images,
        max_new_tokens=args.limit_new_tokens,
        max_prompt_tokens=args.limit_prompt_tokens,
    )


def generation_options(args: argparse.Namespace):
    from vila_hd.engine import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_look_close=args.steps,
        num_token_look_close=args.tokens,
        look_close_mode=args.mode,
    )


def load_engine(args: argparse.Namespace, prog: str, image_cache_size: int = 4):
    """The engine for ``args``, or ``None`` after printing why it could not be loaded. ``image_cache_size``: 0
    for commands that never see an image twice (batch inference, evaluation)."""
    import torch

    from vila_hd.engine import Engine

    if args.seed is not None:
        torch.manual_seed(args.seed)
    print(
        f"loading {args.model}" + (f" with adapter {args.adapter}" if args.adapter else "") + " ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        engine = Engine.from_pretrained(
            args.model,
            args.adapter,
            options=generation_options(args),
            limits=serving_limits(args),
            device=args.device,
            dtype=args.dtype,
            device_map=args.device_map,
            load_4bit=args.load_4bit,
            image_cache_size=image_cache_size,
        )
        check_chat_template(engine.processor, args.model)
        return engine
    except Exception as err:  # noqa: BLE001 - user errors are reported; anything else is a bug, re-raised
        if not (errors.is_user_error(err) or isinstance(err, (ImportError, RuntimeError))):
            raise
        if errors.DEBUG:
            traceback.print_exc()
        print(f"{prog}: error: cannot load the model: {model_error(err, args.model, args.adapter)}", file=sys.stderr)
        return None


@contextlib.contextmanager
def naming_model(model: str, adapter: str | None = None) -> Iterator[None]:
    """Re-raise a library's parse error while loading ``model`` (a corrupt safetensors file, a chat template
    the sandbox refuses, a JSON file that does not parse) as a user error naming the file."""
    try:
        yield
    except errors.VilaHDError:
        raise
    except errors.library_errors() as err:
        raise errors.FileFormatError(model_error(err, model, adapter)) from err


def model_error(err: BaseException, model: str, adapter: str | None = None) -> str:
    """One line for a model that cannot be loaded, naming the culprit file (a corrupt safetensors file is
    looked for in the checkpoint directories) or at least the checkpoint."""
    from jinja2.exceptions import TemplateError
    from safetensors import SafetensorError

    detail = errors.describe(err)
    if isinstance(err, TemplateError):
        detail = template_error(err, model)
    elif isinstance(err, SafetensorError):
        culprit = corrupt_safetensors([d for d in (model, adapter) if d])
        detail = f"{culprit} is not a valid safetensors file ({detail}): re-download or re-save it" if culprit else detail
    named = [d for d in (model, adapter) if d and d in detail]
    return detail if named else f"{model}: {detail}"


def corrupt_safetensors(directories: Sequence[str]) -> str | None:
    """The first ``*.safetensors`` file under ``directories`` (and their VILA-layout subfolders) whose header
    does not parse, else ``None``."""
    from safetensors import SafetensorError, safe_open

    for directory in directories:
        for folder in (directory, *(os.path.join(directory, d) for d in ("llm", "vision_tower", "mm_projector"))):
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            for name in (n for n in names if n.endswith(".safetensors")):
                try:
                    with safe_open(os.path.join(folder, name), framework="pt"):
                        pass
                except (SafetensorError, OSError):
                    return os.path.join(folder, name)
    return None


def check_chat_template(processor, model: str) -> None:
    """Render a one-question chat with the checkpoint's template, so that a template the sandbox refuses (or
    that fails) is reported at load time with its file, not in the middle of a chat."""
    from jinja2.exceptions import TemplateError

    try:
        processor.apply_chat_template([{"role": "user", "content": "hello"}])
    except TemplateError as err:
        raise errors.FileFormatError(template_error(err, model)) from err


def template_error(err: BaseException, model: str) -> str:
    source = next((os.path.join(d, n) for d in (model, os.path.join(model, "llm"))
                   for n in ("chat_template.jinja", "tokenizer_config.json") if os.path.exists(os.path.join(d, n))),
                  model)
    return f"the chat template in {source} cannot be used: {errors.describe(err)} (fix or replace the template)"


# --- the entry point ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from vila_hd import chat, infer

    parser = argparse.ArgumentParser(
        prog="vila-hd",
        description="VILA-HD: high-resolution multimodal LLM on the PS3 vision encoder.",
        epilog="`vila-hd COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"vila-hd {__version__}")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="print the traceback of errors that are otherwise one 'vila-hd: error:' line (also accepted "
        "after COMMAND)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (chat, infer):
        sub = commands.add_parser(
            module.COMMAND,
            help=module.HELP,
            description=module.__doc__,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    for name, (_, _, help_text) in FORWARDED.items():  # listed for --help; dispatched before parsing
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vila-hd ARGV``; returns the exit code (argparse exits with 2 on bad arguments, a user error
    returns 1 after one ``vila-hd: error:`` line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv  # --debug before a `--` only
    debug = DEBUG_FLAG in options
    argv = [a for a in options if a != DEBUG_FLAG] + argv[len(options):]
    errors.DEBUG = debug
    try:
        return _dispatch(argv)
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        if debug or not errors.is_user_error(err):
            raise
        print(f"vila-hd: error: {errors.describe(err)}", file=sys.stderr)
        return 1
    finally:
        errors.DEBUG = False


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in FORWARDED:
        module, function, _ = FORWARDED[argv[0]]
        code = getattr(importlib.import_module(module), function)(argv[1:])
        return code if isinstance(code, int) else 0
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""What the commands that load a model share: the model / generation / serving-limit argument groups, the
engine they describe (:func:`load_engine`), and the one-line messages of a model that cannot be loaded.

``vila-hd chat``, ``infer``, ``serve`` and ``eval`` add these groups; ``train``, ``merge-lora`` and ``convert``
name their checkpoint in load errors with :func:`naming_model`. The engine is imported only when a command
runs (or builds the serving-limit defaults), so importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from vila_hd import dtypes, errors
from vila_hd.arguments import (
    SEED_MAX,
    limit_arg,
    look_close_arg,
    non_negative_float,
    positive_int,
    probability,
    seed_arg,
)


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
        choices=["auto", *dtypes.CHOICES],
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


# The serving-limit flags: (flag, the ServingLimits field it sets, help).
LIMITS = (
    ("--limit-image-pixels", "max_image_pixels", "most pixels per image, checked before decoding (default: %(default)s)"),
    ("--limit-images", "max_images_per_prompt", "most images per prompt (conversation) (default: %(default)s)"),
    ("--limit-new-tokens", "max_new_tokens", "largest max_new_tokens a request may ask for (default: %(default)s)"),
    ("--limit-prompt-tokens", "max_prompt_tokens",
     "most prompt tokens after image expansion (default: the model's context length)"),
)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    from vila_hd.engine import ServingLimits

    defaults = ServingLimits()
    group = parser.add_argument_group(
        "serving limits", "what one request may cost; a request over a limit is refused with a message ('none' lifts one)"
    )
    for flag, field, text in LIMITS:
        group.add_argument(flag, type=limit_arg, default=getattr(defaults, field), metavar="N", help=text)


def serving_limits(args: argparse.Namespace):
    from vila_hd.engine import ServingLimits

    return ServingLimits(**{field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in LIMITS})


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


# --- a model that cannot be loaded: one line naming the culprit file ---------------------------------------
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

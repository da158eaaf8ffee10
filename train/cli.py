"""The training commands of ``vila-hd`` (also ``python -m vila_hd.train.cli COMMAND ...``).

    vila-hd train configs/stages/sft.yaml [--set key=value ...] [--no-resume]
    vila-hd finetune-lora --model DIR --data train.json --media images/ [--output-dir DIR] [--set ...]
    vila-hd merge-lora --adapter DIR --out DIR
    vila-hd data check CONFIG_OR_FILE [--media DIR] [--model DIR | --preset tiny]
    vila-hd pretrain configs/ps3/tiny_demo.yaml [--set key=value ...]

Each is a :class:`vila_hd.arguments.Command` (``add_arguments``, ``run(args) -> exit code``); the training code
is imported when one runs. ``train``, ``finetune-lora`` and ``pretrain`` run under ``deepspeed`` / ``torchrun``
(or plain ``python`` for one process).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from vila_hd import dtypes, errors
from vila_hd.arguments import (
    Command,
    UsageError,
    dispatch,
    guarded,
    look_close_arg,
    non_negative_int,
    positive_float,
    positive_int,
)
from vila_hd.serve.arguments import naming_model
from vila_hd.train.config import CONFIG_ROOT
from vila_hd.train.pretrain import arguments as pretrain_arguments

LORA_RECIPE = os.path.join(CONFIG_ROOT, "stages", "lora.yaml")


def _set_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (YAML value), e.g. --set data.max_length=4096; repeatable")


# --- vila-hd train ---------------------------------------------------------------------------------------------
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="stage recipe, e.g. configs/stages/sft.yaml")
    _set_args(parser)
    parser.add_argument("--no-resume", action="store_true",
                        help="start from the init even if the output directory holds checkpoints")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _train(args: argparse.Namespace) -> int:
    """``vila-hd train``: run one stage recipe."""
    errors.require_extra("train", "vila-hd train", ["deepspeed"])
    from vila_hd.train.config import load_stage
    from vila_hd.train.stage import run_stage

    config = load_stage(args.config, args.overrides)
    if config.lora is not None:
        errors.require_extra("train", f"vila-hd train {args.config} (a LoRA recipe)", ["peft"])
    with naming_model(config.init.model or config.init.llm or args.config):
        run_stage(config, resume=not args.no_resume)
    _say_where(config)
    return 0


def _say_where(config) -> None:
    """The last line of a finished stage (rank 0): the folder of its result."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    final = os.path.join(config.output_dir, "final")
    if config.lora is not None:
        print(f"wrote the LoRA adapter to {final} (chat and eval load it as it is; `vila-hd merge-lora --adapter "
              f"{final} --out DIR` folds it into its base)", flush=True)
    elif config.checkpoint.export_final:
        print(f"exported the VILA-HD checkpoint to {final}", flush=True)
    else:
        print(f"checkpoints in {os.path.join(config.output_dir, 'checkpoints')} (checkpoint.export_final is off: "
              "no final export)", flush=True)


def _recipe_defaults(path: str) -> dict:
    """The fields of a recipe YAML as written (for help texts; empty if it cannot be read)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _value(recipe: dict, key: str):
    """The value of a dotted key in a recipe as written (``None`` where it is not set)."""
    value = recipe
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _default(recipe: dict, key: str) -> str:
    value = _value(recipe, key)
    return "default: the recipe's" if value is None else f"recipe default: {value}"


# --- vila-hd finetune-lora, merge-lora -------------------------------------------------------------------------
def _finetune_lora_arguments(parser: argparse.ArgumentParser) -> None:
    recipe = _recipe_defaults(LORA_RECIPE)
    parser.add_argument("--model", required=True, help="VILA-HD checkpoint directory to start from")
    parser.add_argument("--data", required=True, help="LLaVA .json/.jsonl, a .parquet file or a saved dataset dir")
    parser.add_argument("--media", help="folder the image paths of --data are relative to and must stay "
                        "inside (default: the folder of --data)")
    parser.add_argument("--format", choices=["llava", "messages"],
                        help="record format of --data (default: llava for .json/.jsonl, messages otherwise)")
    parser.add_argument("--output-dir", default="outputs/lora", help="where checkpoints and the final adapter "
                        "(OUTPUT_DIR/final) are written (default: %(default)s)")
    parser.add_argument("--recipe", default=LORA_RECIPE, help=f"base recipe (default {LORA_RECIPE})")
    parser.add_argument("--epochs", type=positive_float,
                        help=f"passes over the data ({_default(recipe, 'epochs')})")
    parser.add_argument("--lr", type=positive_float, help="one learning rate for the LoRA matrices and the fully "
                        f"trained modules (recipe defaults: LoRA {_value(recipe, 'trainable.llm')}, "
                        f"projector {_value(recipe, 'trainable.projector')})")
    parser.add_argument("--rank", type=positive_int, dest="lora_r",
                        help=f"LoRA rank r ({_default(recipe, 'lora.r')})")
    parser.add_argument("--alpha", type=positive_int, help=f"LoRA alpha ({_default(recipe, 'lora.alpha')})")
    parser.add_argument("--max-length", type=positive_int, help="token limit of a sample after image-token "
                        f"expansion; longer samples are skipped ({_default(recipe, 'data.max_length')})")
    parser.add_argument("--micro-batch-size", type=positive_int, help="samples per GPU per forward pass "
                        f"({_default(recipe, 'batch.micro_batch_size')})")
    parser.add_argument("--global-batch-size", type=positive_int, help="samples per optimizer step over all GPUs, "
                        "a multiple of micro batch x GPUs (gradient accumulation fills the rest; "
                        f"{_default(recipe, 'batch.global_batch_size')})")
    parser.add_argument("--deepspeed", help="zero2 | zero3 | zero3_offload | a JSON path "
                        f"({_default(recipe, 'deepspeed')})")
    parser.add_argument("--qlora", action="store_true", help="load the LLM in 4 bits (bitsandbytes + a GPU; "
                        "default: off)")
    _set_args(parser)
    parser.add_argument("--no-resume", action="store_true", help="start from --model even if --output-dir holds "
                        "checkpoints of an earlier run (default: resume from the latest one)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _finetune_lora(args: argparse.Namespace) -> int:
    """``vila-hd finetune-lora``: LoRA on a custom dataset (LLaVA JSON/JSONL or a ``messages`` dataset)."""
    errors.require_extra("train", "vila-hd finetune-lora", ["deepspeed", "peft"])
    from vila_hd.train.config import load_stage, refuse_output_in_init
    from vila_hd.train.stage import run_stage

    refuse_output_in_init(args.output_dir, {"--model": args.model}, "--output-dir")
    dataset = {"path": os.path.abspath(args.data)}
    if args.media:
        dataset["media"] = os.path.abspath(args.media)
    if args.format:
        dataset["format"] = args.format
    sets = [f"init.model={os.path.abspath(args.model)}", f"output_dir={args.output_dir}", "data.registry=",
            "data.mixture=custom"]
    import json

    sets.append("data.datasets=" + json.dumps({"custom": dataset}))
    for flag, key in ((args.epochs, "epochs"), (args.lora_r, "lora.r"), (args.alpha, "lora.alpha"),
                      (args.max_length, "data.max_length"), (args.micro_batch_size, "batch.micro_batch_size"),
                      (args.global_batch_size, "batch.global_batch_size"), (args.deepspeed, "deepspeed")):
        if flag is not None:
            sets.append(f"{key}={flag}")
    if args.lr is not None:
        sets += [f"trainable.{part}={args.lr}" for part in ("llm", "projector", "prompt_head", "selection")]
    if args.qlora:
        sets.append("lora.quantize=4bit")
    config = load_stage(args.recipe, sets + args.overrides)
    with naming_model(config.init.model or args.model):
        run_stage(config, resume=not args.no_resume)
    _say_where(config)
    return 0


def _merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json names its base)")
    parser.add_argument("--out", required=True, help="output directory of the merged checkpoint")
    parser.add_argument("--dtype", choices=dtypes.CHOICES, default=None,
                        help="dtype of the written weights (default: the base checkpoint's)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (never into the "
                        "adapter's base checkpoint): the *.safetensors files and model.safetensors.index.json "
                        "of an earlier checkpoint there are deleted first; other files are kept")


def _merge_lora(args: argparse.Namespace) -> int:
    """``vila-hd merge-lora``: fold an adapter into its base model."""
    errors.require_extra("train", "vila-hd merge-lora", ["peft"])
    import torch

    import vila_hd.train.trainer  # noqa: F401 - its logging filter drops DeepSpeed's banner (save_pretrained imports it)
    from vila_hd.train.lora import merge_adapter

    dtype = dtypes.resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
    with naming_model(args.adapter):
        out = merge_adapter(args.adapter, args.out, dtype=dtype, force=args.force)
    print(f"merged {args.adapter} into {out}")
    return 0


# --- vila-hd data check ---------------------------------------------------------------------------------------
def _check_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("target", metavar="CONFIG_OR_FILE",
                       help="a stage recipe, a dataset registry YAML, or a data file / saved dataset directory")
    check.add_argument("--media", help="media folder of a data file: image paths are relative to it and must stay "
                       "inside (default: the data file's folder)")
    check.add_argument("--allow-outside-media", action="store_true",
                       help="(for a data file) let records name absolute paths and ../ escapes out of --media")
    check.add_argument("--format", choices=["llava", "messages"],
                       help="record format of a data file (default: llava for .json/.jsonl, messages otherwise)")
    check.add_argument("--mixture", help="check only these datasets of a registry (mixture syntax)")
    check.add_argument("--model", help="checkpoint whose tokenizer / chat template / token layout to use")
    check.add_argument("--preset", help="a tiny random-weight preset (e.g. tiny) instead of --model: checks "
                       "tokenization, lengths and image tokens with that preset's tokenizer and token layout, with "
                       "no checkpoint at hand (the lengths are those of the preset, not of your model)")
    check.add_argument("--max-length", type=positive_int, help="token limit after image expansion (default: the recipe's, "
                       "else 8192)")
    check.add_argument("--num-look-close", type=look_close_arg, metavar="N|all",
                       help="look-close steps per image used in training (as chat's --steps; default: the recipe's)")
    check.add_argument("--num-token-look-close", type=look_close_arg, metavar="N|all",
                       help="high-res patches per image used in training (as chat's --tokens; default: the recipe's)")
    check.add_argument("--no-images", action="store_true", help="skip decoding the images")
    check.add_argument("--workers", type=positive_int, default=8, help="threads (default: %(default)s)")
    check.add_argument("--show", type=non_negative_int, default=None, help="list at most N bad samples")
    check.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="(for a stage recipe) override a field it reads: " + ", ".join(CHECK_READS))


def _check(args: argparse.Namespace) -> int:
    """``vila-hd data check``: validate training data; exit code 0 when no sample is bad, 1 when a bad sample is
    found, 2 when the data cannot be checked at all (a missing file, a JSON document that does not parse, a data
    file of an unknown kind, a model that does not load)."""
    ignored = [item for item in args.overrides if not _read_by_check(item, args.target)]
    if ignored:
        raise UsageError(f"--set {ignored[0]}: data check reads only "
                         + (", ".join(CHECK_READS) + " of a stage recipe" if _kind(args.target) == "stage"
                            else "a stage recipe's fields (this target is not one)"))
    try:
        report = run_check(args)
    except (OSError, ValueError, KeyError) as err:  # a data file that cannot be opened at all: say which and why
        if errors.DEBUG:
            traceback.print_exc()
        print(f"vila-hd data check: error: {errors.describe(err)}", file=sys.stderr)
        return 2
    print(report.format(args.show))
    if args.json:
        with errors.naming_file(args.json, "report"), open(args.json, "w") as f:
            f.write(report.to_json())
    return 1 if report.bad else 0


# The stage-recipe fields `data check` reads (a key or a key under it); --set of any other is refused.
CHECK_READS = ("init", "data.registry", "data.datasets", "data.mixture", "data.max_length", "look_close")


def _read_by_check(item: str, target: str) -> bool:
    key = item.split("=", 1)[0].strip()
    return _kind(target) == "stage" and any(key == k or key.startswith(k + ".") for k in CHECK_READS)


def _kind(path: str) -> str:
    if os.path.isdir(path) or not path.endswith((".yaml", ".yml")):
        return "file"
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return "stage" if isinstance(data, dict) and ("init" in data or "stage" in data) else "registry"


def run_check(args):
    from vila_hd.compat import datasets as ds
    from vila_hd.train.config import StageConfig, load_stage
    from vila_hd.train.data.check import check_sources
    from vila_hd.train.data.dataset import SampleEncoder
    from vila_hd.train.stage import load_init_processor, open_registry

    kind = _kind(args.target)
    stage = load_stage(args.target, args.overrides) if kind == "stage" else StageConfig()
    if kind == "stage":
        registry = open_registry(stage)
    elif kind == "registry":
        registry = ds.load_registry(args.target)
    else:
        spec = {"path": os.path.abspath(args.target)}
        if args.media:
            spec["media"] = os.path.abspath(args.media)
        if args.format:
            spec["format"] = args.format
        if args.allow_outside_media:
            spec["allow_outside_media"] = True
        name = os.path.basename(args.target.rstrip("/"))
        registry = {name: ds.make_entry(name, spec, allow_hint=ds.ALLOW_BY_FLAG)}
    mixture = args.mixture or (stage.data.mixture if kind == "stage" else None)
    names = list(dict.fromkeys(t.name for t in ds.parse_mixture(mixture))) if mixture else list(registry)
    unknown = [name for name in names if name not in registry]
    if unknown:
        where = "--mixture" if args.mixture else f"{args.target}: data.mixture"
        raise errors.ConfigError(f"{where} names unknown dataset(s) {unknown}; registered: {sorted(registry)}")
    sources = ds.open_sources(registry, names)

    processor = None
    if args.model or args.preset:
        stage.init.model, stage.init.preset = args.model, args.preset
        stage.init.ps3 = stage.init.llm = None
        processor = load_init_processor(stage)
    elif kind == "stage":
        processor = load_init_processor(stage)
    encoder = None
    if processor is not None:
        look = stage.look_close.kwargs()
        if args.num_look_close is not None or args.num_token_look_close is not None:
            look = {"num_look_close": args.num_look_close, "num_token_look_close": args.num_token_look_close}
        max_length = args.max_length or stage.data.max_length
        encoder = SampleEncoder(processor, max_length, {k: v for k, v in look.items() if v is not None})
    return check_sources(sources, encoder, load_images=not args.no_images, workers=args.workers)


# --- vila-hd pretrain ------------------------------------------------------------------------------------------
def _pretrain(args: argparse.Namespace) -> int:
    errors.require_extra("train", "vila-hd pretrain", ["deepspeed"])
    from vila_hd.train.pretrain.loop import pretrain

    return pretrain(args)


# --- the commands ----------------------------------------------------------------------------------------------
TRAIN = Command("train", help="train one VILA-HD stage from its YAML recipe", add_arguments=_train_arguments,
                run=_train, description="Train one VILA-HD stage from its YAML recipe (run under deepspeed / torchrun "
                "for several GPUs).")
FINETUNE_LORA = Command("finetune-lora", help="LoRA fine-tuning (adapters keep the projector)",
                        add_arguments=_finetune_lora_arguments, run=_finetune_lora,
                        description="LoRA fine-tuning of a VILA-HD checkpoint on your data. Unset flags take the "
                        f"values of --recipe (defaults below: {LORA_RECIPE}).")
MERGE_LORA = Command("merge-lora", help="fold a LoRA adapter into its base checkpoint",
                     add_arguments=_merge_lora_arguments, run=_merge_lora,
                     description="Write a merged checkpoint from a LoRA adapter directory.")
DATA_CHECK = Command("check", help="report every sample training would skip, with its reason",
                     add_arguments=_check_arguments, run=_check,
                     description="Check training data before training: every sample training would skip (missing or "
                     "unreadable image, bad turns, too long after image-token expansion, ...) is listed with its "
                     "reason, and warnings for samples trained on but maybe not as meant. Exit code 0: no bad sample; "
                     "1: bad samples found; 2: the data cannot be checked at all (a missing or unreadable data file, "
                     "a model that does not load).")
DATA = Command("data", help="data tools (`vila-hd data check`)", description="Data tools.", subcommands=(DATA_CHECK,))
PRETRAIN = pretrain_arguments.command(_pretrain)

# The commands on their own, for Python callers (argv -> exit code).
train_main, finetune_lora_main, merge_lora_main, data_main = TRAIN.main, FINETUNE_LORA.main, MERGE_LORA.main, DATA.main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The `deepspeed` launcher puts --local_rank=N before the user's arguments; the rank comes from the
    # environment (LOCAL_RANK) anyway.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    return dispatch((TRAIN, FINETUNE_LORA, MERGE_LORA, DATA), argv, "python -m vila_hd.train.cli")


if __name__ == "__main__":
    sys.exit(guarded(main))

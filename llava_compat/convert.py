"""``vila-hd convert --to vila|hf SRC DST``: convert between the VILA layout and our single directory.

SRC may be either layout (recognised from its ``config.json``), a local directory or a Hub id.
``--to hf`` writes ``config.json`` + sharded safetensors + processor files; ``--to vila`` writes
``llm/``, ``vision_tower/``, ``mm_projector/`` and the VILA ``config.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="vila-hd convert", description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=["vila", "hf"], help="layout to write")
    parser.add_argument("src", help="checkpoint directory or Hub id (either layout)")
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep the checkpoint's)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="shard size of the HF layout")
    parser.add_argument("--force", action="store_true", help="write into a non-empty dst")
    return parser


def convert(
    src: str, dst: str, to: str, dtype: str | None = None, max_shard_size: str = "5GB", force: bool = False
) -> None:
    """Load ``src`` (either layout) and write it to ``dst`` in layout ``to`` (``vila`` or ``hf``)."""
    from llava_compat.vila_checkpoint import export_vila_checkpoint
    from vila_hd.cli import check_chat_template, naming_model
    from vila_hd.errors import naming_file
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.processing import VilaHDProcessor

    if to not in ("vila", "hf"):
        raise ValueError(f"--to must be 'vila' or 'hf', got {to!r}")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise FileExistsError(f"{dst} exists and is not empty (use --force to write into it)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("src and dst must differ")
    torch_dtype = getattr(torch, dtype) if dtype else None
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    with naming_model(src):
        model = VilaHDForConditionalGeneration.from_pretrained(src, **kwargs)
        processor = VilaHDProcessor.from_pretrained(src)
        check_chat_template(processor, src)
    if torch_dtype is not None:
        model.to(torch_dtype)
    with naming_file(dst, "output directory"):
        if to == "hf":
            model.save_pretrained(dst, safe_serialization=True, max_shard_size=max_shard_size)
            processor.save_pretrained(dst)
        else:
            export_vila_checkpoint(model, processor, dst)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vila-hd convert`` (the CLI passes the arguments after ``convert``)."""
    args = build_parser().parse_args(argv)
    convert(args.src, args.dst, args.to, args.dtype, args.max_shard_size, args.force)  # errors: vila_hd.cli.main
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


if __name__ == "__main__":  # pragma: no cover - errors printed as vila-hd prints them
    from vila_hd.cli import main as vila_hd_main

    sys.exit(vila_hd_main(["convert", *sys.argv[1:]]))

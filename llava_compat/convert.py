"""``vila-hd convert --to vila|hf SRC DST``: convert between the VILA layout and our single directory.

SRC may be either layout (recognised from its ``config.json``), a local directory or a Hub id.
``--to hf`` writes ``config.json`` + sharded safetensors + processor files; ``--to vila`` writes
``llm/``, ``vision_tower/``, ``mm_projector/`` and the VILA ``config.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from vila_hd.arguments import Command, guarded
from vila_hd.quiet import drop_deepspeed_banners

DESCRIPTION = """Convert a checkpoint between the VILA layout (llm/, vision_tower/, mm_projector/) and the
single-directory layout of VILA-HD.

SRC may be either layout (recognised from its config.json): a local directory or a Hub id owner/name.
--to hf writes config.json, sharded safetensors and the processor files; --to vila writes llm/,
vision_tower/, mm_projector/ and VILA's config.json."""

# --max-shard-size units, case-insensitive: decimal (KB = 1000 bytes) and binary (KiB = 1024 bytes)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def shard_size(value: str) -> int:
    """The argparse type of ``--max-shard-size``: a number of bytes, or a size such as ``5GB`` / ``500MB`` /
    ``100KB`` (``GiB`` / ``MiB`` / ``KiB``: powers of 1024); returns bytes."""
    match = _SIZE.fullmatch(value)
    unit = match.group(2).upper() if match else None
    size = int(float(match.group(1)) * SIZE_UNITS[unit]) if unit in SIZE_UNITS else 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 5GB, 500MB or 100KB, or a number of bytes, got {value!r}"
        )
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=["vila", "hf"], help="layout to write")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory or Hub id (either layout)")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep the checkpoint's)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard written, e.g. 5GB, 500MB or a number of bytes (the HF layout's weights; "
        "llm/ and vision_tower/ of the VILA layout) (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty dst")


def resolve_source(src: str) -> str:
    """The local directory of checkpoint ``src`` (a Hub id is downloaded: metadata and safetensors only), checked
    to be one of the two layouts. A local-looking path that is a file or missing is an error, never a Hub
    request; a directory without ``config.json`` or without weights is refused with one line."""
    from vila_hd.hub import refuse_pickled_weights, resolve_checkpoint
    from vila_hd.model.vila_layout import is_vila_checkpoint

    path = resolve_checkpoint(src, "checkpoint")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(
                f"{path} is a LoRA adapter (adapter_config.json, no config.json), not a checkpoint: merge it into "
                f"its base model first with `vila-hd merge-lora --adapter {path} --out MERGED`, then convert MERGED"
            )
        raise FileNotFoundError(f"{path} has no config.json; it is not a VILA-HD checkpoint (either layout)")
    if not is_vila_checkpoint(path) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
        refuse_pickled_weights(path)  # names the pickles, if that is what it holds
        raise FileNotFoundError(f"{path} has no *.safetensors weights; it is not a VILA-HD checkpoint")
    return path


def convert(
    src: str, dst: str, to: str, dtype: str | None = None, max_shard_size: int | str = "5GB", force: bool = False
) -> None:
    """Load ``src`` (either layout) and write it to ``dst`` in layout ``to`` (``vila`` or ``hf``);
    ``max_shard_size``: bytes, or a size string as transformers reads it (``"5GB"``)."""
    import torch

    from vila_hd.compat.vila_checkpoint import export_vila_checkpoint
    from vila_hd.dtypes import resolve_dtype
    from vila_hd.errors import naming_file
    from vila_hd.loading import load_pretrained
    from vila_hd.serve.arguments import check_chat_template, naming_model

    if to not in ("vila", "hf"):
        raise ValueError(f"--to must be 'vila' or 'hf', got {to!r}")
    src = resolve_source(src)
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError(f"src and dst are the same directory ({dst}); write the converted checkpoint elsewhere")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise FileExistsError(f"{dst} exists and is not empty (use --force to write into it)")
    torch_dtype = resolve_dtype(dtype, torch.device("cpu")) if dtype else None
    with naming_model(src):
        model, processor = load_pretrained(src, dtype=torch_dtype, device="cpu")  # fp32 unless dtype
        check_chat_template(processor, src)
    if torch_dtype is not None:
        model.to(torch_dtype)
    drop_deepspeed_banners()  # save_pretrained may import DeepSpeed, which logs a banner on a CPU machine
    with naming_file(dst, "output directory"):
        if to == "hf":
            model.save_pretrained(dst, safe_serialization=True, max_shard_size=max_shard_size)
            processor.save_pretrained(dst)
        else:
            export_vila_checkpoint(model, processor, dst, max_shard_size=max_shard_size)


def run(args: argparse.Namespace) -> int:
    """``vila-hd convert``: errors are reported by ``vila_hd.cli.main``."""
    convert(args.src, args.dst, args.to, args.dtype, args.max_shard_size, args.force)
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


CONVERT = Command("convert", help="convert checkpoints between the VILA layout and our single directory",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
main = CONVERT.main  # ``main(argv)``: the command from Python, as the other commands' ``*_main``

if __name__ == "__main__":  # pragma: no cover - `vila-hd convert` reports errors in one line
    sys.exit(guarded(main))

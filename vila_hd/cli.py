"""``vila-hd``: one entry point, one subcommand per job. The table of them and the error handling; the work
lives in the commands' modules.

    vila-hd chat --model DIR_OR_HUB_ID [--image PATH ...] [--prompt TEXT [--json]]
    vila-hd infer --model DIR_OR_HUB_ID --input questions.jsonl --output answers.jsonl
    vila-hd train | finetune-lora | merge-lora | data | pretrain | eval | synth | convert | serve | demo ...

Every subcommand is a :class:`vila_hd.arguments.Command` (``add_arguments(parser)``, ``run(args) -> exit
code``) listed in :data:`COMMANDS`. Bad arguments exit with code 2 (argparse's message); a model that cannot be
loaded, or any other failure of a command, prints ``vila-hd <command>: error: ...`` and exits with code 1. One
handler in :func:`main` covers every subcommand: a user error (see :func:`vila_hd.errors.is_user_error`: the
project's errors, a corrupt safetensors / JSON / YAML file, a bad chat template, a missing file, a full disk)
prints one line, ``vila-hd: error: ...``, and exits with code 1; ``vila-hd --debug COMMAND ...`` (``--debug``
may also come anywhere after the command) prints its traceback too. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from vila_hd import __version__, chat, demo, infer
from vila_hd.arguments import DEBUG_FLAG, DEBUG_HELP, Command, guarded, run_parsed
from vila_hd.compat import convert
from vila_hd.eval import cli as eval_cli
from vila_hd.serve import cli as serve_cli
from vila_hd.train import cli as train_cli

# The subcommands, in the order `vila-hd --help` lists them.
COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        chat.CHAT, infer.INFER, train_cli.TRAIN, train_cli.FINETUNE_LORA, train_cli.MERGE_LORA, train_cli.DATA,
        train_cli.PRETRAIN, eval_cli.EVAL, eval_cli.SYNTH, convert.CONVERT, serve_cli.SERVE, demo.DEMO,
    )
}


def build_parser(names: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``vila-hd`` parser with every command; ``names``: only these get their arguments (the others are
    listed for ``--help``), default all."""
    parser = argparse.ArgumentParser(
        prog="vila-hd",
        description="VILA-HD: high-resolution multimodal LLM on the PS3 vision encoder.",
        epilog="`vila-hd COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"vila-hd {__version__}")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"{DEBUG_HELP} (also accepted after COMMAND)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = set(COMMANDS if names is None else names)
    for name, command in COMMANDS.items():
        command.add_to(commands, with_arguments=name in names)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vila-hd ARGV``; returns the exit code (argparse exits with 2 on bad arguments, a user error
    returns 1 after one ``vila-hd: error:`` line; see :func:`vila_hd.arguments.guarded`)."""
    return guarded(_dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    """``vila-hd COMMAND ARGS`` runs the command with its own parser (``vila-hd COMMAND: error:`` lines); anything
    else (``--help``, ``--version``, no command, an unknown one) goes to the top-level parser."""
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].main(argv[1:])
    return run_parsed(build_parser(names=[a for a in argv if a in COMMANDS]).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

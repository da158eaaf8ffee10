"""The one convention of the ``vila-hd`` subcommands, and the argparse types they share.

A subcommand is a :class:`Command`: its name, its one-line help, ``add_arguments(parser)`` and
``run(args) -> exit code`` (a command with sub-subcommands, ``vila-hd data check``, lists them instead).
``vila_hd.cli`` holds the table of them; ``Command.main(argv)`` runs one on its own (``python -m
vila_hd.train.cli train ...``). The modules that define commands keep their heavy imports (torch,
transformers, DeepSpeed) inside ``run``, so that ``vila-hd --help`` stays fast.

Argument types turn a bad value into argparse's exit code 2 with the message (``expected ...``); a
combination of values that does not go together is a :class:`UsageError` raised by ``run``, reported the
same way by the command's parser.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vila_hd import errors

DEBUG_FLAG = "--debug"
DEBUG_HELP = "print the traceback of errors that are otherwise one 'vila-hd: error:' line"


class UsageError(Exception):
    """Arguments that parse but do not go together: the command's parser reports it as argparse reports a bad
    argument (its usage, then ``PROG: error: MESSAGE``) and exits with code 2."""


@dataclass
class Command:
    """One subcommand of ``vila-hd``. ``help``: its line in ``vila-hd --help``; ``description`` / ``epilog``:
    its own ``--help`` (``formatter_class`` as argparse takes it); ``subcommands``: the commands under it
    (``vila-hd data check``), instead of ``add_arguments`` and ``run``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    description: str | None = None
    epilog: str | None = None
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter
    subcommands: tuple[Command, ...] = ()

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        """A parser of its own, ``prog`` (default ``vila-hd NAME``) in its usage and error lines."""
        parser = argparse.ArgumentParser(prog=prog or f"vila-hd {self.name}", description=self.description,
                                         epilog=self.epilog, formatter_class=self.formatter_class)
        self.fill(parser)
        return parser

    def add_to(self, commands: argparse._SubParsersAction, with_arguments: bool = True) -> argparse.ArgumentParser:
        """Its parser under ``commands`` (a parser's subparsers); without its arguments when ``with_arguments``
        is false (listed for ``--help`` only)."""
        parser = commands.add_parser(self.name, help=self.help, description=self.description, epilog=self.epilog,
                                     formatter_class=self.formatter_class)
        if with_arguments:
            self.fill(parser)
        return parser

    def fill(self, parser: argparse.ArgumentParser) -> None:
        """Add its arguments (or its subcommands) to ``parser``, and mark what parsed ``args`` runs."""
        if self.subcommands:
            commands = parser.add_subparsers(dest="command", required=True)
            for command in self.subcommands:
                command.add_to(commands)
        else:
            self.add_arguments(parser)
            parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)  # taken out by `guarded`
        parser.set_defaults(parsed_by=(self, parser))  # a subcommand's parser sets it after its parent's

    def main(self, argv: Sequence[str] | None = None) -> int:
        """``PROG ARGV``: parse ``argv`` (default ``sys.argv[1:]``) and run; the exit code (argparse exits with
        code 2 on bad arguments)."""
        return run_parsed(self.parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run the command whose parser produced ``args`` (the innermost one: ``data check``); its exit code. A
    :class:`UsageError` is reported by that parser (exit code 2)."""
    command, parser = args.parsed_by
    try:
        return command.run(args)
    except UsageError as err:
        parser.error(str(err))


def dispatch(commands: Sequence[Command], argv: Sequence[str], prog: str) -> int:
    """``prog COMMAND ARGS``: run the command named ``argv[0]`` on the rest (``python -m ...`` entry points).
    ``--help`` lists the commands (exit code 0); no command, or one not in ``commands``, lists them as usage
    (exit code 2)."""
    by_name = {command.name: command for command in commands}
    if argv and argv[0] in by_name:
        return by_name[argv[0]].main(argv[1:])
    listing = "\n".join(f"  {name:<14} {command.help}" for name, command in by_name.items())
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print(f"usage: {prog} {{{','.join(by_name)}}} ...\n\ncommands:\n{listing}\n\n`{prog} COMMAND --help` "
          "describes each command.", file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


def guarded(call: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``call(argv)`` (default ``sys.argv[1:]``) as a command line: ``--debug`` anywhere before a ``--`` is
    taken out and prints the traceback of a user error; otherwise a user error (see
    :func:`vila_hd.errors.is_user_error`) is one ``vila-hd: error: ...`` line and exit code 1. Anything else is a
    bug and propagates. ``vila-hd`` and every ``python -m`` entry point run through it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv  # --debug before a `--` only
    debug = DEBUG_FLAG in options
    argv = [a for a in options if a != DEBUG_FLAG] + argv[len(options):]
    errors.DEBUG = debug
    try:
        return call(argv)
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        if debug or not errors.is_user_error(err):
            raise
        print(f"vila-hd: error: {errors.describe(err)}", file=sys.stderr)
        return 1
    finally:
        errors.DEBUG = False


# --- argument types (argparse turns their errors into exit code 2 with the message) ----------------------------
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

# The one parser of look-close budgets given on the command line: "N" (steps or patches) or "all".
def parse_look_close(name: str, value: Any) -> int | str | None:
    """``None``, ``"all"`` or a non-negative int (strings of digits accepted); anything else is an error."""
    if value is None or value == "all":
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}") from None
    if number < 0 or (isinstance(value, float) and value != number):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}")
    return number


def look_close_arg(value: str) -> int | str:
    """An argparse type for ``--steps`` / ``--tokens``: :func:`parse_look_close` with argparse's message."""
    try:
        return parse_look_close("", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'all', got {value!r}") from None


look_close_arg.__name__ = "int (a non-negative integer or 'all')"
positive_int = number_arg(int, lambda n: n >= 1, "a positive integer")
non_negative_int = number_arg(int, lambda n: n >= 0, "an integer >= 0")
positive_float = number_arg(float, lambda n: 0 < n < math.inf, "a number > 0", "a finite number > 0")
non_negative_float = number_arg(float, lambda n: 0 <= n < math.inf, "a number >= 0", "a finite number >= 0")
seed_arg = number_arg(int, lambda n: 0 <= n <= SEED_MAX, f"an integer in 0..{SEED_MAX}",
                      f"an integer in 0..{SEED_MAX} (2**64 - 1)")  # the seeds torch accepts
probability = number_arg(float, lambda n: 0 < n <= 1, "a number in (0, 1]")
port_arg = number_arg(int, lambda n: 0 <= n <= 65535, "a port number in 0..65535")


def limit_arg(value: str) -> int | None:
    """A positive integer, or ``none`` (no limit)."""
    if value.lower() == "none":
        return None
    return positive_int(value)

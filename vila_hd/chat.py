"""Chat with a VILA-HD model in the terminal: streamed answers, several images, PS3 selection pictures.

    vila-hd chat --model DIR_OR_HUB_ID [--image PATH ...]
    vila-hd chat --model DIR --image photo.jpg --prompt "What does the sign say?" [--json]

In the session, type a message (end a line with \\ to continue it, or put it between two lines of \"\"\")
or a command (/help lists them). Ctrl-C stops the current answer; Ctrl-D or /exit ends the session.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from vila_hd.arguments import Command, guarded
from vila_hd.images import ImageLoadError, PixelLimitError, load_image
from vila_hd.serve.arguments import add_generation_arguments, add_limit_arguments, add_model_arguments, load_engine

if TYPE_CHECKING:  # the engine (torch) is imported when the command runs: `vila-hd --help` stays fast
    from vila_hd.engine import Engine, GenerationOptions, GenerationResult

COMMANDS_HELP = """commands:
  /image PATH [PATH...]  add image(s); they go with your next message (several per conversation)
  /clear                 forget the conversation (messages and images)
  /set KEY VALUE         steps N|all | tokens N|all | mode top-down|bottom-up | temperature T
                         | max_new_tokens N | top_p P | top_k K      (/set alone shows the settings)
  /show [FILE]           save a PNG of the last image with PS3's selection per scale; prints its path
  /stats                 image tokens, selected %, prefix/encode/prefill/decode times of the last answer
  /help                  this help
  /exit                  quit (or Ctrl-D); Ctrl-C stops the current answer
input: end a line with \\ to continue on the next one, or enclose several lines between two \"\"\" lines;
       start a message with // to send text that begins with /"""


# /set KEY -> (GenerationOptions field, converter, what the value should be)
SETTINGS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "steps": ("num_look_close", str, "a non-negative integer or 'all'"),
    "tokens": ("num_token_look_close", str, "a non-negative integer or 'all'"),
    "mode": ("look_close_mode", str, "top-down or bottom-up"),
    "temperature": ("temperature", float, "a number >= 0"),
    "max_new_tokens": ("max_new_tokens", int, "a positive integer"),
    "top_p": ("top_p", float, "a number in (0, 1]"),
    "top_k": ("top_k", int, "a positive integer"),
}


class ChatSession:
    """The state of one chat and what each command does; reads nothing itself (see :func:`repl`)."""

    def __init__(
        self,
        engine: Engine,
        options: GenerationOptions | None = None,
        system: str | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        error_prefix: str = "error",
    ):
        """``error_prefix`` starts each error line: ``error`` in the interactive session, the command's
        ``vila-hd chat: error`` for one answer (``--prompt``)."""
        self.engine = engine
        self.error_prefix = error_prefix
        self.options = options or engine.options
        self.conversation = engine.conversation(system)
        self.last: GenerationResult | None = None
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._shown = 0

    # --- output helpers ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(f"{self.error_prefix}: {text}", file=self.err, flush=True)

    # --- turns ------------------------------------------------------------------------------------------
    def add_images(self, paths: list[str]) -> bool:
        from vila_hd.engine import LimitExceeded

        ok = True
        for path in paths:
            try:
                held = len(self.conversation.images) + len(self.conversation.pending_images)
                self.engine.limits.check_images(held + 1, "this conversation")
                image = self.conversation.add_image(path, self.engine.max_image_pixels)
            except (ImageLoadError, LimitExceeded) as error:
                self.warn(image_error(error))
                ok = False
                continue
            self.say(f"added image {path} ({image.width}x{image.height}); it goes with your next message")
        return ok

    def ask(self, text: str, stream: bool = True) -> GenerationResult | None:
        """Answer ``text`` (streamed to ``out``). Ctrl-C while the answer streams stops it and keeps what was
        said; Ctrl-C before the first token (while images are prepared) cancels the question."""
        try:
            self.conversation.add_user(text)
        except ValueError as error:
            self.warn(str(error))
            return None
        generation = None
        try:
            generation = self.engine.stream(self.conversation, self.options)
            stopped = self._show(generation, stream)
            result = _wait(generation)
        except KeyboardInterrupt:
            if generation is not None:
                generation.stop()
                generation.thread.join()
            self.conversation.pop_user()
            self.say("[cancelled]")
            return None
        except Exception as error:  # keep the session: report, forget the failed question
            if generation is not None and stream:
                self.out.write("\n")  # end a partly written answer before the message
            self.conversation.pop_user()
            self.warn(str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}")
            return None
        if stream:
            self.out.write("\n[stopped]\n" if stopped else "\n")
            self.out.flush()
        self.conversation.add_assistant(result.text)
        self.last = result
        return result

    def _show(self, generation, stream: bool) -> bool:
        """Write the chunks as they come; ``True`` when Ctrl-C stopped the answer."""
        try:
            for chunk in generation:
                if stream:
                    self.out.write(chunk)
                    self.out.flush()
        except KeyboardInterrupt:
            generation.stop()
            return True
        return False

    # --- commands -----------------------------------------------------------------------------------------
    def handle(self, message: str) -> bool:
        """Run a command or answer a message; ``False`` ends the session."""
        if not message.strip():
            return True
        if message.startswith("//"):
            self.ask(message[1:])
            return True
        if not message.startswith("/"):
            self.ask(message)
            return True
        name, _, rest = message[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit"):
            return False
        handler = {
            "image": self.cmd_image,
            "clear": self.cmd_clear,
            "set": self.cmd_set,
            "show": self.cmd_show,
            "stats": self.cmd_stats,
            "help": self.cmd_help,
        }.get(name)
        if handler is None:
            self.warn(
                f"unknown command /{name}; /help lists the commands (start with // to send text beginning with /)"
            )
        else:
            handler(rest)
        return True

    def cmd_image(self, rest: str) -> None:
        try:
            paths = shlex.split(rest)
        except ValueError:  # unbalanced quotes: take the text as one path
            paths = [rest]
        if not paths:
            self.warn("usage: /image PATH [PATH...]")
            return
        self.add_images(paths)

    def cmd_clear(self, rest: str) -> None:
        n = len(self.conversation.messages)
        self.conversation.clear()
        self.last = None
        self.say(f"conversation cleared ({n} messages forgotten)")

    def cmd_set(self, rest: str) -> None:
        if not rest:
            self.say(self.describe_settings())
            return
        key, _, value = rest.partition(" ")
        key, value = key.replace("-", "_"), value.strip()
        if key not in SETTINGS:
            self.warn(f"unknown setting {key!r}; /set takes {', '.join(SETTINGS)}")
            return
        if not value:
            self.warn(f"usage: /set {key} VALUE")
            return
        from vila_hd.engine import LimitExceeded

        field, convert, expected = SETTINGS[key]
        try:
            options = self.options.updated(**{field: convert(value)})
        except ValueError:
            self.warn(f"bad value for /set {key}: expected {expected}, got {value!r}")
            return
        try:
            self.engine.limits.check_new_tokens(options.max_new_tokens)
        except LimitExceeded as error:
            self.warn(str(error))
            return
        self.options = options
        self.say(self.describe_settings())

    def cmd_show(self, rest: str) -> None:
        selection = self.last.selection(-1) if self.last is not None else None
        if selection is None:
            self.warn("nothing to show yet: add an image (/image PATH) and ask a question about it")
            return
        self._shown += 1
        path = rest or f"vila-hd-selection-{self._shown}.png"
        try:
            written = selection.save(path)
        except (OSError, ValueError) as error:
            self.warn(f"cannot write {path}: {error}")
            return
        self.say(
            f"selection of the last image ({100 * selection.selected_fraction:.1f}% of high-res patches "
            f"selected) saved to {written}"
        )

    def cmd_stats(self, rest: str) -> None:
        if self.last is None:
            self.warn("no answer yet")
            return
        self.say(self.last.stats.format())

    def cmd_help(self, rest: str) -> None:
        self.say(COMMANDS_HELP)

    def describe_settings(self) -> str:
        o, config = self.options, self.engine.model.config
        mode = o.look_close_mode or config.look_close_mode
        mode = {"after_prompt": "top-down", "after_image": "bottom-up"}.get(mode, mode)
        if o.num_look_close is None and o.num_token_look_close is None:
            budget = (
                f"steps {config.num_look_close}"
                if config.num_token_look_close is None
                else f"tokens {config.num_token_look_close}"
            ) + " (checkpoint default)"
        else:
            budget = (
                f"steps {o.num_look_close}" if o.num_token_look_close is None else f"tokens {o.num_token_look_close}"
            )
        temperature = "checkpoint default" if o.temperature is None else o.temperature
        return (
            f"settings: mode {mode} | {budget} | temperature {temperature} | max_new_tokens {o.max_new_tokens}"
            + (f" | top_p {o.top_p}" if o.top_p is not None else "")
            + (f" | top_k {o.top_k}" if o.top_k is not None else "")
        )


def image_error(error: Exception) -> str:
    """The message of an image that cannot be added; a pixel-limit refusal names the command's flag."""
    return error.naming("--limit-image-pixels") if isinstance(error, PixelLimitError) else str(error)


def _wait(generation) -> GenerationResult:
    while True:  # a second Ctrl-C while the answer winds down must not leave the model running
        try:
            return generation.wait()
        except KeyboardInterrupt:
            generation.stop()


# --- input ----------------------------------------------------------------------------------------------------
def line_reader(stream: TextIO) -> Callable[[str], str]:
    """``read(prompt) -> line``: ``input()`` with line editing on a terminal, plain reads on a pipe."""
    if stream is sys.stdin and stream.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - platforms without readline
            pass
        return input

    def read(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    return read


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, lines joined by trailing backslashes, or lines between two \"\"\" lines."""
    line = read(">>> ")
    if line.strip() == '"""':
        lines = []
        while (line := read("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def repl(session: ChatSession, read: Callable[[str], str]) -> None:
    """Read messages until /exit or end of input; Ctrl-C at the prompt drops the line being typed."""
    while True:
        try:
            message = read_message(read)
        except EOFError:
            session.say("")
            return
        except KeyboardInterrupt:
            session.say("\n(Ctrl-D or /exit to quit)")
            continue
        try:
            if not session.handle(message):
                return
        except KeyboardInterrupt:  # Ctrl-C during a command: drop it, keep the session
            session.say("\n[interrupted]")


# --- the command ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="image(s) for the first message (more can be added with /image)",
    )
    parser.add_argument("--prompt", metavar="TEXT", help="answer this message once and exit ('-' reads it from stdin)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --prompt: print one JSON object (answer, stats) instead of streaming text",
    )
    parser.add_argument("--system", metavar="TEXT", help="system message")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_limit_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vila-hd chat``."""
    prog = "vila-hd chat"
    if args.json and args.prompt is None:
        print(f"{prog}: error: --json needs --prompt", file=sys.stderr)
        return 2
    images = []
    for path in args.image:  # a missing or bad image fails before the model is loaded
        try:
            images.append(load_image(path, max_pixels=args.limit_image_pixels))
        except ImageLoadError as error:
            print(f"{prog}: error: {image_error(error)}", file=sys.stderr)
            return 1
    engine = load_engine(args, prog)
    if engine is None:
        return 1
    session = ChatSession(engine, system=args.system, error_prefix="error" if args.prompt is None else f"{prog}: error")
    for image in images:
        session.conversation.add_image(image, engine.max_image_pixels)
    if args.prompt is not None:
        return answer_once(session, sys.stdin.read() if args.prompt == "-" else args.prompt, args)
    device = engine.input_device
    print(
        f"VILA-HD chat: {args.model} on {device} ({engine.model.dtype}); {len(args.image)} image(s) attached. "
        "/help for commands, Ctrl-D or /exit to quit.",
        file=sys.stderr,
        flush=True,
    )
    repl(session, line_reader(sys.stdin))
    return 0


def answer_once(session: ChatSession, prompt: str, args: argparse.Namespace) -> int:
    images = list(args.image)
    result = session.ask(prompt, stream=not args.json)
    if result is None:
        return 1
    if args.json:
        record = {
            "model": args.model,
            "adapter": args.adapter,
            "images": images,
            "prompt": prompt,
            "answer": result.text,
            "stats": result.stats.to_dict(),
        }
        print(json.dumps(record, ensure_ascii=False))
    return 0


CHAT = Command(
    "chat",
    help="interactive chat (streamed answers, images, selection maps), or one answer with --prompt",
    add_arguments=add_arguments,
    run=run,
    description=__doc__,
    epilog="in-session " + COMMANDS_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)

if __name__ == "__main__":
    sys.exit(guarded(CHAT.main))

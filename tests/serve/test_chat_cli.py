"""``vila-hd chat`` on a tiny checkpoint: the REPL through piped stdin and a pseudo-terminal, commands and
their errors, Ctrl-C, multiline input, --prompt / --json, exit codes."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import threading
import time

import pytest
import testpaths
from PIL import Image
from serving_helpers import rgb

from vila_hd import cli
from vila_hd.chat import ChatSession, read_message
from vila_hd.engine import Engine, GenerationOptions, ServingLimits

ROOT = testpaths.REPO_ROOT
TIMING_KEYS = {"preprocess_s", "prefix_s", "encode_s", "prefill_s", "decode_s", "total_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("chat")
    (root / "ckpt").symlink_to(tiny_checkpoint, target_is_directory=True)
    rgb(0, (320, 240)).save(root / "car.png")
    rgb(1, (200, 300)).save(root / "sign.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return root


@pytest.fixture(scope="module")
def engine(files):
    return Engine.from_pretrained(files / "ckpt", options=GenerationOptions(max_new_tokens=6))


@pytest.fixture
def session(engine):
    return ChatSession(engine, out=io.StringIO(), err=io.StringIO())


def run_cli(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- the REPL through piped stdin ---------------------------------------------------------------------------
def test_two_turn_chat_with_image_added_mid_conversation(files, engine, monkeypatch, capsys, tmp_path):
    script = (
        "\n".join(
            [
                "What color is the car?",
                "/stats",
                f"/image {files / 'sign.png'}",
                "What does the sign say?",
                "/stats",
                f"/show {tmp_path / 'sel.png'}",
                "/set steps 1",
                "And now?",
                "/stats",
                "/clear",
                "/stats",
                "/exit",
                "never read",
            ]
        )
        + "\n"
    )
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        ["chat", "--model", str(files / "ckpt"), "--image", str(files / "car.png"), "--max-new-tokens", "6"],
        script,
    )
    assert code == 0, err

    # The same conversation through the engine directly.
    conv = engine.conversation()
    conv.add_image(files / "car.png")
    conv.add_user("What color is the car?")
    first = engine.generate(conv).text
    conv.add_assistant(first)
    conv.add_image(files / "sign.png")
    conv.add_user("What does the sign say?")
    second = engine.generate(conv)
    conv.add_assistant(second.text)
    conv.add_user("And now?")
    third = engine.generate(conv, steps=1).text

    lines = out.splitlines()
    assert lines[0] == first
    assert second.text in lines and third in lines
    assert second.stats.images == 2
    stats = [line for line in lines if line.startswith("image tokens")]
    assert stats == [
        "image tokens   80 per image x 1 image(s) = 80 (16 low-res + 64 high-res per image)",
        "image tokens   80 per image x 2 image(s) = 160 (16 low-res + 64 high-res per image)",
        "image tokens   48 per image x 2 image(s) = 96 (16 low-res + 32 high-res per image)",
    ]
    assert "20.0%" in out and "10.0%" in out
    assert "settings: mode top-down | steps 1" in out
    assert "conversation cleared (6 messages forgotten)" in out
    assert err.count("error: no answer yet") == 1  # /stats after /clear

    # /show wrote the last image (sign.png, 200x300 -> 341x512 per tile) with both scales.
    assert f"saved to {tmp_path / 'sel.png'}" in out
    with Image.open(tmp_path / "sel.png") as png:
        assert png.format == "PNG" and png.size == (2 * (341 + 8) + 8, 2 * (512 + 24) + 8)


def test_clear_empties_the_history(session, files):
    session.add_images([str(files / "car.png")])
    session.handle("What color is the car?")
    session.handle("And the sky?")
    assert len(session.conversation.messages) == 4 and len(session.conversation.images) == 1
    session.handle("/clear")
    assert session.conversation.messages == [] and session.conversation.images == []
    assert session.last is None
    result = session.ask("Hi")
    fresh = session.engine.generate(session.engine.single_turn(None, "Hi"))
    assert result.stats.prompt_tokens == fresh.stats.prompt_tokens and result.text == fresh.text


def test_bad_input_prints_a_message_and_the_session_goes_on(session, files):
    for line in [
        "/image " + str(files / "missing.png"),
        "/image " + str(files / "broken.png"),
        "/image",
        "/frobnicate",
        "/set steps -1",
        "/set steps many",
        "/set mode sideways",
        "/set temperature hot",
        "/set max_new_tokens 0",
        "/set colour red",
        "/set tokens",
        "/show",
        "/stats",
        "look at <image> please",
    ]:
        assert session.handle(line) is True
    err = session.err.getvalue().splitlines()
    assert err == [
        f"error: {files / 'missing.png'}: not found",
        f"error: {files / 'broken.png'}: unrecognised image format",
        "error: usage: /image PATH [PATH...]",
        "error: unknown command /frobnicate; /help lists the commands (start with // to send text beginning with /)",
        "error: bad value for /set steps: expected a non-negative integer or 'all', got '-1'",
        "error: bad value for /set steps: expected a non-negative integer or 'all', got 'many'",
        "error: bad value for /set mode: expected top-down or bottom-up, got 'sideways'",
        "error: bad value for /set temperature: expected a number >= 0, got 'hot'",
        "error: bad value for /set max_new_tokens: expected a positive integer, got '0'",
        "error: unknown setting 'colour'; /set takes steps, tokens, mode, temperature, max_new_tokens, top_p, top_k",
        "error: usage: /set tokens VALUE",
        "error: nothing to show yet: add an image (/image PATH) and ask a question about it",
        "error: no answer yet",
        "error: the message contains the image placeholder <image>; add images with add_image (/image PATH in "
        "the chat) instead",
    ]
    assert session.options == session.engine.options  # no bad value got through
    assert session.conversation.images == [] and session.conversation.messages == []
    result = session.ask("Still there?")
    assert result is not None and result.text and len(session.conversation.messages) == 2


def test_failed_answer_forgets_the_question(session, monkeypatch):
    def too_long(*args, **kwargs):
        raise ValueError("sequence of 9999 tokens exceeds the LLM context")

    monkeypatch.setattr(session.engine, "stream", too_long)
    assert session.ask("Hello") is None
    assert "exceeds the LLM context" in session.err.getvalue()
    assert session.conversation.messages == []


def test_help_and_settings(session):
    session.handle("/help")
    session.handle("/set")
    out = session.out.getvalue()
    assert "/image PATH" in out and "/show [FILE]" in out and "Ctrl-C" in out
    assert "settings: mode top-down | steps 2 (checkpoint default) | temperature checkpoint default" in out
    session.handle("/set tokens 300")
    assert (session.options.num_token_look_close, session.options.num_look_close) == (300, None)
    session.handle("/set mode bottom-up")
    assert session.options.look_close_mode == "after_image"
    assert session.handle("/exit") is False and session.handle("/quit") is False


def test_multiline_input(session):
    lines = iter(["Describe \\", "the image \\", "carefully.", '"""', "line one", "", "line three", '"""'])
    read = lambda prompt: next(lines)  # noqa: E731
    assert read_message(read) == "Describe \nthe image \ncarefully."
    assert read_message(read) == "line one\n\nline three"
    session.handle("first\nsecond")
    assert session.conversation.messages[0]["content"] == "first\nsecond"
    session.handle("//etc/hosts is a file")
    assert session.conversation.messages[2]["content"] == "/etc/hosts is a file"


class InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt (what Ctrl-C does) at the first chunk of the first answer."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def write(self, text):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_session(engine, monkeypatch):
    session = ChatSession(engine, GenerationOptions(max_new_tokens=40), out=InterruptingOut(), err=io.StringIO())
    generations = []
    stream = engine.stream

    def recording_stream(*args, **kwargs):
        generations.append(stream(*args, **kwargs))
        return generations[-1]

    monkeypatch.setattr(engine, "stream", recording_stream)

    # Hold the decoder until the session has asked to stop: the answer is provably cut short.
    state = {"calls": 0, "waited_out": False}

    def hold(module, args):
        state["calls"] += 1
        if state["calls"] >= 3 and generations and not generations[0].stop_requested:
            deadline = time.monotonic() + 10
            while not generations[0].stop_requested and time.monotonic() < deadline:
                time.sleep(0.001)
            state["waited_out"] = not generations[0].stop_requested

    handle = engine.model.language_model.base_model.register_forward_pre_hook(hold)
    try:
        result = session.ask("Describe the image in detail.")
    finally:
        handle.remove()
    assert not state["waited_out"]
    assert result.stats.stopped and result.stats.new_tokens < 40
    assert "[stopped]" in session.out.getvalue()
    assert session.conversation.messages[-1] == {"role": "assistant", "content": result.text}
    assert not generations[0].thread.is_alive()
    again = session.ask("Are you still there?")
    assert again is not None and not again.stats.stopped and len(session.conversation.messages) == 4


# --- one answer: --prompt / --json ---------------------------------------------------------------------------
def test_prompt_and_json_are_stable(files, engine, monkeypatch, capsys):
    argv = [
        "chat",
        "--model",
        str(files / "ckpt"),
        "--image",
        str(files / "car.png"),
        "--max-new-tokens",
        "6",
        "--prompt",
        "What color is the car?",
    ]
    expected = engine.generate(engine.single_turn([files / "car.png"], "What color is the car?"))
    code, out, _ = run_cli(monkeypatch, capsys, argv)
    assert code == 0 and out == expected.text + "\n"
    records = []
    for _ in range(2):
        code, out, _ = run_cli(monkeypatch, capsys, [*argv, "--json"])
        assert code == 0 and out.count("\n") == 1
        records.append(json.loads(out))
    first, second = records
    assert first["answer"] == second["answer"] == expected.text
    assert first["images"] == [str(files / "car.png")] and first["prompt"] == "What color is the car?"
    stable = lambda r: {k: v for k, v in r["stats"].items() if k not in TIMING_KEYS}  # noqa: E731
    assert stable(first) == stable(second)
    assert stable(first)["image_tokens"] == 80 and stable(first)["selected_pct"] == 20.0
    assert stable(first)["new_tokens"] == expected.stats.new_tokens
    assert TIMING_KEYS <= set(first["stats"])
    code, out, _ = run_cli(monkeypatch, capsys, [*argv[:-1], "-", "--json"], stdin="What color is the car?")
    assert json.loads(out)["answer"] == expected.text


def test_missing_model_directory_exits_1(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, ["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 1 and out == ""
    assert f"vila-hd chat: error: cannot load the model: model directory {tmp_path / 'nope'} does not exist" in err
    assert "Traceback" not in err


def test_bad_start_image_exits_1(files, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        ["chat", "--model", str(files / "ckpt"), "--image", str(files / "broken.png"), "--prompt", "hi"],
    )
    assert code == 1 and "broken.png: unrecognised image format" in err


def test_a_bad_start_image_fails_before_the_model_loads(files, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr("vila_hd.chat.load_engine", no_model)
    for name, message in [("broken.png", "unrecognised image format"), ("missing.png", "not found")]:
        code, out, err = run_cli(
            monkeypatch, capsys, ["chat", "--model", str(files / "ckpt"), "--image", str(files / name), "--prompt", "hi"]
        )
        assert code == 1 and out == "" and f"vila-hd chat: error: {files / name}: {message}" in err.splitlines(), err


@pytest.mark.parametrize(
    "limit, message",
    [
        (["--max-new-tokens", "99", "--limit-new-tokens", "5"], "the requested max_new_tokens is 99, above the serving "
                                                                "limit max_new_tokens=5"),
        (["--limit-prompt-tokens", "5"], "above the serving limit max_prompt_tokens=5"),
    ],
)
def test_prompt_mode_limit_errors_are_the_commands_error_line(files, monkeypatch, capsys, limit, message):
    code, out, err = run_cli(monkeypatch, capsys, ["chat", "--model", str(files / "ckpt"), "--prompt", "hi", *limit])
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("vila-hd chat: error: ") and message in errors[0], err


def test_pixel_limit_names_the_flag(files, session, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, ["chat", "--model", str(files / "ckpt"), "--prompt", "hi",
                                                 "--image", str(files / "car.png"), "--limit-image-pixels", "100"])
    expected = (f"{files / 'car.png'} has 320 x 240 = 76800 pixels, above the limit --limit-image-pixels 100; "
                "raise --limit-image-pixels if you trust this file")
    assert code == 1 and f"vila-hd chat: error: {expected}" in err.splitlines()
    engine = Engine(session.engine.model, session.engine.processor, limits=ServingLimits(max_image_pixels=100))
    limited = ChatSession(engine, out=io.StringIO(), err=io.StringIO())
    limited.handle(f"/image {files / 'car.png'}")  # in the session: its own error line, the same text
    assert limited.err.getvalue().splitlines() == [f"error: {expected}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-1"], "argument --steps: expected a non-negative integer or 'all', got '-1'"),
        (["--steps", "2", "--tokens", "100"], "argument --tokens: not allowed with argument --steps"),
        (["--temperature", "warm"], "argument --temperature: expected a number >= 0, got 'warm'"),
        (["--mode", "sideways"], "argument --mode: invalid choice: 'sideways'"),
    ],
)
def test_bad_arguments_exit_2(files, monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--model", str(files / "ckpt"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_json_needs_prompt(files, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, ["chat", "--model", str(files / "ckpt"), "--json"])
    assert code == 2 and "--json needs --prompt" in err


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("chat", "infer", *cli.COMMANDS):
        assert f"    {name}" in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_forwarded_commands_reach_their_own_parser(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: vila-hd {name} ")


# --- a real terminal -------------------------------------------------------------------------------------------
def test_session_in_a_pseudo_terminal(files, engine):
    import fcntl
    import pty
    import termios

    expected = engine.generate(engine.single_turn(None, "Hello there"), max_new_tokens=4).text
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "PYTHONPATH": ROOT}
    # A new session whose controlling terminal is the pty, so that Ctrl-C there becomes SIGINT.
    proc = subprocess.Popen(
        [sys.executable, "-m", "vila_hd.cli", "chat", "--model", str(files / "ckpt"), "--max-new-tokens", "4"],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(child_fd)
    seen, pending = bytearray(), bytearray()

    def expect(marker: bytes, timeout: float = 60) -> bytes:
        """Read until ``marker``; return what came before it and consume both."""
        deadline = time.monotonic() + timeout
        while marker not in pending:
            ready, _, _ = select.select([main_fd], [], [], max(deadline - time.monotonic(), 0))
            try:
                data = os.read(main_fd, 4096) if ready else b""
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"no {marker!r} after {bytes(seen)!r}")
            pending.extend(data)
            seen.extend(data)
        before, _, after = bytes(pending).partition(marker)
        pending[:] = after
        return before

    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        expect(b">>> ")
        os.write(main_fd, b"Hello there\r")
        # A command typed behind the question: its reply proves the answer is complete.
        os.write(main_fd, b"/set max_new_tokens 4\r")
        answer = expect(b"settings: mode top-down")
        assert expected.encode() in answer
        expect(b">>> ")
        # Ctrl-C at the prompt drops the line being typed, not the session. (Sent once readline has echoed the
        # line: a signal that lands just before Python's readline waits for input is only seen at the next key.)
        os.write(main_fd, b"partial line")
        expect(b"partial line")
        time.sleep(0.2)
        os.write(main_fd, b"\x03")
        expect(b"(Ctrl-D or /exit to quit)")
        expect(b">>> ")
        os.write(main_fd, b"/stats\r")
        assert b"tokens         29 prompt, " in expect(b"tokens/s")
        expect(b">>> ")
        os.write(main_fd, b"\x04")  # Ctrl-D ends the session
        assert proc.wait(timeout=60) == 0
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    assert b"Traceback" not in seen

"""vila-hd serve: the installed ``vila-hd serve`` in a subprocess on a free loopback port with the tiny checkpoint,
spoken to with the official openai client and raw httpx; the app in a uvicorn thread where a test needs to
look inside (generate calls, stop events, failures injected into generation)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import testpaths
from serving_helpers import rgb

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from transformers.generation import BaseStreamer  # noqa: E402

from vila_hd.engine import Engine, GenerationOptions, ServingLimits  # noqa: E402
from vila_hd.serve.app import ServeConfig, create_app  # noqa: E402
from vila_hd.serve.schema import MediaPolicy  # noqa: E402

KEY = "test-key"
EXE = os.path.join(os.path.dirname(sys.executable), "vila-hd")
PROMPT_LIMIT = 1000


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def wait_until(condition, timeout_s: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Server:
    """The app on a free loopback port, in a uvicorn thread of this process."""

    def __init__(self, engine, **config):
        self.app = create_app(engine, ServeConfig(**config))
        self.batcher = self.app.state.batcher
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="the server to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.chat_url = self.url + "/v1/chat/completions"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)


class TokenHook(BaseStreamer):
    """Passes the engine's streamer calls on; sleeps ``delay_s`` per step, raises at step ``fail_at``."""

    def __init__(self, inner, delay_s: float = 0.0, fail_at: int | None = None):
        self.inner, self.delay_s, self.fail_at, self.steps = inner, delay_s, fail_at, 0

    def put(self, value) -> None:
        if self.steps == self.fail_at:
            raise RuntimeError("injected failure inside generation")
        self.steps += 1
        time.sleep(self.delay_s)
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


class HookedEngine:
    """The engine with its generate_batch calls recorded (texts, stop event, results); optionally each call
    first waits for ``gate``, decodes slowly (``delay_s`` per token) or fails after its first new token when
    a conversation holds ``poison``."""

    def __init__(self, engine, delay_s: float = 0.0, poison: str | None = None, gate: threading.Event | None = None):
        self._engine, self.delay_s, self.poison, self.gate = engine, delay_s, poison, gate
        self.calls: list[SimpleNamespace] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, conversations, options=None, *, streamer=None, stop=None, **changes):
        texts = [c.messages[-1]["content"] for c in conversations]
        call = SimpleNamespace(texts=texts, stop=stop, results=None)
        self.calls.append(call)
        if self.gate is not None:
            assert self.gate.wait(60)
        poisoned = self.poison is not None and any(self.poison in t for t in texts)
        hooked = TokenHook(streamer, self.delay_s, fail_at=2 if poisoned else None)
        call.results = self._engine.generate_batch(conversations, options, streamer=hooked, stop=stop, **changes)
        return call.results


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, options=GenerationOptions(max_new_tokens=8, temperature=0),
                                  limits=ServingLimits(max_image_pixels=400 * 400, max_images_per_prompt=2,
                                                       max_new_tokens=64, max_prompt_tokens=PROMPT_LIMIT))


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine, max_batch_size=4)  # no --media-root, no remote images
    yield s
    s.stop()


def expected_text(engine, prompt: str, max_new_tokens: int = 8) -> str:
    return engine.generate(engine.single_turn([], prompt), max_new_tokens=max_new_tokens).text


# --- the installed executable ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "inside").mkdir()
    rgb(4).save(root / "inside" / "pic.png")
    rgb(5).save(root / "outside.png")
    os.symlink(root / "outside.png", root / "inside" / "link.png")
    return SimpleNamespace(root=root / "inside", outside=root / "outside.png")


@pytest.fixture(scope="module")
def exe(tiny_checkpoint, media, tmp_path_factory):
    """``vila-hd serve`` as installed, on port 0 (it prints the port it got), with the test limits."""
    log_path = tmp_path_factory.mktemp("serve-log") / "stderr.log"
    args = [EXE, "serve", "--model", str(tiny_checkpoint), "--port", "0", "--api-key", KEY, "--log-json",
            "--media-root", str(media.root), "--max-new-tokens", "8", "--temperature", "0",
            "--limit-image-pixels", str(400 * 400), "--limit-images", "2", "--limit-new-tokens", "64",
            "--limit-prompt-tokens", str(PROMPT_LIMIT), "--served-model-name", "vila-hd"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stderr=log, stdout=subprocess.DEVNULL)
    try:
        found = []

        def started():
            assert proc.poll() is None, log_path.read_text()
            found[:] = re.findall(r"serving vila-hd on http://127\.0\.0\.1:(\d+)", log_path.read_text())
            return bool(found)

        wait_until(started, 180, "vila-hd serve to start")
        url = f"http://127.0.0.1:{found[0]}"
        wait_until(lambda: _healthy(url), 60, "/health")
        yield SimpleNamespace(url=url, chat_url=url + "/v1/chat/completions", proc=proc, log_path=log_path)
    finally:
        proc.terminate()
        proc.wait(30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture()
def client(exe):
    from openai import OpenAI

    return OpenAI(base_url=exe.url + "/v1", api_key=KEY, max_retries=0)


def post(target, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(target.chat_url, headers=headers, timeout=60, **content, **kwargs)


def test_openai_client_chat_image_and_vila_fields(client, engine):
    image = rgb(1)
    reply = client.chat.completions.create(
        model="vila-hd", max_tokens=6,
        messages=user([image_part(data_url(image)), {"type": "text", "text": "what is here?"}]),
        extra_body={"num_token_look_close": 4, "look_close_mode": "top-down", "return_selection": True})
    expected = engine.generate(engine.single_turn([image], "what is here?"), max_new_tokens=6, tokens=4,
                               mode="top-down")
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.stats.new_tokens
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.prompt_tokens_details.image_tokens == expected.stats.image_tokens > 0
    selection = reply.choices[0].model_extra["selection"]
    assert len(selection) == 1 and sum(scale["selected"] for scale in selection[0]) == 4
    assert [m.id for m in client.models.list().data] == ["vila-hd"]


def test_openai_client_streams(client, engine):
    chunks = list(client.chat.completions.create(model="vila-hd", max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}, messages=user("hello")))
    plain = engine.generate(engine.single_turn([], "hello"), max_new_tokens=6)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == plain.stats.new_tokens


def test_n_choices_and_stop_strings(client, engine):
    full = expected_text(engine, "hi")
    stop = full[3:6]
    assert full.find(stop) == 3, full  # the stop string first occurs after the third character
    reply = client.chat.completions.create(model="vila-hd", messages=user("hi"), n=2, stop=[stop])
    assert [c.message.content for c in reply.choices] == [full[:3]] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    assert [c.index for c in reply.choices] == [0, 1]
    chunks = list(client.chat.completions.create(model="vila-hd", messages=user("hi"), n=2, stop=stop, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == full[:3]
        assert mine[-1].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(client):
    def sample(seed):
        return client.chat.completions.create(model="vila-hd", messages=user("hi"), temperature=1.0, top_p=0.9,
                                              max_tokens=8, seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(1, 5)}) > 1  # and it does sample


def test_raw_stream_ends_with_done(exe):
    with httpx.stream("POST", exe.chat_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"messages": user("hi"), "stream": True, "max_tokens": 3}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_local_images_under_the_media_root(exe, media):
    for url in ["pic.png", f"file://{media.root / 'pic.png'}"]:
        r = post(exe, {"messages": user([image_part(url), {"type": "text", "text": "x"}]), "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0


def test_a_request_for_another_model_is_404_model_not_found(exe, client, tiny_checkpoint):
    from openai import NotFoundError

    r = post(exe, {"model": "other", "messages": TEXT, "max_tokens": 1})
    assert r.status_code == 404, r.text
    assert r.json() == {"error": {"message": "the model 'other' does not exist; this server serves 'vila-hd' "
                                             "(GET /v1/models)", "type": "invalid_request_error", "param": "model",
                                  "code": "model_not_found"}}
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=user("hi"), max_tokens=1)
    listed = httpx.get(exe.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    # the listed id, --model as given and its folder's name are the served model; no "model" is too
    for model in [listed, str(tiny_checkpoint), tiny_checkpoint.name, None]:
        body = {"messages": TEXT, "max_tokens": 1} | ({} if model is None else {"model": model})
        r = post(exe, body)
        assert r.status_code == 200 and r.json()["model"] == "vila-hd", (model, r.text)


def test_api_key(exe, client):
    from openai import AuthenticationError, OpenAI

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (httpx.get(exe.url + "/v1/models", headers=headers),
                  httpx.post(exe.chat_url, headers=headers, json={"messages": user("hi")})):
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=exe.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(exe.url + "/health").json()["status"] == "ok"  # health needs no key


TEXT = user("x")
BAD = [
    # malformed bodies and wrong types
    (b"{not json", 400, "not valid JSON", None),
    (b"[" * 100_000, 400, "nested too deeply", None),
    (b'{"messages": "\xff"}', 400, "not valid JSON", None),
    ([TEXT], 400, "must be a JSON object", None),
    ({"messages": "hi"}, 400, "messages must be", "messages"),
    ({"messages": []}, 400, "messages must be", "messages"),
    ({"messages": ["hi"]}, 400, "must be an object", "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role must be", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a string", "messages[0].content"),
    ({"messages": user([{"type": "text", "text": 5}])}, 400, "must be a string", "messages[0].content[0].text"),
    ({"messages": user([{"type": "audio"}])}, 400, "'text' or 'image_url'", "messages[0].content[0].type"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": 7}}])}, 400, "must be a string",
     "messages[0].content[0].image_url"),
    ({"messages": user("an <image> inside")}, 400, "placeholder", "messages[0].content[0].text"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message", "messages"),
    ({"messages": TEXT, "max_tokens": "3"}, 400, "integer", "max_tokens"),
    ({"messages": TEXT, "max_completion_tokens": 0}, 400, ">= 1", "max_completion_tokens"),
    ({"messages": TEXT, "temperature": "hot"}, 400, "finite number", "temperature"),
    ({"messages": TEXT, "temperature": -1}, 400, "temperature", "temperature"),
    ({"messages": TEXT, "top_p": 0}, 400, "top_p", "top_p"),
    ({"messages": TEXT, "n": 0}, 400, "n must be", "n"),
    ({"messages": TEXT, "n": True}, 400, "integer", "n"),
    ({"messages": TEXT, "seed": -1}, 400, "seed must be", "seed"),
    ({"messages": TEXT, "stop": 5}, 400, "stop must be", "stop"),
    ({"messages": TEXT, "stream": "yes"}, 400, "true or false", "stream"),
    ({"messages": TEXT, "return_selection": 1}, 400, "true or false", "return_selection"),
    ({"messages": TEXT, "model": 3}, 400, "model must be a string", "model"),
    ({"messages": TEXT, "tools": []}, 400, "unknown field", "tools"),
    ({"messages": TEXT, "logit_bias": {"5": 10}}, 400, "not supported", "logit_bias"),
    ({"messages": TEXT, "response_format": {"type": "json_object"}}, 400, "not supported", "response_format"),
    # the VILA-HD fields, checked as the CLI checks them
    ({"messages": TEXT, "num_look_close": -2}, 400, "num_look_close", "num_look_close"),
    ({"messages": TEXT, "num_token_look_close": "many"}, 400, "num_token_look_close", "num_token_look_close"),
    ({"messages": TEXT, "look_close_mode": "sideways"}, 400, "mode", "look_close_mode"),
    # images: undecodable, and the media policy
    ({"messages": user([image_part("data:image/png;base64,AAAA")])}, 400, "cannot be decoded",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part("data:image/png;base64,%%%")])}, 400, "not valid base64",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part("https://x.test/a.png")])}, 400, "--allow-remote-images",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part("ftp://x.test/a.png")])}, 400, "unsupported image URL scheme",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part("/etc/passwd")])}, 400, "outside the media root", "messages[0].content[0].image_url"),
    ({"messages": user([image_part("../outside.png")])}, 400, "outside the media root",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part("link.png")])}, 400, "outside the media root", "messages[0].content[0].image_url"),
    ({"messages": user([image_part("missing.png")])}, 400, "no image file", "messages[0].content[0].image_url"),
    # the serving limits
    ({"messages": user([image_part(data_url(rgb(2, (500, 500))))])}, 413, "max_image_pixels",
     "messages[0].content[0].image_url"),
    ({"messages": user([image_part(data_url(rgb(3)))] * 3)}, 413, "max_images_per_prompt", "messages"),
    ({"messages": TEXT, "max_tokens": 1000}, 400, "max_new_tokens", "max_tokens"),
    ({"messages": user("word " * 400)}, 413, "max_prompt_tokens", "messages"),
]


@pytest.mark.parametrize("body,status,message,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_an_error_naming_the_field(exe, body, status, message, param):
    r = post(exe, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and "Traceback" not in r.text


def test_local_paths_need_a_media_root(server):
    for url in ["/etc/passwd", "pic.png", "file:///etc/passwd"]:
        r = post(server, {"messages": user([image_part(url)])}, key=None)
        assert r.status_code == 400 and "--media-root" in r.json()["error"]["message"], r.text


def test_remote_images_with_allow_remote_images(engine):
    import http.server

    png = io.BytesIO()
    rgb(6).save(png, format="PNG")

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = png.getvalue() * (40 if self.path == "/big.png" else 1)
            self.send_response(200 if self.path != "/missing.png" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    s = Server(engine, media=MediaPolicy(allow_remote=True, max_bytes=len(png.getvalue()) * 10))
    try:
        def ask(name):
            return post(s, {"messages": user([image_part(f"{base}/{name}")]), "max_tokens": 2}, key=None)

        ok, missing, big = ask("pic.png"), ask("missing.png"), ask("big.png")
    finally:
        s.stop()
        images.shutdown()
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
    assert big.status_code == 413 and "--max-image-bytes" in big.json()["error"]["message"]


def test_one_json_log_line_per_request(exe):
    ok = post(exe, {"messages": user("log me"), "max_tokens": 3})
    refused = post(exe, {"messages": TEXT, "n": 0})
    with httpx.stream("POST", exe.chat_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"messages": user("log me too"), "stream": True, "max_tokens": 3}) as r:
        lines = [line for line in r.iter_lines() if line]
    stream_id = json.loads(lines[0][len("data: "):])["id"]

    def lines_of(rid=None):
        records = [json.loads(line) for line in exe.log_path.read_text().splitlines() if line.startswith("{")]
        return [rec for rec in records if rec.get("id") == rid] if rid else records

    rid = ok.json()["id"]
    wait_until(lambda: len(lines_of(stream_id)) == 1, 10, "the stream's log line")
    [line] = lines_of(rid)
    assert line["status"] == 200 and line["prompt_tokens"] > 0 and line["completion_tokens"] == 3
    assert 0 < line["ttft_s"] <= line["total_s"] and line["level"] == "INFO" and "time" in line
    [streamed] = lines_of(stream_id)
    assert streamed["stream"] is True and streamed["completion_tokens"] == 3 and streamed["ttft_s"] > 0
    assert refused.status_code == 400
    assert any(rec.get("status") == 400 and "n must be" in rec.get("error", "") for rec in lines_of())


def test_serve_help_and_defaults():
    out = subprocess.run([EXE, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ["--host", "--port", "--api-key", "--max-batch-size", "--max-queue", "--media-root",
                 "--allow-remote-images", "--log-json", "--limit-image-pixels", "--limit-prompt-tokens"]:
        assert flag in out.stdout
    from vila_hd.serve.cli import build_parser

    args = build_parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


def test_serve_refuses_a_busy_port_in_one_line(tiny_checkpoint, capsys):
    from vila_hd.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tiny_checkpoint), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vila-hd: error: cannot listen on 127.0.0.1:") and "--port" in err
    assert len(err.strip().splitlines()) == 1 and "loading" not in err  # refused before the model loads


@pytest.mark.parametrize("what", ["missing", "file"])
def test_serve_refuses_a_media_root_that_is_not_a_directory_before_loading(tmp_path, what, capsys):
    from vila_hd.cli import main

    root = tmp_path / "nodir"
    if what == "file":
        root.write_text("x")
    # the model does not exist either: the refusal comes before any loading
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--media-root", str(root), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err == f"vila-hd: error: --media-root {str(root)!r} is not a directory\n"


# --- batching, failures, disconnects, the queue (the app in this process) -------------------------------------
def test_concurrent_requests_batch_with_sequential_outputs(server, engine):
    prompts = [f"question {i}" for i in range(6)]
    expected = [expected_text(engine, p) for p in prompts]
    before = server.batcher.generate_calls

    def ask(prompt):
        return post(server, {"messages": user(prompt), "max_tokens": 8}, key=None).json()["choices"][0]["message"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = [m["content"] for m in pool.map(ask, prompts)]
    assert got == expected
    assert server.batcher.generate_calls - before < len(prompts)


def stream_text(target, prompt: str, max_tokens: int = 8) -> tuple[str, list[dict]]:
    """The text of a streamed answer and its chunks (an error event ends it)."""
    chunks = []
    with httpx.stream("POST", target.chat_url, json={"messages": user(prompt), "stream": True,
                                                     "max_tokens": max_tokens}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    return text, chunks


def test_waiting_requests_are_answered_in_one_batch(engine):
    gate = threading.Event()
    hooked = HookedEngine(engine, gate=gate)
    s = Server(hooked, max_batch_size=8)
    prompts = [f"question {i}" for i in range(6)]
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            first = pool.submit(stream_text, s, prompts[0])
            wait_until(lambda: len(hooked.calls) == 1, what="the first generate")
            rest = [pool.submit(stream_text, s, p) if i % 2 else
                    pool.submit(lambda p=p: post(s, {"messages": user(p)}, key=None).json())
                    for i, p in enumerate(prompts[1:])]
            wait_until(lambda: s.batcher.pending == len(rest), what="the others to queue")
            gate.set()
            answers = [first.result()[0]] + [_text(f.result()) for f in rest]
    finally:
        gate.set()
        s.stop()
    assert answers == [expected_text(engine, p) for p in prompts]
    assert [len(call.texts) for call in hooked.calls] == [1, 5]


def _text(answer) -> str:
    return answer[0] if isinstance(answer, tuple) else answer["choices"][0]["message"]["content"]


def test_a_request_failing_inside_generation_never_fails_its_batch_mates(engine):
    hooked = HookedEngine(engine, poison="POISON")
    s = Server(hooked, max_batch_size=5, batch_wait_s=1.0)
    prompts = ["alpha", "beta", "gamma"]
    try:
        with ThreadPoolExecutor(5) as pool:
            streams = [pool.submit(stream_text, s, p) for p in prompts]
            bad = pool.submit(post, s, {"messages": user("POISON")}, None)
            bad_stream = pool.submit(stream_text, s, "POISON, streamed")
            texts = [f.result()[0] for f in streams]
            chunks = [f.result()[1] for f in streams]
            failed, failed_stream = bad.result(), bad_stream.result()[1]
    finally:
        s.stop()
    assert texts == [expected_text(engine, p) for p in prompts]  # nothing sent twice, nothing lost
    assert all(c[-1]["choices"][0]["finish_reason"] == "length" for c in chunks)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert "Traceback" not in failed.text and "injected" not in failed.text
    assert failed_stream[-1]["error"]["type"] == "server_error"  # an error event, then [DONE]
    assert [len(call.texts) for call in hooked.calls] == [5, 1, 1, 1, 1, 1]  # the batch, then each alone


def test_a_client_that_disconnects_mid_stream_frees_its_slot(engine, caplog):
    caplog.set_level(logging.INFO, logger="vila_hd.serve")
    hooked = HookedEngine(engine, delay_s=0.1)
    s = Server(hooked, max_batch_size=1, max_queue=1)
    try:
        with httpx.stream("POST", s.chat_url, json={"messages": user("long"), "stream": True, "max_tokens": 60},
                          timeout=60) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first text chunk: the client goes away
        start = time.perf_counter()
        after = post(s, {"messages": user("next"), "max_tokens": 2}, key=None)
        waited = time.perf_counter() - start
    finally:
        s.stop()
    assert after.status_code == 200 and waited < 3  # the abandoned answer had 5 s of tokens left
    abandoned = hooked.calls[0]
    assert abandoned.stop.is_set() and abandoned.results[0].stats.stopped
    assert abandoned.results[0].stats.new_tokens < 60
    assert any("status=499" in r.getMessage() for r in caplog.records)


def test_a_client_that_leaves_the_queue_is_never_generated(engine):
    gate = threading.Event()
    hooked = HookedEngine(engine, gate=gate)
    s = Server(hooked, max_batch_size=1, max_queue=4)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, s, {"messages": user("first")}, None)
            wait_until(lambda: len(hooked.calls) == 1, what="the first generate")
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.chat_url, json={"messages": user("impatient")}, timeout=httpx.Timeout(60, read=0.5))
            wait_until(lambda: s.batcher.pending == 0, 10, "the queue slot to be given back")
            gate.set()
            assert running.result().status_code == 200
        assert post(s, {"messages": user("later")}, key=None).status_code == 200
    finally:
        gate.set()
        s.stop()
    assert [call.texts for call in hooked.calls] == [["first"], ["later"]]


def test_a_full_queue_gets_429_with_retry_after(engine):
    gate = threading.Event()
    hooked = HookedEngine(engine, gate=gate)
    s = Server(hooked, max_batch_size=1, max_queue=1)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, s, {"messages": user("first")}, None)
            wait_until(lambda: len(hooked.calls) == 1, what="the first generate")
            queued = pool.submit(post, s, {"messages": user("second")}, None)
            wait_until(lambda: s.batcher.pending == 1, what="the second to queue")
            refused = post(s, {"messages": user("third")}, key=None)
            gate.set()
            assert running.result().status_code == queued.result().status_code == 200
    finally:
        gate.set()
        s.stop()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error" and "--max-queue" in refused.json()["error"]["message"]


def test_load_quick_variant(server):
    sys.path.insert(0, os.path.join(testpaths.REPO_ROOT, "bench"))
    from serve_load import run_load

    report = run_load(server.url, clients=8, requests=16, max_tokens=4, timeout_s=60)
    assert report["errors"] == 0 and report["lost"] == 0 and report["completed"] == 16
    assert report["requests_per_s"] > 0 and 0 < report["ttft_p50_s"] <= report["ttft_p99_s"]


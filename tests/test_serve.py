"""vila-hd serve: the real server (uvicorn in a thread on 127.0.0.1) with the tiny checkpoint, spoken to with
the official openai client and raw httpx."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_helpers import rgb

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from vila_hd.engine import Engine, GenerationOptions, ServingLimits  # noqa: E402
from vila_hd.serve.app import ServeConfig, create_app  # noqa: E402

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, engine, **config):
        self.port = free_port()
        self.app = create_app(engine, ServeConfig(**config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, options=GenerationOptions(max_new_tokens=8, temperature=0),
                                  limits=ServingLimits(max_image_pixels=400 * 400, max_images_per_prompt=2,
                                                       max_new_tokens=64))


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine, api_key=KEY, max_batch_size=4)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_chat_stream_image_and_vila_fields(client, engine):
    image = rgb(1)
    reply = client.chat.completions.create(model="vila-hd", max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                     {"type": "text", "text": "what is here?"}]}],
        extra_body={"num_token_look_close": 4, "look_close_mode": "top-down", "return_selection": True})
    expected = engine.generate(engine.single_turn([image], "what is here?"), max_new_tokens=6, tokens=4)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.stats.new_tokens
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.prompt_tokens_details.image_tokens == expected.stats.image_tokens > 0
    selection = reply.choices[0].model_extra["selection"]
    assert len(selection) == 1 and sum(scale["selected"] for scale in selection[0]) == 4
    chunks = list(client.chat.completions.create(model="x", max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "hello"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = engine.generate(engine.single_turn([], "hello"), max_new_tokens=6)
    assert text == plain.text and chunks[-1].usage.completion_tokens == plain.stats.new_tokens
    assert [m.id for m in client.models.list().data] == ["vila-hd"]


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


BAD = [
    (b"{not json", 400, "not valid JSON", None),
    ({"messages": "hi"}, 400, "messages must be", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role must be", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a string", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "3"}, 400, "integer", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400, "max_new_tokens", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature", "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "num_look_close": -2}, 400, "num_look_close",
     "num_look_close"),
    ({"messages": [{"role": "user", "content": "x"}], "look_close_mode": "sideways"}, 400, "mode",
     "look_close_mode"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                     "AAAA"}}]}]},
     400, "cannot be decoded", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                     "%%%"}}]}]},
     400, "not valid base64", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     400, "--media-root", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]},
     400, "--allow-remote-images", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(rgb(2, (500, 500)))}}]}]},
     413, "max_image_pixels", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(rgb(3))}}] * 3}]},
     413, "max_images_per_prompt", "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message", "messages"),
]


@pytest.mark.parametrize("body,status,message,param", BAD, ids=range(len(BAD)))
def test_bad_input_gets_its_status_and_message(server, body, status, message, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and "Traceback" not in r.text


def test_api_key_required(server):
    url = server.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_concurrent_requests_batch_with_sequential_outputs(server, engine):
    prompts = [f"question {i}" for i in range(6)]
    expected = [engine.generate(engine.single_turn([], p), max_new_tokens=8).text for p in prompts]
    batcher = server.app.state.batcher
    before = batcher.generate_calls

    def ask(prompt):
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert got == expected
    assert batcher.generate_calls - before < len(prompts)


def test_load_quick_variant(server):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from serve_load import run_load

    report = run_load(server.url, clients=8, requests=16, api_key=KEY, max_tokens=4, timeout_s=60)
    assert report["errors"] == 0 and report["lost"] == 0 and report["completed"] == 16


def test_vila_hd_serve_executable(tiny_checkpoint):
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "vila-hd")
    proc = subprocess.Popen([exe, "serve", "--model", str(tiny_checkpoint), "--port", str(port), "--max-new-tokens",
                             "4"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(20)

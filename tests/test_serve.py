"""`edgecraft serve`: the real server on a loopback port, driven by the official `openai` client and
raw HTTP. The tiny bundle's context is 16 tokens (characters), so prompts here are short."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from edgecraft.runtime import load  # noqa: E402

from serve_helpers import Server, stream_events, streamed_text, wait_until  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = Server(tiny_bundle, "--slots", "8", "--max-queue", "200", "--max-tokens-limit", "2000")
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in "".join(srv.stderr)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.root, timeout=30) as c:
        yield c


def test_models_health_and_metrics(server, http):
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["context_length"] == 16
    assert http.get("/health").json() == {"status": "ok"}
    http.post("/v1/completions", json={"prompt": "the", "max_tokens": 5})
    metrics = http.get("/metrics").text
    for name in ("edgecraft_requests_running", "edgecraft_requests_waiting", "edgecraft_prompt_tokens_total",
                 "edgecraft_generation_tokens_total", "edgecraft_time_to_first_token_seconds_bucket",
                 "edgecraft_time_per_output_token_seconds_bucket"):
        assert name in metrics
    generated = [line for line in metrics.splitlines() if line.startswith("edgecraft_generation_tokens_total")]
    assert float(generated[0].split()[-1]) >= 5


def test_openai_client_completions(client, model):
    expected = model.generate("The cat", max_new_tokens=30, temperature=0)
    done = client.completions.create(model="tiny", prompt="The cat", max_tokens=30, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (7, 30)
    stream = client.completions.create(model="tiny", prompt="The cat", max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices
    plain = list(client.completions.create(model="tiny", prompt="The cat", max_tokens=30, temperature=0, stream=True))
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage.total_tokens == 37


def test_openai_client_chat(client, model):
    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": "hi"}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    # the plain template; the conversation keeps its newest 16 tokens (the context)
    prompt = "Be\n\nUser: hi\nAssistant:"
    assert done.choices[0].message.content == model.generate(prompt, max_new_tokens=20, temperature=0, stop=["\nUser:"])
    assert done.model_extra["chat_template"] == "plain"
    assert done.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == done.choices[0].message.content


def test_n_seed_stop_and_several_prompts(client, model):
    done = client.completions.create(model="tiny", prompt=["a cat", "the dog"], max_tokens=12, temperature=1.0,
                                     seed=5, n=2)
    texts = [c.text for c in done.choices]
    assert texts == [model.generate(p, max_new_tokens=12, temperature=1.0, seed=5 + j)
                     for p in ("a cat", "the dog") for j in range(2)]
    many = client.completions.create(model="tiny", prompt=["the"] * 20, max_tokens=5, temperature=0)  # > 8 slots
    assert [c.text for c in many.choices] == [model.generate("the", max_new_tokens=5, temperature=0)] * 20
    full = model.generate("the", max_new_tokens=40, temperature=0)
    stop = full[10:12]
    cut = client.completions.create(model="tiny", prompt="the", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_and_echo_score_the_prompt(client, model):
    text = "the cat sat."
    done = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = done.choices[0].logprobs
    assert done.choices[0].text == text and lp.tokens == list(text) and lp.token_logprobs[0] is None
    assert -sum(lp.token_logprobs[1:]) / (len(text) - 1) == pytest.approx(model.score(text).nll, rel=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # lm-eval's loglikelihood request: echo, one generated token, logprobs of everything
    lm_eval = client.completions.create(model="tiny", prompt=[model.encode("the cat")], max_tokens=1, echo=True,
                                        logprobs=1, temperature=0)
    assert len(lm_eval.choices[0].logprobs.token_logprobs) == len("the cat") + 1
    gen = client.completions.create(model="tiny", prompt="the", max_tokens=5, logprobs=3, temperature=0)
    lp = gen.choices[0].logprobs
    assert "".join(lp.tokens) == gen.choices[0].text and lp.text_offset == [0, 1, 2, 3, 4]
    for token, top in zip(lp.tokens, lp.top_logprobs):  # greedy: the chosen token is the most likely
        assert max(top, key=top.get) == token and len(top) == 3


def test_greedy_under_load_equals_generate(server, model):
    """32 clients x 3 requests, streaming and not, share the batch; every response is complete and
    equals runtime generate's text for its prompt."""
    prompts = ["the", "a big dog", "Then", "cat on", "red mat", "The blue log", "small", "and"]
    expected = {(p, n): model.generate(p, max_new_tokens=n, temperature=0) for p in prompts for n in (20, 45)}

    def client_run(i: int) -> list[bool]:
        ok = []
        with httpx.Client(base_url=server.root, timeout=60) as c:
            for r in range(3):
                prompt, n = prompts[(i + r) % len(prompts)], (20, 45)[(i + r) % 2]
                body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
                if (i + r) % 2:
                    events = stream_events(c, "/v1/completions", body)
                    text, finish = streamed_text(events)
                    ok.append(events[-1] == "[DONE]" and finish == "length" and text == expected[prompt, n])
                else:
                    choice = c.post("/v1/completions", json=body).json()["choices"][0]
                    ok.append(choice["finish_reason"] == "length" and choice["text"] == expected[prompt, n])
        return ok

    with ThreadPoolExecutor(32) as pool:
        results = [ok for oks in pool.map(client_run, range(32)) for ok in oks]
    assert len(results) == 96 and all(results)


def test_same_seed_same_text_whatever_the_batch(server, model):
    body = {"prompt": "the cat", "max_tokens": 60, "temperature": 0.9, "top_k": 8, "seed": 11}
    with httpx.Client(base_url=server.root, timeout=60) as c:
        alone = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert alone == model.generate("the cat", max_new_tokens=60, temperature=0.9, top_k=8, seed=11)

    def busy(i: int) -> str:
        with httpx.Client(base_url=server.root, timeout=60) as c:
            other = {**body, "seed": 100 + i, "temperature": 1.0 + i / 10, "max_tokens": 30 + 7 * i}
            return streamed_text(stream_events(c, "/v1/completions", other))[0]

    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(busy, i) for i in range(7)]
        with httpx.Client(base_url=server.root, timeout=60) as c:
            crowded = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        [f.result() for f in others]
    assert crowded == alone


BAD = [
    (b"{not json", "not valid JSON"),
    (b"prompt=hello", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "a", "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": 2001}).encode(), "limit of 2000"),
    (json.dumps({"prompt": "a", "temperature": -0.5}).encode(), "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', "temperature"),
    (json.dumps({"prompt": {"text": "a"}}).encode(), "prompt"),
    (json.dumps({"prompt": "x" * 17}).encode(), "context"),
    (json.dumps({"prompt": [1, 2, 99999]}).encode(), "token ids"),
    (json.dumps({"prompt": "a", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "a", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"prompt": "a", "frequency_penalty": 0.5}).encode(), "frequency_penalty"),
]


@pytest.mark.parametrize("body,words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_a_400_in_the_openai_shape(http, body, words):
    response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_other_refusals_and_the_server_survives(http):
    unknown = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    big = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert big.status_code == 413 and "error" in big.json()
    assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}).status_code == 400
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert http.get("/v1/completions").status_code == 405
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


def test_template_override_and_api_key(tiny_bundle, tmp_path):
    template = tmp_path / "short.json"
    template.write_text(json.dumps({"name": "short", "system": "", "user": "{content}\n", "assistant": "{content}\n",
                                    "generation": ""}))
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    srv = Server(tiny_bundle, "--api-key-file", str(key_file), "--chat-template", str(template))
    try:
        with httpx.Client(base_url=srv.root, timeout=30) as c:
            assert c.get("/health").status_code == 200  # needs no key
            assert c.get("/bundle/edgecraft.json").status_code == 401  # the bundle's files need it too
            served = c.get("/bundle/edgecraft.json", headers={"authorization": f"Bearer {KEY}"})
            assert served.status_code == 200 and served.content == (tiny_bundle / "edgecraft.json").read_bytes()
            for outside in ("/bundle/../tiny.toml", "/bundle/%2e%2e/x", "/bundle/nothing.onnx", "/bundle/"):
                assert c.get(outside, headers={"authorization": f"Bearer {KEY}"}).status_code == 404
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
                for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
                    response = c.request(method, path, json={"prompt": "a"}, headers=headers)
                    assert response.status_code == 401
                    assert response.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
        chat = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}],
                                            max_tokens=10, temperature=0)
        expected = load(tiny_bundle).generate("the\n", max_new_tokens=10, temperature=0)
        assert chat.model_extra["chat_template"] == "short" and chat.choices[0].message.content == expected
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="nope", max_retries=0).models.list()
    finally:
        assert srv.stop() == 0


def test_busy_queue_503_and_a_disconnect_frees_its_slot(tiny_bundle):
    srv = Server(tiny_bundle, "--slots", "1", "--max-queue", "0", "--max-tokens-limit", "1000000")
    try:
        with httpx.Client(base_url=srv.root, timeout=30) as c:
            long = {"prompt": "the", "max_tokens": 1000000, "stream": True}
            with c.stream("POST", "/v1/completions", json=long) as response:
                lines = response.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)  # it holds the only slot now
                busy = httpx.post(srv.url + "/completions", json={"prompt": "a"})
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["code"] == "queue_full"
            # the client went away: its sequence leaves the batch and the slot serves the next request
            wait_until(lambda: "edgecraft_requests_running 0.0" in c.get("/metrics").text, timeout=5)
            assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}).status_code == 200
            with pytest.raises(httpx.ReadTimeout):  # the same without streaming
                c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1000000}, timeout=0.5)
            wait_until(lambda: "edgecraft_requests_running 0.0" in c.get("/metrics").text, timeout=5)
            assert 'edgecraft_requests_total{endpoint="completions",status="499"} 2.0' in c.get("/metrics").text
    finally:
        assert srv.stop() == 0


def test_sigterm_ends_streams_cleanly_and_exits(tiny_bundle):
    srv = Server(tiny_bundle, "--max-tokens-limit", "10000000")
    events: list = []

    def read() -> None:
        with httpx.Client(base_url=srv.root, timeout=30) as c:
            events.extend(stream_events(c, "/v1/completions", {"prompt": "the", "max_tokens": 10000000}))

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: "edgecraft_requests_running 1.0" in httpx.get(srv.root + "/metrics").text)
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - start < 6
    reader.join(5)
    assert events[-1] == "[DONE]" and streamed_text(events)[1] == "abort"
    assert "Traceback" not in "".join(srv.stderr)


def test_health_is_503_while_loading(tiny_bundle):
    """The app served by uvicorn in a thread, with a load that waits for the test's go-ahead."""
    import uvicorn

    from edgecraft.serve.app import Settings, create_app
    from edgecraft.serve.chat import PLAIN

    go = threading.Event()

    def slow_load():
        go.wait(10)
        return load(tiny_bundle)

    app = create_app(Settings("tiny", 2, 4, 100, None, PLAIN, slow_load))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_until(lambda: server.started and server.servers)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.post(url + "/v1/completions", json={"prompt": "a"}).status_code == 503
        go.set()
        wait_until(lambda: httpx.get(url + "/health").status_code == 200)
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
    finally:
        go.set()
        server.should_exit = True
        thread.join(10)


def test_cli_refuses_a_bad_bundle_and_a_busy_port(tiny_bundle, tmp_path, server):
    import subprocess
    import sys

    port = server.root.rsplit(":", 1)[1]
    for args, words in (
        ([str(tmp_path / "nope")], "not a bundle"),
        ([str(tiny_bundle), "--port", port], "cannot listen"),
        ([str(tiny_bundle), "--api-key", "a", "--api-key-file", "b"], "not both"),
        ([str(tiny_bundle), "--port", "0", "--int8"], "model.int8.onnx"),
    ):
        command = [sys.executable, "-m", "edgecraft", "serve", *args]
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("error:") and words in out.stderr
        assert "Traceback" not in out.stderr


def test_plain_template_renders_a_transcript():
    from edgecraft.serve.chat import PLAIN

    text = PLAIN.render([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")])
    assert text == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"

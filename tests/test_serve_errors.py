"""Bad input and overload: every case gets a 4xx/5xx in OpenAI's error format naming the field, and
the server keeps answering afterwards."""

import threading
from types import SimpleNamespace

import httpx
import jax
import openai
import pytest

from phi_jax.config import preset
from phi_jax.model import Phi, init_params
from phi_jax.serve import Engine, SamplingParams, ServerConfig, ServerThread, create_app
from phi_jax.tokenizer import train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20,
         "the quick brown fox jumps over the lazy dog\n" * 20]
MODEL = "tiny-test"
MAX_LEN = 64


@pytest.fixture(scope="module")
def served():
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    model, variables = Phi(config), init_params(config, jax.random.key(0))
    engine = Engine(model, variables, num_slots=4, max_len=MAX_LEN, max_queue=1)
    app = create_app(engine, tokenizer, ServerConfig(model_name=MODEL, max_body_bytes=64 * 1024))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        yield SimpleNamespace(url=server.url, http=http, engine=engine, model=model, variables=variables,
                              tokenizer=tokenizer)


GOOD = {"model": MODEL, "prompt": "def add", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 20  # > MAX_LEN tokens

# (name, path, body (dict, or raw bytes), status, param)
CASES = [
    ("malformed json", "completions", b'{"model": "tiny-test", "prompt": ', 400, None),
    ("json not an object", "completions", b'["prompt"]', 400, None),
    ("unknown model", "completions", dict(GOOD, model="gpt-4"), 404, "model"),
    ("missing model", "completions", {k: v for k, v in GOOD.items() if k != "model"}, 400, "model"),
    ("missing prompt", "completions", {k: v for k, v in GOOD.items() if k != "prompt"}, 400, "prompt"),
    ("prompt wrong type", "completions", dict(GOOD, prompt=5), 400, "prompt"),
    ("prompt mixed list", "completions", dict(GOOD, prompt=[1, "a"]), 400, "prompt"),
    ("token id out of vocab", "completions", dict(GOOD, prompt=[1, 10**6]), 400, "prompt"),
    ("negative token id", "completions", dict(GOOD, prompt=[[3, -1]]), 400, "prompt"),
    ("prompt longer than context", "completions", dict(GOOD, prompt=LONG_TEXT), 400, "prompt"),
    ("prompt ids longer than context", "completions", dict(GOOD, prompt=[5] * MAX_LEN), 400, "prompt"),
    ("negative max_tokens", "completions", dict(GOOD, max_tokens=-5), 400, "max_tokens"),
    ("zero max_tokens", "completions", dict(GOOD, max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", "completions", dict(GOOD, max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens past context", "completions", dict(GOOD, max_tokens=MAX_LEN), 400, "max_tokens"),
    ("max_tokens string", "completions", dict(GOOD, max_tokens="5"), 400, "max_tokens"),
    ("max_tokens bool", "completions", dict(GOOD, max_tokens=True), 400, "max_tokens"),
    ("max_tokens float", "completions", dict(GOOD, max_tokens=2.5), 400, "max_tokens"),
    ("temperature string", "completions", dict(GOOD, temperature="hot"), 400, "temperature"),
    ("temperature too high", "completions", dict(GOOD, temperature=3.0), 400, "temperature"),
    ("top_p zero", "completions", dict(GOOD, top_p=0), 400, "top_p"),
    ("top_k below -1", "completions", dict(GOOD, top_k=-2), 400, "top_k"),
    ("n zero", "completions", dict(GOOD, n=0), 400, "n"),
    ("n too large", "completions", dict(GOOD, n=1000), 400, "n"),
    ("too many choices", "completions", dict(GOOD, prompt=["a"] * 10, n=10), 400, "n"),
    ("seed string", "completions", dict(GOOD, seed="7"), 400, "seed"),
    ("stop too many", "completions", dict(GOOD, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop wrong type", "completions", dict(GOOD, stop=7), 400, "stop"),
    ("stream not bool", "completions", dict(GOOD, stream="yes"), 400, "stream"),
    ("logprobs too many", "completions", dict(GOOD, logprobs=21), 400, "logprobs"),
    ("echo of a prompt past the context", "completions", dict(GOOD, echo=True, prompt=LONG_TEXT), 400,
     "prompt"),
    ("penalty unsupported", "completions", dict(GOOD, presence_penalty=0.5), 400, "presence_penalty"),
    ("no messages", "chat/completions", dict(CHAT, messages=[]), 400, "messages"),
    ("messages wrong type", "chat/completions", dict(CHAT, messages="hi"), 400, "messages"),
    ("bad role", "chat/completions", dict(CHAT, messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role"),
    ("content wrong type", "chat/completions", dict(CHAT, messages=[{"role": "user", "content": 5}]),
     400, "messages[0].content"),
    ("image content", "chat/completions",
     dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content"),
    ("chat past context", "chat/completions",
     dict(CHAT, messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages"),
    ("chat max_completion_tokens", "chat/completions", dict(CHAT, max_completion_tokens=-1), 400,
     "max_completion_tokens"),
    ("top_logprobs too many", "chat/completions", dict(CHAT, logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("response_format not an object", "chat/completions", dict(CHAT, response_format="json"), 400,
     "response_format"),
    ("response_format unknown type", "chat/completions", dict(CHAT, response_format={"type": "xml"}),
     400, "response_format.type"),
    ("json_schema without schema", "chat/completions",
     dict(CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format.json_schema"),
    ("unsupported schema feature", "completions", dict(GOOD, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "ipv9"}}}),
     400, "response_format"),
    ("schema with a dangling $ref", "chat/completions", dict(CHAT, structured_outputs={
        "json": {"$ref": "#/definitions/missing"}}), 400, "structured_outputs.json"),
    ("bad regex", "completions", dict(GOOD, structured_outputs={"regex": "[a-"}), 400,
     "structured_outputs.regex"),
    ("bad lark grammar", "completions", dict(GOOD, structured_outputs={"grammar": "start: nowhere"}), 400,
     "structured_outputs.grammar"),
    ("empty choice", "chat/completions", dict(CHAT, structured_outputs={"choice": []}), 400,
     "structured_outputs.choice"),
    ("two structured kinds", "completions", dict(GOOD, structured_outputs={"regex": "a", "choice": ["b"]}),
     400, "structured_outputs"),
    ("both constraint fields", "completions", dict(GOOD, structured_outputs={"regex": "a"},
                                                   response_format={"type": "json_object"}), 400,
     "structured_outputs"),
    ("continue a user message", "chat/completions", dict(CHAT, continue_final_message=True), 400,
     "continue_final_message"),
    ("body too large", "completions", dict(GOOD, prompt="x" * 100_000), 413, None),
]


def _post(s, path, body):
    if isinstance(body, bytes):
        return s.http.post(f"/v1/{path}", content=body, headers={"content-type": "application/json"})
    return s.http.post(f"/v1/{path}", json=body)


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_names_the_field(served, name, path, body, status, param):
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]
    if param is not None:
        assert param.split("[")[0] in error["message"]


def test_unknown_route_and_method_answer_json(served):
    r = served.http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = served.http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = served.http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_openai_client_sees_typed_errors(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_still_serving_after_bad_input(served):
    for _, path, body, _, _ in CASES:  # the whole barrage again, then real work
        _post(served, path, body)
    r = served.http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = served.http.post("/v1/completions", json=dict(GOOD, prompt=""))  # starts from BOS
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1
    r = served.http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert served.http.get("/health").json()["status"] == "ok"


def test_full_queue_answers_429_then_recovers(served):
    """Freeze the engine inside one request; one more may wait (max_queue=1); the next gets 429."""
    s = served
    gate, release = threading.Event(), threading.Event()

    def blocking_sink(event):
        gate.set()
        release.wait(60)

    waiting = {}
    try:
        s.engine.submit([1, 2, 3], SamplingParams(max_tokens=1), blocking_sink)
        assert gate.wait(60)
        waiter = threading.Thread(target=lambda: waiting.update(r=s.http.post("/v1/completions", json=GOOD)))
        waiter.start()
        for _ in range(3000):  # wait (bounded) until that request sits in the queue
            if s.engine.num_waiting:
                break
            threading.Event().wait(0.01)
        assert s.engine.num_waiting == 1
        r = s.http.post("/v1/completions", json=GOOD)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        assert s.http.get("/health").json()["waiting"] == 1
    finally:
        release.set()
    waiter.join(60)
    assert waiting["r"].status_code == 200
    assert s.http.post("/v1/completions", json=GOOD).status_code == 200


def test_stopped_engine_answers_503(served):
    s = served
    engine = Engine(s.model, s.variables, num_slots=4, max_len=MAX_LEN)
    with ServerThread(create_app(engine, s.tokenizer, ServerConfig(model_name=MODEL))) as server:
        engine.stop()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/health").status_code == 503
            r = http.post("/v1/completions", json=GOOD)
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
            assert http.get("/v1/models").status_code == 200

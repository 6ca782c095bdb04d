"""The OpenAI API, driven by the official openai SDK against the real server (a tiny random model on
a loopback port): chat completions (sync and async, streamed and not), completions, models, the
Responses API over HTTP/SSE and over its WebSocket mode with two lanes at once, every bad input
mapped to the SDK's exception class, and a client that vanishes mid-stream freeing its KV."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.lib.responses_websocket import AsyncResponsesWebSocketSession, ResponsesWebSocketLimits

from tests.server_util import ServerProcess, running_server
from tests.test_limits import TINY_VOCAB, tiny_args
from tests.test_server import wait_metric

KEY = "sk-test"
HI = [{"role": "user", "content": "Say hi."}]
LIMITS = ResponsesWebSocketLimits(max_lanes=4, max_events_per_lane=1024, max_events=4096, max_bytes_per_lane=1 << 24,
                                  max_bytes=1 << 25)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.conftest import build_tiny

    path: Path = build_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path), "--api-key", KEY, "--max-model-len", "256",
                        "--max-frame-bytes", "65536") as srv:
        yield srv
        m = wait_metric(srv, "aengine_kv_pages_used", 0)  # nothing leaked, whatever the tests did
        assert m["aengine_kv_pages_used"] == 0 and m["aengine_requests_running"] == 0, m
        assert "Traceback" not in srv.log(), srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model"
    return models[0].id


def test_chat_sync_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0)
    c = whole.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant" and c.message.content
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    chunks = list(client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 8
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: the radix cache's hit
    # max_completion_tokens is max_tokens' newer name
    alias = client.chat.completions.create(model=model, messages=HI, max_completion_tokens=3, temperature=0)
    assert alias.usage.completion_tokens == 3


def test_chat_async(server: ServerProcess, model: str) -> None:
    async def go() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=KEY, max_retries=0) as ac:
            whole = await ac.chat.completions.create(model=model, messages=HI, max_tokens=6, temperature=0)
            text = ""
            async for ch in await ac.chat.completions.create(model=model, messages=HI, max_tokens=6,
                                                             temperature=0, stream=True):
                text += ch.choices[0].delta.content or ""
            return whole.choices[0].message.content or "", text

    whole, streamed = asyncio.run(go())
    assert whole and whole == streamed


def test_completions(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="The sea is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 5
    ids = client.completions.create(model=model, prompt=[1, 2, 3, 4], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The sea is", max_tokens=5, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_responses_http(client: openai.OpenAI, model: str) -> None:
    r = client.responses.create(model=model, input="Say hi.", max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.status == "incomplete" and r.output_text
    assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 6
    events = list(client.responses.create(model=model, input="Say hi.", max_output_tokens=6, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    # instructions and message-list input: a chat under the hood
    msgs = client.responses.create(model=model, instructions="Be brief.", temperature=0, max_output_tokens=4,
                                   input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    assert msgs.usage.output_tokens == 4


def test_responses_websocket_two_lanes(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    want = client.responses.create(model=model, input="Say hi.", max_output_tokens=6, temperature=0).output_text

    async def go() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=KEY, max_retries=0) as ac:
            async with ac.responses.connect() as conn, AsyncResponsesWebSocketSession(conn, limits=LIMITS) as session:
                lanes = [session.lane("a"), session.lane("b")]
                for lane in lanes:  # both in flight at once
                    await lane.send({"type": "response.create", "model": model, "input": "Say hi.",
                                     "max_output_tokens": 6, "temperature": 0})
                finals = await asyncio.gather(*(lane.get_final_response() for lane in lanes))
                # a second response on lane a, then one cancelled mid-way
                await lanes[0].send({"type": "response.create", "model": model, "input": "Hi", "temperature": 0,
                                     "max_output_tokens": 3})
                again = await lanes[0].get_final_response()
                await lanes[1].send({"type": "response.create", "model": model, "input": "Go on.",
                                     "max_output_tokens": 200, "ignore_eos": True})
                while (await lanes[1].recv()).type != "response.output_text.delta":
                    pass
                await conn.send({"type": "response.cancel", "stream_id": "b"})  # type: ignore[arg-type]
                cancelled = await lanes[1].get_final_response()
                assert again.usage.output_tokens == 3
                assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 200
                return [f.output_text for f in finals]

    assert asyncio.run(go()) == [want, want]


def test_responses_websocket_errors(server: ServerProcess, model: str) -> None:
    async def go() -> list[object]:
        async with openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=KEY, max_retries=0) as ac:
            async with ac.responses.connect() as conn:
                await conn.send({"type": "response.create", "model": "nope", "input": "x",  # type: ignore[arg-type]
                                 "stream_id": "s"})
                await conn.send({"type": "response.bogus"})  # type: ignore[arg-type]
                await conn.send({"type": "response.create", "model": model, "input": "x",  # type: ignore[arg-type]
                                 "top_logprobs": 21})
                return [await conn.recv() for _ in range(3)]

    events = asyncio.run(go())
    assert all(e.type == "error" for e in events), events
    by_code = {e.code: e for e in events}  # type: ignore[attr-defined]
    assert by_code["model_not_found"].stream_id == "s"  # type: ignore[attr-defined]
    assert "invalid_request" in by_code and len(by_code) == 2, by_code


def test_errors_map_to_sdk_exceptions(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    chat = client.chat.completions.create
    with pytest.raises(openai.NotFoundError):
        chat(model="no-such-model", messages=HI)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        chat(model=model, messages=HI, extra_body={"max_token": 5})  # a typo is refused, not ignored
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(model=model, messages=HI, temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(model=model, messages=HI, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="n must be"):
        chat(model=model, messages=HI, n=17)
    with pytest.raises(openai.BadRequestError) as e:
        chat(model=model, messages=HI, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 400)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:
        chat(model=model, messages=[{"role": "user", "content": "x" * 70_000}])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="not supported"):
        chat(model=model, messages=HI, response_format={"type": "xml"})
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing-here", cast_to=object)
    assert client.chat.completions.create(model=model, messages=HI, max_tokens=2).usage.completion_tokens == 2


def test_broken_sse_client_frees_kv(server: ServerProcess, model: str) -> None:
    """A client that reads one event and vanishes: its request is cancelled and its KV freed."""
    body = json.dumps({"model": model, "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        assert b"data: " in s.recv(65536) + s.recv(65536)
        assert server.metrics()["aengine_kv_pages_used"] > 0
    m = wait_metric(server, "aengine_kv_pages_used", 0, timeout=20)
    assert m["aengine_kv_pages_used"] == 0 and m["aengine_requests_running"] == 0


# ---- sampling parity: these need the engine's n, logprobs, penalties and logit_bias -------------

@pytest.mark.needs_sampling
def test_n_and_logprobs(client: openai.OpenAI, model: str) -> None:
    client = client.with_options(timeout=60)  # without the engine's n, the second completion never comes
    eos = {"ignore_eos": True}
    r = client.chat.completions.create(model=model, messages=HI, max_tokens=6, n=2, seed=1, extra_body=eos)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 12
    streamed = list(client.chat.completions.create(model=model, messages=HI, max_tokens=3, n=2, stream=True))
    assert {ch.choices[0].index for ch in streamed if ch.choices} == {0, 1}
    assert sum(ch.choices[0].finish_reason is not None for ch in streamed) == 2  # each choice ends once
    g = client.chat.completions.create(model=model, messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=5, extra_body=eos)
    content = g.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:  # greedy: the sampled token is the most likely one
        assert len(t.top_logprobs) == 5 and t.token == t.top_logprobs[0].token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) and t.logprob <= 0
    c = client.completions.create(model=model, prompt="The sea is", max_tokens=4, temperature=0, logprobs=3,
                                  extra_body=eos)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(x) <= 3 for x in lp.top_logprobs) and lp.text_offset[0] == 0


def _tokens(client: openai.OpenAI, model: str, **kw: object) -> list[str]:
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}  # type: ignore[dict-item]
    r = client.completions.create(model=model, prompt="The sea is", max_tokens=24, temperature=0, logprobs=0,
                                  extra_body=extra, **kw)  # type: ignore[arg-type]
    return r.choices[0].logprobs.tokens


@pytest.mark.needs_sampling
def test_penalties_and_logit_bias(client: openai.OpenAI, model: str) -> None:
    client = client.with_options(timeout=60)
    base = _tokens(client, model)
    repeats = len(base) - len(set(base))
    assert repeats > 0, base  # a tiny random model repeats itself greedily: the penalties have work to do
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 5.0}}):
        t = _tokens(client, model, **kw)
        assert len(t) - len(set(t)) < repeats, (kw, t, base)
    forced = _tokens(client, model, logit_bias={"42": 100})
    assert len(set(forced)) == 1 and len(forced) == 24

"""Big prompts cannot hold up other connections: a prompt that cannot fit the context is refused
from its size, without tokenizing it, and a closed connection's queued tokenization is dropped.
(Before: 8 prompts of 4,000,000 characters from one client that then left kept the one tokenizer
thread busy for 40 s, and a new client's 1-token request waited all that time.)"""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect

from tests.server_util import running_server


def test_big_prompts_are_refused_from_their_size_and_others_go_on() -> None:
    with running_server("--max-tokens-limit", "4") as srv:  # the embedded model and its tokenizer
        async def go() -> tuple[list[dict], float]:
            big = "word " * 800_000  # 4,000,000 characters
            async with connect(srv.url, max_size=None) as hog:
                await hog.recv()
                for i in range(8):
                    await hog.send(json.dumps({"type": "generate", "id": f"big{i}", "prompt": big}))
                answers = [json.loads(await asyncio.wait_for(hog.recv(), 60)) for _ in range(2)]
            t = time.monotonic()
            async with connect(srv.url) as other:
                await other.recv()
                await other.send(json.dumps({"type": "generate", "id": "small", "prompt": "Hi", "max_tokens": 1}))
                while json.loads(await asyncio.wait_for(other.recv(), 60))["type"] != "done":
                    pass
            return answers, time.monotonic() - t

        answers, waited = asyncio.run(go())
    assert [a["code"] for a in answers] == ["context_length_exceeded"] * 2, answers
    assert waited < 10, waited  # liveness, not a benchmark: it was 40 s


def test_waiting_bytes_are_bounded_per_connection_and_server_wide() -> None:
    """Generate frames count from their arrival until their request is queued or refused: past
    --max-waiting-bytes-per-connection or --max-waiting-bytes a request gets overloaded, and every
    exit (tokenized, refused, the connection closed mid-tokenization) gives the bytes back. (Before:
    only requests were counted, so 4,096 waiting 4 MB prompts were allowed.)"""
    from tests.server_util import http_get

    budget = ("--max-waiting-bytes-per-connection", "2500000", "--max-waiting-bytes", "3500000", "--debug-state")
    with running_server(*budget) as srv:
        def state() -> dict:
            return json.loads(http_get(srv.http + "/debug/state")[1])

        async def go() -> tuple[list[dict], list[dict]]:
            big = "word " * 200_000  # 1,000,000 characters: fits the size check, takes a while to tokenize
            async with connect(srv.url, max_size=None) as a, connect(srv.url, max_size=None) as b:
                await a.recv(), await b.recv()
                for i in range(3):  # the third is over this connection's 2.5 MB
                    await a.send(json.dumps({"type": "generate", "id": f"a{i}", "prompt": big}))
                for i in range(2):  # the second is over the server's 3.5 MB (a holds 2 MB)
                    await b.send(json.dumps({"type": "generate", "id": f"b{i}", "prompt": big}))
                got_a = [json.loads(await asyncio.wait_for(a.recv(), 60)) for _ in range(3)]
                got_b = [json.loads(await asyncio.wait_for(b.recv(), 60)) for _ in range(2)]
            async with connect(srv.url, max_size=None) as c:  # leaves while its prompts are tokenized
                await c.recv()
                for i in range(2):
                    await c.send(json.dumps({"type": "generate", "id": f"c{i}", "prompt": big}))
            return got_a, got_b

        got_a, got_b = asyncio.run(go())
        codes = {m["id"]: m["code"] for m in got_a + got_b}
        assert codes == {"a0": "context_length_exceeded", "a1": "context_length_exceeded", "a2": "overloaded",
                         "b0": "context_length_exceeded", "b1": "overloaded"}, codes
        assert all("bytes" in m["message"] for m in got_a + got_b if m["code"] == "overloaded")
        deadline = time.monotonic() + 30
        while (st := state())["tokenizing_bytes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st["tokenizing_bytes"] == 0 and st["requests"] == 0, st

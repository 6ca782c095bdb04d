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

"""Protocol v1 wire types: what decodes, what is refused, and the exact shape of server frames."""

from __future__ import annotations

import json

import pytest

from aengine.serve.metrics import Histogram
from aengine.serve.protocol import (
    Cancel,
    Delta,
    Done,
    Error,
    Generate,
    Hello,
    ProtocolError,
    Timing,
    Usage,
    decode,
    encode,
)


def test_generate_defaults() -> None:
    g = decode('{"type":"generate","id":"a","prompt":"hi"}')
    assert isinstance(g, Generate)
    assert (g.id, g.prompt, g.max_tokens, g.stream, g.temperature, g.stop) == ("a", "hi", None, True, 1.0, None)


def test_generate_all_fields() -> None:
    g = decode(json.dumps({"type": "generate", "id": "b", "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "seed": 7,
                           "stop": ["\n"], "stop_token_ids": [2], "ignore_eos": True, "stream": False}))
    assert isinstance(g, Generate) and g.messages[0].content == "x" and g.temperature == 0.0
    assert (g.max_tokens, g.seed, g.stop, g.stop_token_ids, g.ignore_eos, g.stream) == (5, 7, ["\n"], [2], True, False)
    assert decode(b'{"type":"generate","id":"c","input_ids":[1,2],"stop":"x"}').stop == "x"


def test_cancel() -> None:
    assert decode('{"type":"cancel","id":"a"}') == Cancel("a")


@pytest.mark.parametrize("frame,id", [
    ("nope", None), ("", None), ("[]", None), ("null", None), ("{}", None),
    ('{"type":"bogus","id":"x"}', "x"),
    ('{"type":"generate","id":"x"}', "x"),
    ('{"type":"generate","id":"x","prompt":"a","messages":[{"role":"user","content":"b"}]}', "x"),
    ('{"type":"generate","prompt":"a"}', None),
    ('{"type":"generate","id":"","prompt":"a"}', None),
    ('{"type":"generate","id":3,"prompt":"a"}', None),
    ('{"type":"generate","id":"x","prompt":"a","max_tokens":"5"}', "x"),
    ('{"type":"generate","id":"x","prompt":"a","max_tokens":true}', "x"),
    ('{"type":"generate","id":"x","prompt":"a","stop":[1]}', "x"),
    ('{"type":"generate","id":"x","prompt":"a","stream":"no"}', "x"),
    ('{"type":"generate","id":"x","prompt":"a","max_token":5}', "x"),
    ('{"type":"generate","id":"x","messages":[{"role":"user"}]}', "x"),
    ('{"type":"cancel"}', None),
])
def test_bad_frames(frame: str, id: str | None) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(frame)
    assert e.value.id == id


def test_server_frames() -> None:
    assert json.loads(encode(Hello("m", 8192))) == {"type": "hello", "model": "m", "max_context": 8192, "protocol": 1}
    assert json.loads(encode(Delta("a", "é", [5]))) == {"type": "delta", "id": "a", "text": "é", "token_ids": [5]}
    done = Done("a", "stop", Usage(3, 2, 1), Timing(1.5, 2.5))
    assert json.loads(encode(done)) == {
        "type": "done", "id": "a", "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 1},
        "timing": {"ttft_ms": 1.5, "total_ms": 2.5}}
    done.text = "whole"
    assert json.loads(encode(done))["text"] == "whole"
    assert json.loads(encode(Error(None, "overloaded", "busy"))) == {
        "type": "error", "id": None, "code": "overloaded", "message": "busy"}


def test_histogram() -> None:
    h = Histogram("x_seconds", "x", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    lines = h.render()
    assert 'x_seconds_bucket{le="0.1"} 1' in lines and 'x_seconds_bucket{le="1.0"} 3' in lines
    assert 'x_seconds_bucket{le="+Inf"} 4' in lines and "x_seconds_count 4" in lines

"""Structured output (json_schema, regex, grammar, json) on the embedded model: through the offline
API and the native WebSocket protocol, with preemption, chunked prefill and the prefix cache."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
from websockets.asyncio.client import connect

from aengine import LLM, InvalidRequest, SamplingParams
from tests.server_util import ServerProcess, running_server

S, B = {"type": "string", "maxLength": 12}, {"type": "boolean"}
INT = {"type": "integer", "minimum": -1000, "maximum": 1000}


def obj(props: dict, required: list[str] | None = None, **kw: object) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = [
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"city": S, "country": S, "population": {"type": "integer", "minimum": 1, "maximum": 10**9}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 5}}),
    obj({"person": obj({"first": S, "last": S}), "id": INT}),
    obj({"a": obj({"b": obj({"c": {"type": "integer", "minimum": -5, "maximum": 5}})})}),
    obj({"ok": B}),
    obj({"ok": B, "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"enum": ["C", "F"]}}),
    obj({"items": {"type": "array", "items": obj({"name": S, "qty": {"type": "integer", "minimum": 1,
                                                                      "maximum": 9}}), "maxItems": 3}}),
    obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}, "genre": {"enum": ["a", "b"]}}),
    obj({"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": 0}}),
    obj({"status": {"const": "done"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    obj({"nickname": {"type": ["string", "null"], "maxLength": 10}}),
    obj({"first": S, "middle": S}, required=["first"]),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}, "maxItems": 2},
                    "maxItems": 2}}),
    obj({"point": {"$ref": "#/$defs/pt"}}, **{"$defs": {"pt": obj({"x": INT, "y": INT})}}),
    obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]}}),
]
ASK = [{"role": "user", "content": "Reply with a JSON value describing something you like."}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_parse_and_validate(embedded, llm_check, temperature):
    llm_check(embedded)
    params = [SamplingParams(max_tokens=160, temperature=temperature, seed=i, json_schema=s)
              for i, s in enumerate(SCHEMAS)]
    outs = embedded.chat([ASK] * len(SCHEMAS), params)
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_and_schema_as_text(embedded, llm_check):
    llm_check(embedded)
    asks = [[{"role": "user", "content": q}] for q in ("Describe a cat as JSON.", "Give a JSON object with your name "
                                                                                  "and age.")]
    outs = embedded.chat(asks, SamplingParams(max_tokens=200, temperature=0, json=True))
    assert all(isinstance(json.loads(o.text), dict) for o in outs), [o.text for o in outs]
    text = json.dumps(SCHEMAS[0])
    a, b = embedded.chat([ASK] * 2, [SamplingParams(max_tokens=60, temperature=0, json_schema=s)
                                     for s in (text, SCHEMAS[0])])
    assert a.token_ids == b.token_ids
    again = embedded.chat([ASK], SamplingParams(max_tokens=60, temperature=0, json_schema=text))[0]
    assert again.cached_tokens > 0 and again.token_ids == a.token_ids  # the prefix cache changes nothing


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no)", r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}", r"\d{1,6}(\.\d{1,2})?",
           r"#[0-9a-f]{6}", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_outputs_full_match(embedded, llm_check, temperature):
    llm_check(embedded)
    outs = embedded.generate(["My answer:"] * len(REGEXES),
                             [SamplingParams(max_tokens=40, temperature=temperature, regex=r) for r in REGEXES])
    for r, out in zip(REGEXES, outs):
        assert out.finish_reason == "stop" and re.fullmatch(r, out.text), (r, out.text)


def test_ebnf_grammar(embedded, llm_check):
    llm_check(embedded)
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "(" num (" + " num)* ")"\nnum: /[1-9]/'
    a, b = embedded.generate(["Q:"] * 2, [SamplingParams(max_tokens=30, temperature=1, grammar=g)
                                          for g in (gbnf, lark)])
    assert a.text in ("The answer is yes.", "The answer is no.") and a.finish_reason == "stop"
    assert re.fullmatch(r"\([1-9]( \+ [1-9])*\)", b.text), b.text


def test_free_rows_unchanged_by_constrained_ones(embedded, llm_check):
    llm_check(embedded)
    free = [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, temperature=1, seed=7)]
    chats = [[{"role": "user", "content": q}] for q in ("Name three fruits.", "Tell me about the sea.")]
    alone = embedded.chat(chats, free)
    cons = [SamplingParams(max_tokens=40, temperature=t, json_schema=s) for t, s in ((0, SCHEMAS[0]), (1, SCHEMAS[4]))]
    mixed = embedded.chat([ASK, chats[0], ASK, chats[1]], [cons[0], free[0], cons[1], free[1]])
    assert [mixed[1].token_ids, mixed[3].token_ids] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[0].text), SCHEMAS[0])


def test_permissive_constraint_changes_nothing(embedded, llm_check):
    """A regex that allows any text leaves the greedy tokens as they are: the mask step only masks."""
    llm_check(embedded)
    chats = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Count to ten in words.")]
    free = embedded.chat(chats, SamplingParams(max_tokens=30, temperature=0))
    masked = embedded.chat(chats, SamplingParams(max_tokens=30, temperature=0, regex=r"(.|\n)*"))
    assert [o.token_ids for o in masked] == [o.token_ids for o in free]
    assert free[0].text == "The capital of France is Paris."


def test_length_stop_strings_and_overlap(embedded, llm_check):
    llm_check(embedded)
    out = embedded.generate("x", SamplingParams(max_tokens=5, temperature=0, regex="a{40}"))
    assert out[0].finish_reason == "length" and out[0].text == "a" * len(out[0].text)
    out = embedded.chat([ASK], SamplingParams(max_tokens=60, temperature=0, json_schema=SCHEMAS[1], stop=","))[0]
    assert out.finish_reason == "stop" and out.text.startswith('{"city":') and "," not in out.text
    p = SamplingParams(max_tokens=60, temperature=0, json_schema=SCHEMAS[6])
    with LLM(dtype="float32", device="cpu", disable_overlap=True) as plain:
        assert plain.chat([ASK], p)[0].token_ids == embedded.chat([ASK], p)[0].token_ids


def test_preemption_chunked_prefill_and_prefix_cache():
    """Two requests that cannot both stay resident: one is preempted mid-output and resumes its
    matcher state, giving the tokens it gives alone. Prompts prefill in chunks; repeats hit the cache."""
    llm = LLM(dtype="float32", device="cpu", kv_cache_tokens=201, max_prefill_tokens=32)
    digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 30, "maxItems": 30}
    ids = llm.tokenizer.encode("Some numbers, please. " + "The quick brown fox jumps over the lazy dog. " * 9)[:90]
    p = [SamplingParams(max_tokens=100, temperature=t, seed=3, json_schema=digits) for t in (0, 1)]
    together = llm.generate([ids, ids[::-1]], p)
    assert llm.stats().preemptions > 0
    alone = [llm.generate([x], q)[0] for x, q in zip((ids, ids[::-1]), p)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for o in together + alone:
        jsonschema.validate(json.loads(o.text), digits)
    from tests.conftest import kv_leak_free

    kv_leak_free(llm)
    llm.close()


@pytest.mark.parametrize("bad", [
    {"json_schema": {"type": "nonsense"}}, {"json_schema": "{not json"}, {"regex": "("},
    {"grammar": "root ::= foo"}, {"json_schema": {"type": "object"}, "regex": "a"}, {"json": True, "grammar": "x"},
    {"regex": 5}, {"json_schema": 3}, {"regex": "a" * 70_000},
])
def test_invalid_constraints_refused(embedded, bad):
    with pytest.raises(InvalidRequest):
        embedded.generate("x", SamplingParams(max_tokens=4, **bad))
    assert embedded.generate("x", SamplingParams(max_tokens=2, temperature=0))[0].finish_reason == "length"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--dtype", "float32", "--device", "cpu") as srv:
        yield srv


def test_native_protocol(server):
    async def go() -> list[dict]:
        async with connect(server.url) as ws:
            await ws.recv()  # hello
            frames = [
                {"id": "s", "messages": ASK, "max_tokens": 100, "temperature": 1, "json_schema": SCHEMAS[11]},
                {"id": "r", "prompt": "Phone:", "max_tokens": 20, "regex": r"[0-9]{3}-[0-9]{4}", "stream": False},
                {"id": "j", "prompt": "A cat as JSON:", "max_tokens": 100, "temperature": 0, "json": True},
                {"id": "g", "prompt": "Q:", "max_tokens": 20, "grammar": 'root ::= "a" | "b"'},
                {"id": "bad", "prompt": "x", "regex": "[", "max_tokens": 5},
                {"id": "two", "prompt": "x", "regex": "a", "json": True},
                {"id": "type", "prompt": "x", "json_schema": 5},
            ]
            for f in frames:
                await ws.send(json.dumps({"type": "generate", **f}))
            texts: dict[str, str] = {}
            ends: dict[str, dict] = {}
            while len(ends) < len(frames):
                m = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if m["type"] == "delta":
                    texts[m["id"]] = texts.get(m["id"], "") + m["text"]
                else:
                    ends[m["id"]] = m
            return [texts, ends]

    texts, ends = asyncio.run(go())
    jsonschema.validate(json.loads(texts["s"]), SCHEMAS[11])
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", ends["r"]["text"])
    assert isinstance(json.loads(texts["j"]), dict) and texts["g"] in ("a", "b")
    assert all(ends[k]["type"] == "done" and ends[k]["finish_reason"] == "stop" for k in "srjg"), ends
    for k in ("bad", "two", "type"):
        assert ends[k]["type"] == "error" and ends[k]["code"] == "invalid_request", ends[k]
    assert "unclosed" in ends["bad"]["message"] and "at most one" in ends["two"]["message"]


def test_openai_response_format(server):
    """OpenAI's response_format (chat) and text.format (Responses) through the official SDK."""
    import openai

    client = openai.OpenAI(base_url=server.http + "/v1", api_key="none", max_retries=0)
    chat = client.chat.completions.create
    r = chat(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=100, temperature=1, seed=1,
             response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[11]}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[11])
    r = chat(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=100, temperature=0,
             response_format={"type": "json_object"})
    text = r.choices[0].message.content  # an open-ended object may not close within max_tokens
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    r = client.responses.create(model="SmolLM2-135M-Instruct", input="A cat as JSON:", max_output_tokens=100,
                                temperature=0,
                                text={"format": {"type": "json_schema", "name": "s", "schema": SCHEMAS[11]}})
    jsonschema.validate(json.loads(r.output_text), SCHEMAS[11])
    with pytest.raises(openai.BadRequestError, match="invalid json_schema"):
        chat(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=5,
             response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}})
    with pytest.raises(openai.BadRequestError, match="not supported"):
        chat(model="SmolLM2-135M-Instruct", messages=ASK, response_format={"type": "grammar"})


def test_tensor_parallel(embedded):
    """tp=3: rank 0 masks and samples (the other ranks' samples are replaced by its broadcast)."""
    p = [SamplingParams(max_tokens=40, temperature=0, json_schema=SCHEMAS[6]),
         SamplingParams(max_tokens=12, temperature=0)]
    ref = [o.token_ids for o in embedded.chat([ASK, ASK], p)]
    with LLM(tp=3, dtype="float32", device="cpu", kv_cache_tokens=1024) as llm:
        assert [o.token_ids for o in llm.chat([ASK, ASK], p)] == ref

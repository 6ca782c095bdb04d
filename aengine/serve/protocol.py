"""Wire types of WebSocket protocol v1 (docs/protocol.md is the contract). JSON text frames,
typed with msgspec so that a frame is validated while it is parsed, in one pass."""

from typing import Annotated, Literal, get_type_hints

import msgspec

from aengine.types import SAMPLING_FIELDS, SamplingParams, TokenLogprob

PROTOCOL_VERSION = 1

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


# Unknown fields are refused, not ignored: a misspelt "max_token" ignored would generate up to the whole context.
# The sampling fields are SamplingParams' own (names, types, defaults; docs/protocol.md) but two: top_k is bounded
# because the sampler holds it as an int, and max_tokens defaults to the rest of the context.
_WIRE = {"top_k": (Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)], 0), "max_tokens": (int | None, None)}


def wire_fields() -> list[tuple]:
    """(name, type, default) of every sampling field, for msgspec.defstruct."""
    hints = get_type_hints(SamplingParams)
    return [(f, *_WIRE.get(f, (hints[f], SamplingParams.__dataclass_fields__[f].default))) for f in SAMPLING_FIELDS]


Generate = msgspec.defstruct(
    "Generate", [("id", Id), ("prompt", str | None, None), ("messages", list[Message] | None, None),
                 ("input_ids", list[int] | None, None), ("stream", bool, True), *wire_fields()],
    tag="generate", tag_field="type", forbid_unknown_fields=True, module=__name__)


class Cancel(msgspec.Struct, tag="cancel", tag_field="type", forbid_unknown_fields=True):
    id: Id


ClientMessage = Generate | Cancel


class Hello(msgspec.Struct, tag="hello", tag_field="type"):
    model: str
    max_context: int
    protocol: int = PROTOCOL_VERSION


class Delta(msgspec.Struct, tag="delta", tag_field="type", omit_defaults=True):
    id: str
    text: str
    token_ids: list[int]
    index: int = 0  # which of the n completions
    logprobs: list[TokenLogprob] | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Timing(msgspec.Struct):
    ttft_ms: float  # 0 when no token was generated
    total_ms: float


class Done(msgspec.Struct, tag="done", tag_field="type", omit_defaults=True):
    id: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timing: Timing
    text: str | None = None  # the whole text, only when the request had stream=false
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # all of them, only with stream=false


class Error(msgspec.Struct, tag="error", tag_field="type"):
    id: str | None
    code: Literal["invalid_request", "context_length_exceeded", "overloaded", "unauthorized", "internal"]
    message: str


ServerMessage = Hello | Delta | Done | Error

_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


class ProtocolError(ValueError):
    """A frame that is not a valid client message; id is the frame's id when one could be read."""

    def __init__(self, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.id = id


def decode(frame: str | bytes) -> ClientMessage:
    try:
        msg = _decoder.decode(frame)
    except msgspec.DecodeError as e:
        raise ProtocolError(str(e), _salvage_id(frame)) from None
    except RecursionError:  # msgspec's answer to a hostile "[[[[..." frame
        raise ProtocolError("JSON nested too deeply") from None
    if isinstance(msg, Generate) and sum(x is not None for x in (msg.prompt, msg.messages, msg.input_ids)) != 1:
        raise ProtocolError("give exactly one of prompt, messages, input_ids", msg.id)
    return msg


def _salvage_id(frame: str | bytes) -> str | None:
    """The id of a frame that failed validation, so the client can match the error to its request."""
    try:
        obj = msgspec.json.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 256 else None  # never echo an over-long id


def encode(msg: ServerMessage) -> bytes:
    return _encoder.encode(msg)

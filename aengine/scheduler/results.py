"""A step's sampled token for a request: whether it ends it, and the RequestDelta/RequestOutput its caller gets."""

import time

from aengine.scheduler.request import Req
from aengine.types import RequestDelta, RequestOutput, TokenLogprob


def take_logprobs(req: Req, row: list[float], k: int) -> int:
    """The token of a runner row of a step with logprobs (sampler.with_logprobs), keeping them if req asked."""
    tok, n = int(row[0]), req.params.logprobs
    if n is not None:
        req.logprobs.append(TokenLogprob(tok, row[1], list(zip(map(int, row[2 : 2 + n]), row[2 + k : 2 + k + n]))))
    return tok


def append_token(req: Req, tok: int, eos_ids: set[int], max_model_len: int) -> str | None:
    """Add tok to req's output; returns the finish reason it causes, if any (a grammar consumes tok in grammar.py)."""
    t = req.t_last = time.monotonic()
    req.t_first = req.t_first if req.output_ids else t
    req.output_ids.append(tok)
    p = req.params
    if (tok in eos_ids and not p.ignore_eos) or (p.stop_token_ids and tok in p.stop_token_ids) or req.detok.add(tok):
        return "stop"  # (a stop string only when no stop token ended it first)
    n = len(req.output_ids)
    return "length" if n >= req.max_tokens or len(req.prompt_ids) + n >= max_model_len else None


def output(req: Req, reason: str) -> RequestOutput:
    ms = lambda t: (t - req.t_arrival) * 1e3  # noqa: E731
    return RequestOutput(req.rid, req.detok.text, list(req.output_ids), reason, len(req.prompt_ids), req.cached_tokens,
                         req.prompt_ids, ms(req.t_first) if req.t_first else 0.0, ms(req.t_last or req.t_arrival),
                         req.index, None if req.logprobs is None else list(req.logprobs))


def emit(req: Req, ids: list[int], text: str, reason: str | None = None) -> None:
    lp = None if req.logprobs is None else req.logprobs[len(req.logprobs) - len(ids) :]
    req.emit(RequestDelta(ids, text, reason, output(req, reason) if reason is not None else None, req.index, lp))

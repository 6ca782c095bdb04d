"""Turning the chosen (request, tokens) rows into the StepInput the model runner executes."""

from aengine.runtime.step import StepInput
from aengine.scheduler.request import Req
from aengine.types import EngineStats


def build_step(chosen: list[tuple[Req, int]], decode: bool, n_decoding: int, stats: EngineStats,
               eos_ids: set[int]) -> StepInput:
    """The step's StepInput; in a prefill step the first n_decoding rows decode (a mixed step).
    Runs for every step on the loop thread: per row only what changes; columns are built whole."""
    inp = StepInput(decode, [], [], [], [], [], [], [], [], [], [], [], [], [], decoding=n_decoding)
    stats.mixed_steps += n_decoding > 0
    sampled = inp.sample_rows
    for i, (req, n) in enumerate(chosen):
        if i < n_decoding:  # its token is the last one sampled, not known here under overlap
            inp.input_ids.append(0)
        elif not decode:
            inp.input_ids.extend(req.fill_ids[req.kv_len : req.kv_len + n])
            stats.prefill_tokens += n
        req.kv_len += n
        if req.synced_pages < len(req.pages):
            inp.pt_rows.extend([req.slot] * (len(req.pages) - req.synced_pages))
            inp.pt_cols.extend(range(req.synced_pages, len(req.pages)))
            inp.pt_pages.extend(req.pages[req.synced_pages :])
            req.synced_pages = len(req.pages)
        if not req.prefilling:  # this step's last token yields the next output
            sampled.append(i)
            if req.processed:
                _process_args(inp, req, len(sampled) - 1, eos_ids)
            req.pending += 1
    inp.slots = [r.slot for r, _ in chosen]
    inp.seq_lens = [r.kv_len for r, _ in chosen]
    inp.extend_lens = [n for _, n in chosen]
    if sampled:  # per request once (Req.sampling), transposed here into the five columns
        inp.temperature, inp.top_p, inp.top_k, inp.min_p, inp.seeds = map(
            list, zip(*[chosen[i][0].sampling for i in sampled]))
    return inp


def _process_args(inp: StepInput, req: Req, row: int, eos_ids: set[int]) -> None:
    """The logit processing, logprobs and grammar of a sampled row whose request asks for any."""
    p = req.params
    if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1:
        inp.pen.append((row, p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                        len(req.output_ids), len(req.prompt_set), req.pending))
        inp.seen_ids += req.output_ids + req.prompt_set
    if len(req.output_ids) + req.pending < p.min_tokens:
        inp.bias += [(row, t, -float("inf")) for t in eos_ids.union(p.stop_token_ids or ())]
    if p.logit_bias:
        inp.bias += [(row, t, b) for t, b in p.logit_bias.items()]
    if p.logprobs is not None:
        inp.logprobs = max(inp.logprobs, p.logprobs)
    if req.matcher is not None:
        inp.masked.append(row)

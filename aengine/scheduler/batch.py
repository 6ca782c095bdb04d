"""Turning the chosen (request, tokens) rows into the StepInput the model runner executes."""

from __future__ import annotations

from aengine.runtime.step import StepInput
from aengine.scheduler.request import Req
from aengine.types import EngineStats

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (as vLLM's)
MIN_TOP_P = 1e-6  # below it only the most likely token could be kept: greedy


def build_step(chosen: list[tuple[Req, int]], decode: bool, n_decoding: int, stats: EngineStats,
               eos_ids: set[int]) -> StepInput:
    """The step's StepInput; in a prefill step the first n_decoding rows decode (a mixed step)."""
    inp = StepInput(decode, [], [], [], [], [], [], [], [], [], [], [], [], [], decoding=n_decoding)
    stats.mixed_steps += n_decoding > 0
    for i, (req, n) in enumerate(chosen):
        if i < n_decoding:  # its token is the last one sampled, not known here under overlap
            inp.input_ids.append(0)
        elif not decode:
            inp.input_ids.extend(req.fill_ids[req.kv_len : req.kv_len + n])
            stats.prefill_tokens += n
        req.kv_len += n
        inp.slots.append(req.slot)
        inp.seq_lens.append(req.kv_len)
        inp.extend_lens.append(n)
        if req.synced_pages < len(req.pages):
            inp.pt_rows.extend([req.slot] * (len(req.pages) - req.synced_pages))
            inp.pt_cols.extend(range(req.synced_pages, len(req.pages)))
            inp.pt_pages.extend(req.pages[req.synced_pages :])
            req.synced_pages = len(req.pages)
        if not req.prefilling:  # this step's last token yields the next output
            p = req.params
            inp.sample_rows.append(i)
            # Sampling runs in float32: 1 / T overflows for T near 1e-38, and a top_p that rounds to
            # 0 keeps no token at all. Both limits mean "the most likely token", so they are greedy.
            greedy = p.temperature < MIN_TEMPERATURE or p.top_p < MIN_TOP_P
            inp.temperature.append(0.0 if greedy else float(p.temperature))
            inp.top_p.append(1.0 if greedy else float(p.top_p))
            inp.top_k.append(max(0, p.top_k))
            inp.min_p.append(float(p.min_p))
            inp.seeds.append(-1 if p.seed is None else p.seed)
            if req.processed:
                row = len(inp.sample_rows) - 1
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
            req.pending += 1
    return inp

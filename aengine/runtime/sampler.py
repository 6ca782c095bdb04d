"""Sampling: greedy, temperature, top-k, top-p, min-p. A seeded row draws its noise from a
generator seeded by (seed, position), so its tokens do not depend on what else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aengine.layers.fused import flashinfer


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [S] float, 0 = greedy
    top_p: torch.Tensor  # [S] float
    top_k: torch.Tensor  # [S] int, 0 = off
    min_p: torch.Tensor  # [S] float
    seeds: list[tuple[int, int, int]]  # (row, seed, position) of seeded rows
    all_greedy: bool
    need_topk: bool
    need_topp: bool
    need_minp: bool
    any_greedy: bool = True  # some row has temperature 0


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [S, V] in the model's dtype -> token ids [S] int32. Widening to float32 happens in
    the temperature division (one kernel: bf16 / fp32 gives fp32); argmax needs no widening."""
    if st.all_greedy:
        return logits.argmax(-1).int()
    greedy = logits.argmax(-1) if st.any_greedy else None
    temp = st.temperature.unsqueeze(1)
    scaled = logits / torch.where(temp > 0, temp, 1.0)
    fi = flashinfer() if logits.is_cuda and not st.seeds and not st.need_minp else None
    if fi is not None:
        return _sample_fused(fi, scaled, st, greedy)
    probs = torch.softmax(scaled, dim=-1)
    if st.need_minp:
        probs = probs.masked_fill(probs < st.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
    if st.need_topk or st.need_topp:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        if st.need_topk:
            rank = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
            k = st.top_k.unsqueeze(1)
            sorted_p = sorted_p.masked_fill((k > 0) & (rank >= k), 0.0)
        if st.need_topp:
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            before = sorted_p.cumsum(-1) - sorted_p
            sorted_p = sorted_p.masked_fill(before >= st.top_p.unsqueeze(1) * sorted_p.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
    # exponential race: argmax p / E with E ~ Exp(1) draws from p (no normalisation needed)
    noise = torch.empty_like(probs).exponential_()
    for row, seed, pos in st.seeds:
        g = torch.Generator(device=probs.device).manual_seed((seed * 1_000_003 + pos) & 0x7FFF_FFFF_FFFF_FFFF)
        noise[row] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
    drawn = (probs / noise).argmax(-1)
    return (drawn if greedy is None else torch.where(st.temperature > 0, drawn, greedy)).int()


def _sample_fused(fi: object, scaled: torch.Tensor, st: SamplingTensors, greedy: torch.Tensor | None) -> torch.Tensor:
    """flashinfer's sampling kernels: one pass over the vocabulary instead of a sort and several
    elementwise passes. Unseeded rows only: seeded ones need the per-row generators above."""
    if st.need_topk or st.need_topp:
        k = torch.where(st.top_k > 0, st.top_k, scaled.shape[1]).int()
        drawn = fi.sampling.top_k_top_p_sampling_from_probs(
            torch.softmax(scaled, dim=-1), k, st.top_p, filter_apply_order="joint")
    else:
        drawn = fi.sampling.sampling_from_logits(scaled)
    return (drawn if greedy is None else torch.where(st.temperature > 0, drawn.long(), greedy)).int()

"""Sampling: greedy, temperature, top-k, top-p, min-p; a seeded row's noise comes from (seed, position), not
the batch. Plain temperature sampling on CUDA is one Triton kernel over column chunks (docs/gpu.md)."""

import os
from dataclasses import dataclass

import torch

from aengine.layers.fused import flashinfer
from aengine.runtime.step import StepInput

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path below
    triton = None


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


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned and asynchronous on CUDA: a copy from pageable memory would wait for the step in flight."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


if triton is not None:

    # Triton compiles a variant per divisibility of each int argument; these change with the batch
    # size and every step (the seed), and a compile in the middle of serving stalls every stream
    @triton.jit(do_not_specialize=["seed", "V", "NCHUNK"])
    def _sample_chunk(logits, stride, temp, seed, V, out_v, out_i, NCHUNK, BLOCK: tl.constexpr):
        """Row r, chunk c of BLOCK columns: a token drawn in the chunk by inverse CDF, and the chunk's log-mass plus
        Gumbel noise: the best chunk's token is a draw from the row's softmax (S_c / S * p_i / S_c). Two random
        numbers per chunk: one per column made it compute-bound. Temperature 0: the chunk's max, argmax."""
        r, c = tl.program_id(0), tl.program_id(1)
        t = tl.load(temp + r)
        col = tl.arange(0, BLOCK)
        x = tl.load(logits + r.to(tl.int64) * stride + c * BLOCK + col, mask=c * BLOCK + col < V,
                    other=float("-inf")).to(tl.float32)
        if t > 0:
            x = x / t
            m = tl.max(x, 0)
            cdf = tl.cumsum(tl.exp(x - m), 0)
            n = (r * NCHUNK + c) * 2
            j = tl.sum((cdf <= tl.rand(seed, n) * tl.max(cdf, 0)).to(tl.int32), 0)
            j = tl.minimum(j, tl.max(tl.where(x > float("-inf"), col, 0), 0))  # rounding at the top of the CDF
            v = m + tl.log(tl.max(cdf, 0)) - tl.log(-tl.log(tl.rand(seed, n + 1)))
            v = tl.where(m > float("-inf"), v, float("-inf"))  # a fully masked chunk (grammar) never wins
        else:
            v, j = tl.max(x, 0, return_indices=True)
        tl.store(out_v + r * NCHUNK + c, v)
        tl.store(out_i + r * NCHUNK + c, c * BLOCK + j)

    def _sample_triton(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        (s, v), block = logits.shape, 4096
        chunks = -(-v // block)
        out_v, out_i = (torch.empty(s, chunks, dtype=dt, device=logits.device) for dt in (torch.float32, torch.int32))
        seed = int(torch.randint(2**31 - 1, (1,)))  # the torch generator: --seed governs it
        _sample_chunk[(s, chunks)](logits, logits.stride(0), temperature, seed, v, out_v, out_i, chunks,
                                   BLOCK=block, num_warps=4)
        return out_i.gather(1, out_v.argmax(1, keepdim=True)).view(-1)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [S, V] in the model's dtype -> token ids [S] int32. Widening to float32 happens in
    the temperature division (one kernel: bf16 / fp32 gives fp32); argmax needs no widening."""
    if st.all_greedy:
        return logits.argmax(-1).int()
    if (triton is not None and logits.is_cuda and not (st.seeds or st.need_minp or st.need_topk or st.need_topp)
            and not os.environ.get("AENGINE_NO_FUSED")):
        return _sample_triton(logits, st.temperature)
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


def process_logits(logits: torch.Tensor, inp: StepInput, last_tok: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Penalties, logit_bias and min_tokens of the rows that ask, in a few batched kernels (rows that do not keep
    their logits). last_tok[slots[row]]: a sampled row's token in flight. Runs before a grammar's masks."""
    if not inp.pen and not inp.bias:
        return logits
    x, dev = logits.float(), logits.device
    up = lambda t: upload(t, dev)
    if inp.pen:
        p = torch.tensor(inp.pen, dtype=torch.float64)
        n, fly = len(inp.pen), torch.nonzero(p[:, 6] > 0).view(-1)
        rows, which, seen, fly = (up(t) for t in (p[:, 0].long(), torch.arange(2 * n).repeat_interleave(
            p[:, 4:6].long().flatten()), torch.tensor(inp.seen_ids, dtype=torch.long), fly))
        c = torch.zeros(2 * n, x.shape[1], device=dev)  # rows 2i: generated counts, 2i + 1: in the prompt
        c.index_put_((which, seen), c.new_ones(()), True)
        c.index_put_((2 * fly, last_tok[slots[rows[fly]].long()].long()), c.new_ones(()), True)
        gen, c = c[0::2], c[0::2] + c[1::2]
        pres, freq, rep = up(p[:, 1:4].float()).split(1, 1)
        y = x[rows]
        y = torch.where(c > 0, torch.where(y > 0, y / rep, y * rep), y) - freq * gen - pres * (gen > 0)
        x[rows] = y
    if inp.bias:
        b = torch.tensor(inp.bias, dtype=torch.float64)
        x.index_put_((up(b[:, 0].long()), up(b[:, 1].long())), up(b[:, 2].float()), True)
    return x


def apply_token_masks(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """Structured output: masks[i], the allowed tokens of logits row rows[i] as host int32 bitmask words (bit j
    of word w: token 32 w + j); the rest get -inf. The uploads are asynchronous: they wait for the forward."""
    idx, m = upload(torch.tensor(rows), logits.device), upload(masks, logits.device)
    bits = (m.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
    logits[idx] = logits[idx].masked_fill(bits.view(len(rows), -1)[:, : logits.shape[1]] == 0, float("-inf"))


def with_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """[S, 2 + 2k] float32: per row the sampled id, its logprob, the k most likely ids, theirs."""
    top = (lp := torch.log_softmax(logits.float(), -1)).topk(k, -1)
    return torch.cat([ids.float()[:, None], lp.gather(1, ids.long()[:, None]), top.indices.float(), top.values], 1)

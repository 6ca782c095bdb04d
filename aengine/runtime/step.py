"""The scheduler's step for the model runner: plain lists, msgspec-encodable, so that TP ranks run exactly rank 0's."""

import msgspec


class StepInput(msgspec.Struct, array_like=True):
    decode: bool
    slots: list[int]  # request slot (page-table row) of each sequence
    seq_lens: list[int]  # tokens in KV after this step
    extend_lens: list[int]  # new tokens this step (1 for decode)
    input_ids: list[int]  # prefill: the new tokens, flat; decode: empty (read on device)
    sample_rows: list[int]  # sequences whose next token is sampled
    pt_rows: list[int]  # page-table writes: page_table[row, col] = page
    pt_cols: list[int]
    pt_pages: list[int]
    temperature: list[float]  # per sampled row
    top_p: list[float]
    top_k: list[int]
    min_p: list[float]
    seeds: list[int]  # -1: unseeded
    decoding: int = 0  # prefill steps: the first `decoding` rows decode (one token each, read on device)
    # Logit processing of the sampled rows that ask (empty lists: the step skips it). pen: (row, presence, frequency,
    # repetition, n generated, n prompt, in flight: its last sampled token, on the device, counts as generated);
    # seen_ids: each row's generated then distinct prompt tokens. bias: (row, token, added). logprobs: top k, -1: none.
    pen: list[tuple[int, float, float, float, int, int, int]] = []
    seen_ids: list[int] = []
    bias: list[tuple[int, int, float]] = []
    logprobs: int = -1
    masked: list[int] = []  # sampled rows (indexes into sample_rows) that a grammar constrains

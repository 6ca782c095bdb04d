"""Structured output's step before sampling: tokens a constrained row's grammar forbids get -inf."""

import torch


def apply_token_masks(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """masks[i]: the allowed tokens of logits row rows[i] as host int32 bitmask words (bit j of word
    w: token 32 w + j). The uploads are asynchronous: they wait for the forward on the device."""
    idx, m = torch.tensor(rows), masks
    if logits.is_cuda:  # a copy from pageable memory would wait here for the forward
        idx, m = idx.pin_memory(), m.pin_memory()
    idx, m = idx.to(logits.device, non_blocking=True), m.to(logits.device, non_blocking=True)
    bits = (m.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
    logits[idx] = logits[idx].masked_fill(bits.view(len(rows), -1)[:, : logits.shape[1]] == 0, float("-inf"))

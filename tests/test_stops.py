"""Stop strings: the incremental matcher against brute force on random text arriving in random
pieces, and the limits that keep stop matching from stalling the loop."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from aengine import InvalidRequest, SamplingParams
from aengine.tokenizer import StopMatcher

words = st.text(alphabet="abc", min_size=1, max_size=6)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(stops=st.lists(words, min_size=1, max_size=4), pieces=st.lists(st.text(alphabet="abc", max_size=4), max_size=12))
def test_matcher_equals_brute_force(stops: list[str], pieces: list[str]) -> None:
    m, text = StopMatcher(stops), ""
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        got = m.feed(piece)
        if found:  # the first piece in which a stop string appears: where the earliest one starts
            assert got == min(found)
            return
        assert got == -1
        hold = max((k for k in range(1, len(text) + 1) if any(s.startswith(text[-k:]) for s in stops)), default=0)
        assert m.partial == hold


@pytest.mark.parametrize("kw", [dict(stop=["x"] * 17), dict(stop=["y" * 257]), dict(stop_token_ids=list(range(257))),
                                dict(stop=[str(i) for i in range(500_000)])])
def test_stop_limits(kw: dict) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**kw).validate()
    SamplingParams(stop=["s" * 256] * 16, stop_token_ids=list(range(256))).validate()  # the limits themselves pass

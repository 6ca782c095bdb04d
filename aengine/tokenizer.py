"""Tokenizer front: chat template, detokenization that never splits a character, stop strings never partly leaked."""

import functools
import json
from pathlib import Path

from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, path: Path) -> None:
        # A tokenizer.json loads straight into the fast class (AutoTokenizer imports much of transformers, a lazy
        # module: seconds of start-up); never ask the hub (offline machines would wait on its timeouts).
        import transformers
        cls = transformers.PreTrainedTokenizerFast if (path / "tokenizer.json").exists() else transformers.AutoTokenizer
        self.hf = cls.from_pretrained(str(path), local_files_only=True)
        self.eos_ids: set[int] = {getattr(self.hf, "eos_token_id", None)} - {None}  # the tokenizer's and the configs'
        for name in ("generation_config.json", "config.json"):
            if (f := path / name).exists():
                e = json.loads(f.read_text()).get("eos_token_id")
                self.eos_ids.update(e if isinstance(e, list) else [e] if e is not None else [])
        # the most UTF-8 bytes one token can stand for (its vocabulary string's bytes bound them
        # from above): text longer than this times a context cannot fit it, whatever its tokens
        self.max_token_bytes = max((len(t.encode()) for t in self.hf.get_vocab()), default=1)

    def encode(self, text: str, special: bool = True) -> list[int]:
        # the batch call releases the GIL (a single encode held it: 0.4 s of stalled loop per 300 KB)
        return self.hf.backend_tokenizer.encode_batch([text], add_special_tokens=special)[0].ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text, special=False)


class StopMatcher:
    """Stop strings in text that arrives piece by piece: per stop string, a KMP automaton's state (the
    longest prefix of it the text ends with), so a character costs O(1) per stop (docs/reliability.md)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.pos = 0  # characters seen

    def feed(self, piece: str) -> int:
        """Feed text; returns where the earliest stop string found in it starts (in all text so far), or -1."""
        found = -1
        for ch in piece:
            self.pos += 1
            for j, s in enumerate(self.stops):
                k, fail = self.state[j], self.fail[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                k += s[k] == ch
                if k == len(s):
                    start = self.pos - k
                    found = start if found < 0 else min(found, start)
                    k = fail[k - 1]
                self.state[j] = k
        return found

    @property
    def partial(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        return max(self.state, default=0)


@functools.lru_cache(maxsize=4096)  # filled on a tokenizer thread (serve/session.py); shared, never changed
def _failure(s: str) -> list[int]:
    """KMP: for each prefix of s, the length of its longest proper prefix that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        k += s[i] == s[k]
        f[i] = k
    return f


class Detokenizer:
    """A request's token ids as text deltas; text that may begin a stop string is held back until it cannot."""

    def __init__(self, tok: Tokenizer, stop: list[str]) -> None:
        self.backend = tok.hf.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stops = StopMatcher(stop) if any(stop) else None
        self.text = ""  # everything decoded so far
        self.sent = 0  # chars of self.text already handed out

    def add(self, token_id: int) -> bool:
        """Feed one token; True when a stop string was found (the text is cut before it)."""
        if not (piece := self.stream.step(self.backend, token_id)):
            return False
        self.text += piece
        if self.stops is not None and (cut := self.stops.feed(piece)) >= 0:
            self.text, self.stops = self.text[:cut], None
            return True
        return False

    def delta(self, final: bool) -> str:
        """New text safe to send: all of it when final, else all but a possible stop prefix."""
        held = self.stops.partial if not final and self.stops is not None else 0
        end = max(len(self.text) - held, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out

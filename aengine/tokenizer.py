"""Tokenizer front: chat template, incremental detokenization that never splits a character,
and stop strings that are never partly leaked."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        # a local directory: never ask the hub (offline machines would wait on its timeouts)
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.eos_ids = _eos_ids(path, self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(text).input_ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.hf(text, add_special_tokens=False).input_ids

    def detokenizer(self, stop: list[str]) -> Detokenizer:
        return Detokenizer(self, stop)


def _eos_ids(path: Path, hf: object) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.exists():
            e = json.loads(f.read_text()).get("eos_token_id")
            ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    if getattr(hf, "eos_token_id", None) is not None:
        ids.add(hf.eos_token_id)
    return ids


class Detokenizer:
    """Turns a request's token ids into text deltas. Text that might be the start of a stop string
    is held back until it is known not to be one."""

    def __init__(self, tok: Tokenizer, stop: list[str]) -> None:
        self.backend = tok.hf.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far
        self.sent = 0  # chars of self.text already handed out

    def add(self, token_id: int) -> bool:
        """Feed one token; True when a stop string was found (the text is cut before it)."""
        piece = self.stream.step(self.backend, token_id)
        if not piece:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stop = []
            return True
        return False

    def delta(self, final: bool) -> str:
        """New text safe to send: all of it when final, else all but a possible stop prefix."""
        end = len(self.text)
        if not final:
            end -= self._partial_stop()
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

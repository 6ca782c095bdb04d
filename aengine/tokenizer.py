"""Tokenizer front: chat template, detokenization that never splits a character, stop strings never partly leaked."""

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

# what transformers passes a chat template besides the messages: its named special tokens, as strings
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, path: Path) -> None:
        # A tokenizer.json loads with the tokenizers library alone and the chat template renders in jinja2 as
        # transformers renders it: importing transformers (1-2 s of Python) on the thread that loads the tokenizer
        # beside the model held the GIL the model build and graph capture need (start-up, RESULTS.md).
        # Never ask the hub (offline machines would wait on its timeouts).
        self.path, cfg = path, _json(path / "special_tokens_map.json") | _json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").exists():
            self.backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            self.special = {k: v for k in SPECIAL if (v := _content(cfg.get(k)))}
            self.chat_template = _chat_template(path, cfg)
        else:  # sentencepiece and other slow formats: transformers converts them
            self.backend, self.special = self.hf.backend_tokenizer, self.hf.special_tokens_map
            self.chat_template = self.hf.chat_template
        eos = self.backend.token_to_id(self.special["eos_token"]) if "eos_token" in self.special else None
        self.eos_ids: set[int] = {eos} - {None}  # the tokenizer's and the configs'
        for name in ("generation_config.json", "config.json"):
            e = _json(path / name).get("eos_token_id")
            self.eos_ids.update(e if isinstance(e, list) else [e] if e is not None else [])
        # the most UTF-8 bytes one token can stand for (its vocabulary string's bytes bound them
        # from above): text longer than this times a context cannot fit it, whatever its tokens
        self.max_token_bytes = max((len(t.encode()) for t in self.backend.get_vocab()), default=1)

    @functools.cached_property
    def hf(self) -> object:
        """transformers' tokenizer of the same files, loaded on first use (llguidance builds on it)."""
        import transformers

        cls = transformers.PreTrainedTokenizerFast if (self.path / "tokenizer.json").exists() \
            else transformers.AutoTokenizer
        return cls.from_pretrained(str(self.path), local_files_only=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        # the batch call releases the GIL (a single encode held it: 0.4 s of stalled loop per 300 KB)
        return self.backend.encode_batch([text], add_special_tokens=special)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a prompt instead")
        try:
            text = _compile(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                       add_generation_prompt=True, **self.special)
        except jinja2.TemplateSyntaxError:  # e.g. transformers' own {% generation %} tag
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # the template's raise_exception: it refuses these messages
            raise ValueError(f"the chat template refused the messages: {e}") from None
        return self.encode(text, special=False)


def _json(f: Path) -> dict:
    return json.loads(f.read_text()) if f.exists() else {}


def _content(v: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _chat_template(path: Path, cfg: dict) -> str | None:
    """Where transformers keeps it: chat_template.jinja, else chat_template.json or tokenizer_config.json, as one
    template or as named ones (then "default")."""
    if (f := path / "chat_template.jinja").exists():
        return f.read_text()
    t = _json(path / "chat_template.json").get("chat_template", cfg.get("chat_template"))
    return {d["name"]: d["template"] for d in t}.get("default") if isinstance(t, list) else t


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """transformers' environment: sandboxed, trim_blocks and lstrip_blocks, loop controls, a tojson that keeps
    non-ASCII text, raise_exception and strftime_now."""
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


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
        self.backend = tok.backend
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

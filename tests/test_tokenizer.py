"""The tokenizer front without transformers (tokenizers + jinja2) against transformers' own tokenizer of the same
files: the same ids for chat templates, prompts and special tokens, and the engine never imports transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aengine.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! Ça va? 日本語"},
     {"role": "user", "content": "  spaces\nand lines  "}],
]

# loop controls, namespace, tojson with non-ASCII text, raise_exception, the special tokens, tools passed as none
TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}
{% if m.role == 'system' and not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
{% if m.content == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}
<{{ m.role }}>{{ m.content | tojson }}{{ eos_token }}
{% endfor %}{% if tools is not none %}TOOLS{% endif %}{% if add_generation_prompt %}<assistant>{{ ns.n }}{% endif %}"""


def hf_ids(path: Path, chat: list[dict]) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return tok.encode(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def test_embedded_matches_transformers(embedded) -> None:
    """The embedded SmolLM2's tokenizer (as converted from its GGUF, chat_template.jinja beside it)."""
    tok: Tokenizer = embedded.tokenizer
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == hf_ids(tok.path, chat)
    hf = tok.hf
    assert tok.eos_ids >= {hf.eos_token_id} and len(tok) == len(hf)
    text = "Ünïcode, <|im_start|> and spaces  \n"
    assert tok.encode(text) == hf.encode(text) and tok.decode(tok.encode(text)) == hf.decode(hf.encode(text))


def build(path: Path, template: object, where: str) -> Path:
    from tokenizers import Tokenizer as Fast
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz<>/\"{}:,. 0123456789"])}
    fast = Fast(models.WordLevel(vocab, unk_token="<unk>"))
    fast.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["eos_token"] = {"content": "</s>", "lstrip": False, "__type": "AddedToken"}  # as older configs write it
    if where in ("config", "named"):
        cfg["chat_template"] = template
    elif where == "jinja":
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("where", ["config", "jinja", "named"])
def test_template_features_match_transformers(where: str, tmp_path: Path) -> None:
    template = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "x"}] \
        if where == "named" else TEMPLATE
    path = build(tmp_path, template, where)
    tok = Tokenizer(path)
    assert tok.eos_ids == {2} and tok.special["bos_token"] == "<s>"
    chats = [[{"role": "user", "content": "ab"}], [{"role": "system", "content": "x"},
             {"role": "user", "content": "skip"}, {"role": "user", "content": "é"}]]
    for chat in chats:
        assert tok.apply_chat_template(chat) == hf_ids(path, chat)
    with pytest.raises(ValueError, match="refused the messages: system message must come first"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_no_template_is_a_clear_error(tmp_path: Path) -> None:
    tok = Tokenizer(build(tmp_path, None, "none"))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


def test_generation_tag_falls_back_to_transformers(tmp_path: Path) -> None:
    """A template with transformers' own {% generation %} tag: rendered by transformers, the same ids."""
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    path = build(tmp_path, template, "jinja")
    assert Tokenizer(path).apply_chat_template(CHATS[0][:1]) == hf_ids(path, CHATS[0][:1])


def test_engine_start_does_not_import_transformers() -> None:
    """Loading the tokenizer beside the model must not import transformers (its import holds the GIL for 1-2 s)."""
    code = ("import sys; from aengine import LLM; llm = LLM(dtype='float32', device='cpu', kv_cache_tokens=256); "
            "ids = llm.engine.encode(messages=[{'role': 'user', 'content': 'hi'}]); llm.close(); "
            "print(len(ids), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, imported = out.stdout.split()[-2:]
    assert int(n) > 0 and imported == "False", out.stdout


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_bos_token": False, "add_eos_token": True}])
def test_raw_prompt_special_tokens_match_transformers(flags: dict, tmp_path: Path) -> None:
    """Raw prompts get what tokenizer.json's post-processor adds, as with transformers' PreTrainedTokenizerFast (the
    class the engine used): add_bos_token / add_eos_token in the config change neither."""
    from transformers import PreTrainedTokenizerFast

    path = build(tmp_path, TEMPLATE, "jinja")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, **flags}))
    hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok = Tokenizer(path)
    for text in ("abc", ""):
        assert tok.encode(text) == hf.encode(text), (flags, text)
    assert tok.apply_chat_template(CHATS[0]) == hf_ids(path, CHATS[0])

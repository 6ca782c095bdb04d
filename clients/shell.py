"""Interactive shell: python -m aengine --shell. Chats with the model in the terminal through the
engine directly (no server): streams each answer, keeps the conversation, /reset forgets it,
/exit or Ctrl-D leaves, Ctrl-C stops the answer being written."""

from __future__ import annotations

import asyncio
import itertools
import sys

from aengine.config import EngineConfig
from aengine.engine import AsyncEngine, new_event_loop
from aengine.types import EngineError, SamplingParams
from clients.chat import command

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops an answer"


def _readline_history() -> None:
    try:  # arrow keys and line history where the platform has readline
        import readline  # noqa: F401
    except ImportError:
        pass


async def _answer(engine: AsyncEngine, rid: str, history: list[dict], params: SamplingParams) -> str:
    # The tokenizer runs here, on the loop: only this shell's one request is waiting on it.
    ids = engine.encode(messages=history)
    parts: list[str] = []
    async for d in engine.generate(rid, ids, params):
        if d.text:
            parts.append(d.text)
            print(d.text, end="", flush=True)
        if d.finish_reason == "length":
            print(" [length limit]", end="")
    print(flush=True)
    return "".join(parts)


def run_shell(cfg: EngineConfig, max_tokens: int = 512, temperature: float = 0.7) -> int:
    _readline_history()
    engine = AsyncEngine(cfg)
    loop = new_event_loop()
    loop.run_until_complete(engine.start())
    print(f"{engine.model_name} (context {engine.max_model_len} tokens). {HELP}", flush=True)
    history: list[dict] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    rids = itertools.count()
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if (quit := command(line, history, [], HELP)) is not None:
                if quit:
                    return 0
                continue
            history.append({"role": "user", "content": line})
            # Each answer runs to its end on the loop; the engine's scheduler task advances meanwhile.
            task = loop.create_task(_answer(engine, f"shell-{next(rids)}", history, params))
            try:
                history.append({"role": "assistant", "content": loop.run_until_complete(task)})
            except KeyboardInterrupt:
                task.cancel()  # generate()'s finally aborts the request, freeing its KV
                loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
                history.pop()
                print(" [stopped]", flush=True)
            except EngineError as e:
                history.pop()
                print(f"[error {e.code}: {e}]", flush=True)
            if engine.task is not None and engine.task.done():
                print("the engine stopped after a fault", file=sys.stderr)
                return 1
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()

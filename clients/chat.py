"""Terminal chat: python -m clients.chat --url ws://127.0.0.1:8765. Streams the answer as it is
generated and keeps the conversation; /reset starts over, /quit (or Ctrl-D) leaves."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

from websockets.exceptions import ConnectionClosed

from clients.client import Client, ServerError

HELP = "commands: /reset (forget the conversation), /quit"


async def chat(url: str, max_tokens: int | None, temperature: float, system: str | None,
               api_key: str | None) -> None:
    client = await Client.connect(url, api_key=api_key)
    print(f"connected to {client.model} (context {client.max_context} tokens). {HELP}", flush=True)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    lines = _stdin_lines()
    try:
        while True:
            print("> ", end="", flush=True)
            line = await _line_or_close(lines, client)
            if not line:
                print()
                return
            line = line.strip()
            if (quit := command(line, history, base, HELP)) is not None:
                if quit:
                    return
                continue
            history.append({"role": "user", "content": line})
            answer = []
            try:
                async for m in client.generate(messages=history, max_tokens=max_tokens, temperature=temperature):
                    if m["type"] == "delta":
                        answer.append(m["text"])
                        print(m["text"], end="", flush=True)
                    elif m["finish_reason"] == "length":
                        print(" [length limit]", end="")
                    elif m["finish_reason"] == "cancelled":
                        print(" [cut off: the server cancelled this answer]", end="")
            except ServerError as e:
                history.pop()
                print(f"[error {e.code}: {e.message}]", flush=True)
                continue
            except (ConnectionError, ConnectionClosed):  # the server went away during the answer
                raise Closed(client.close_reason()) from None
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        await client.close()


def command(line: str, history: list[dict], base: list[dict], help_text: str) -> bool | None:
    """An empty line or a /command of a chat UI (here and clients/shell.py): True to quit, False when
    handled (/reset puts history back to base), None for a message to send."""
    if line in ("/quit", "/exit"):
        return True
    if line == "/reset":
        history[:] = base
        print("(conversation reset)", flush=True)
    elif line.startswith("/"):
        print(help_text, flush=True)
    elif line:
        return None
    return False


class Closed(Exception):
    """The server closed the connection."""


async def _line_or_close(lines: asyncio.Queue[str], client: Client) -> str:
    """The next input line, or Closed as soon as the server goes away while we wait for one."""
    get = asyncio.ensure_future(lines.get())
    await asyncio.wait([get, client.reader], return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    raise Closed(client.close_reason())


def _stdin_lines() -> asyncio.Queue[str]:
    """Lines of stdin ("" at its end), read by a daemon thread: reading blocks, and the loop must keep
    the connection alive meanwhile; a daemon thread also never holds up exit on Ctrl-C."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()

    def read() -> None:
        for line in iter(sys.stdin.readline, ""):
            loop.call_soon_threadsafe(q.put_nowait, line)
        loop.call_soon_threadsafe(q.put_nowait, "")

    threading.Thread(target=read, daemon=True).start()
    return q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.chat", description="Chat with an aengine server.")
    p.add_argument("--url", default="ws://127.0.0.1:8765", help="server URL (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--api-key", default=None, help="the server's API key, if it needs one")
    a = p.parse_args(argv)
    try:
        asyncio.run(chat(a.url, a.max_tokens, a.temperature, a.system, a.api_key))
    except KeyboardInterrupt:
        print()
    except Closed as e:
        print(f"\n[the server closed the connection: {e}]")
        return 1
    except (OSError, ServerError) as e:
        print(f"\n[cannot chat with {a.url}: {e}]", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m aengine --shell, driven through a pseudo-terminal: a question, a streamed answer,
/reset, and exit."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.server_util import ROOT

pexpect = pytest.importorskip("pexpect")


def test_shell_chat_reset_exit() -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    child = pexpect.spawn(sys.executable, ["-m", "aengine", "--shell", "--log-level", "warning",
                                            "--max-tokens-limit", "24"], cwd=str(ROOT),
                          env=env, encoding="utf-8", timeout=240, dimensions=(40, 200))
    try:
        child.expect("SmolLM2-135M-Instruct")
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("France?\r\n")  # the terminal's echo of the line
        # Read the answer as it arrives: streamed, it comes in several pieces at different times.
        out, times = "", []
        while "\r\n> " not in out:
            out += child.read_nonblocking(4096, timeout=240)
            times.append(time.monotonic())
        answer = out.split("\r\n> ")[0].strip()
        assert answer, out
        assert len(times) >= 3 and times[-1] - times[0] > 0.05, (times, out)
        child.sendline("/reset")
        child.expect(r"\(conversation reset\)")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.exitstatus

"""Launching a step without blocking the event loop, and awaiting its sampled ids.

CPU: the step runs in one worker thread (steps stay in order). CUDA: kernels are launched from
the loop thread on the runner's stream, the ids are copied to pinned host memory, and a CUDA
event is awaited from a helper thread, so the loop keeps serving while the GPU works."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from aengine.engine.runner import ModelRunner
from aengine.engine.step import StepInput

# Test hook (docs/reliability.md): a prefill step holding this token id raises inside the step, as
# a faulting kernel would, so tests drive the fault path of a real server without mocks.
FAULT_TOKEN = int(os.environ.get("AENGINE_FAULT_TOKEN", "-1"))


def _inject_fault(inp: StepInput) -> None:
    if FAULT_TOKEN >= 0 and FAULT_TOKEN in inp.input_ids:
        raise RuntimeError(f"injected fault (token {FAULT_TOKEN} in a prefill)")


class Pending:
    def __init__(self, fut: Future | None = None, ids: torch.Tensor | None = None,
                 event: torch.cuda.Event | None = None) -> None:
        self.fut, self.ids, self.event = fut, ids, event


class Executor:
    def __init__(self, runner: ModelRunner, broadcast: object | None = None) -> None:
        self.runner = runner
        self.broadcast = broadcast  # TP: sends each step to the other ranks before running it
        self.cuda = runner.device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aengine-step")

    def _run(self, inp: StepInput) -> list[int]:
        _inject_fault(inp)
        if self.broadcast is not None:
            self.broadcast(inp)
        return self.runner.step(inp).tolist()

    def launch(self, inp: StepInput) -> Pending:
        if not self.cuda:
            return Pending(fut=self.pool.submit(self._run, inp))
        _inject_fault(inp)
        if self.broadcast is not None:
            self.broadcast(inp)
        ids = self.runner.step(inp).to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(ids=ids, event=event)

    async def result(self, p: Pending) -> list[int]:
        if p.fut is not None:
            return await asyncio.wrap_future(p.fut)
        if not p.event.query():
            await asyncio.get_running_loop().run_in_executor(self.pool, p.event.synchronize)
        return p.ids.tolist()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

"""Launching a step without blocking the event loop, and awaiting its sampled ids.

CPU: the step runs in one worker thread (steps stay in order). CUDA: kernels are launched from
the loop thread on the runner's stream, the ids are copied to pinned host memory, and a CUDA
event is awaited from a helper thread, so the loop keeps serving while the GPU works."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from aengine.engine.runner import ModelRunner
from aengine.engine.step import StepInput


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
        if self.broadcast is not None:
            self.broadcast(inp)
        return self.runner.step(inp).tolist()

    def launch(self, inp: StepInput) -> Pending:
        if not self.cuda:
            return Pending(fut=self.pool.submit(self._run, inp))
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

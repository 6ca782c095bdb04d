"""Launching a step without blocking the event loop, and awaiting its sampled ids. CPU: the step runs in one worker
thread (steps stay in order). CUDA: kernels are launched from the loop thread on the runner's stream, the ids are
copied to pinned host memory, and a CUDA event is awaited from a helper thread: the loop serves on meanwhile."""

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from aengine.runtime.runner import ModelRunner
from aengine.runtime.step import StepInput

# Errors after which the device is in an unknown state. CUDA errors are sticky: every later
# kernel fails too. An out-of-memory error mid-step leaves the step's KV writes half done.
_DEVICE_ERRORS = tuple(t for t in (getattr(torch, "AcceleratorError", None), torch.OutOfMemoryError) if t)


class StepFault(RuntimeError):
    """A step failed so that the engine's state is no longer trusted (a device error, a dead
    tensor-parallel rank): the scheduler stops instead of failing only the step's requests."""


class Pending:
    def __init__(self, fut: Future | None = None, ids: torch.Tensor | None = None,
                 event: torch.cuda.Event | None = None) -> None:
        self.fut, self.ids, self.event = fut, ids, event


class Executor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.cuda = runner, runner.device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aengine-step")

    def _run(self, inp: StepInput, masked: bool = False) -> list[int] | tuple:
        self.before_step(inp)
        return self.runner.forward(inp) if masked else self.runner.step(inp).tolist()

    def before_step(self, inp: StepInput) -> None:
        """Called just before each step runs here (TP: send it to the other ranks)."""

    def launch(self, inp: StepInput, masked: bool = False) -> Pending:
        """masked: launch only the forward; sample() launches the sampling once the masks are filled."""
        if not self.cuda:
            return Pending(fut=self.pool.submit(self._run, inp, masked))
        try:
            if masked:
                return Pending(ids=self._run(inp, True))  # the forward's outputs, until sample()
            self.before_step(inp)
            ids = self.runner.step(inp).to("cpu", non_blocking=True)
        except _DEVICE_ERRORS as e:
            raise StepFault(f"{type(e).__name__}: {e}") from e
        event = torch.cuda.Event()
        event.record()
        return Pending(ids=ids, event=event)

    def sample(self, p: Pending, inp: StepInput, masks: tuple[list[int], torch.Tensor]) -> None:
        """A masked step's sampling, queued behind its forward (on the device or the step thread)."""
        if not self.cuda:
            p.fut = self.pool.submit(lambda f=p.fut: self.runner.sample(inp, *f.result(), masks).tolist())
            return
        p.ids = self.runner.sample(inp, *p.ids, masks).to("cpu", non_blocking=True)  # a device error: the engine stops
        p.event = torch.cuda.Event()
        p.event.record()

    def ready_ids(self, p: Pending) -> list | None:
        """p's ids if its step is done (None if not, [] if it failed), from any thread, never waiting."""
        if p.fut is not None:
            return None if not p.fut.done() else [] if p.fut.exception() else p.fut.result()
        try:
            return p.ids.tolist() if p.event.query() else None
        except _DEVICE_ERRORS:
            return []

    async def result(self, p: Pending) -> list[int]:
        try:
            if p.fut is not None:
                return await asyncio.wrap_future(p.fut)
            if not p.event.query():
                await asyncio.get_running_loop().run_in_executor(self.pool, p.event.synchronize)
            return p.ids.tolist()
        except _DEVICE_ERRORS as e:
            raise StepFault(f"{type(e).__name__}: {e}") from e

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

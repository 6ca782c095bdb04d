"""Rank 0's executor under tensor parallelism (TPExecutor)."""

import asyncio
import logging
import multiprocessing.connection
import threading
from typing import Any

from aengine.distributed import set_tp
from aengine.runtime.executor import Executor, Pending
from aengine.runtime.step import StepInput
from aengine.tp.rank import Rank, RankDied, end_groups

log = logging.getLogger("aengine")


def stop_procs(procs: list[Any], kill: bool = False, timeout: float = 10.0) -> None:
    """Join the rank processes (killed first with kill), killing those still alive after timeout."""
    for p in procs if kill else ():
        p.kill()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


class TPExecutor(Executor):
    """Rank 0's executor: each step goes to the other ranks first. A thread watches the local rank processes: a
    death fails the step in flight even where NCCL would wait forever: the scheduler's fault path runs, no hang."""

    def __init__(self, rank: Rank, procs: list[Any]) -> None:
        super().__init__(rank.runner)
        self.rank, self.procs = rank, procs
        self.error: str | None = None
        self.faulted = self.closing = False
        self._dead: asyncio.Future | None = None  # on the scheduler's loop, made by the first wait
        self._lock = threading.Lock()
        if procs:
            threading.Thread(target=self._watch, daemon=True, name="aengine-tp-watch").start()

    def _watch(self) -> None:
        dead = multiprocessing.connection.wait([p.sentinel for p in self.procs])
        if self.closing:
            return
        p = next(p for p in self.procs if p.sentinel in dead)
        p.join(1.0)
        with self._lock:
            self.error = f"tensor-parallel rank process {p.name} (pid {p.pid}) exited with code {p.exitcode}"
            fut = self._dead
        log.error("%s", self.error)
        if fut is not None:
            fut.get_loop().call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    def before_step(self, inp: StepInput) -> None:
        self.rank.send(inp)

    def launch(self, inp: StepInput, masked: bool = False) -> Pending:
        if self.error is not None:
            raise RankDied(self.error)
        return super().launch(inp, masked)

    async def result(self, p: Pending) -> list[int]:
        try:
            if (p.fut is not None and p.fut.done()) or (p.event is not None and p.event.query()):
                return await super().result(p)  # done already: skip the race below
            with self._lock:
                if self._dead is None:
                    self._dead = asyncio.get_running_loop().create_future()
                    if self.error is not None:
                        self._dead.set_result(None)
            task = asyncio.ensure_future(super().result(p))
            await asyncio.wait([task, self._dead], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            raise RankDied(self.error)
        except Exception as e:  # a RankDied, or the step raised: a collective saw a dead peer (gloo), or rank 0 failed
            self.faulted = True
            if isinstance(e, RankDied):
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RankDied(self.error or f"the tensor-parallel step failed (rank 0 or a peer): {first}") from e

    def shutdown(self) -> None:
        """Ends every rank: a shutdown message when they are healthy, a kill when one failed."""
        self.closing = True
        faulted = self.faulted or self.error is not None
        self.pool.shutdown(wait=not faulted, cancel_futures=True)
        if not faulted:
            try:
                self.rank.send(None)
            except Exception as e:  # a rank died between the last step and now
                log.warning("TP shutdown: %s", str(e).splitlines()[0] if str(e) else e)
                faulted = True
        stop_procs(self.procs, kill=faulted)
        try:
            end_groups(self.runner, sync=not faulted)
        except Exception as e:
            log.warning("leaving the process groups failed: %s", e)
        set_tp(0, 1, None)  # this process may build a single-rank engine next

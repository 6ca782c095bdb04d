"""Tensor parallelism: spawning rank processes, the process groups, and the rank loop.

The server process is global rank 0: it owns the scheduler and sends every StepInput to the
other ranks over a gloo group before running it. Ranks 1..N-1 run the same forward; all ranks
meet in the model's all-reduce / all-gather over the TP group (NCCL on CUDA, gloo on CPU).
With --nnodes > 1 every node runs `tp / nnodes` ranks; the first process on each node is its
local rank 0 and spawns the rest, and only node 0 serves."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from aengine.config import EngineConfig
from aengine.distributed import set_tp
from aengine.engine.executor import Executor, Pending
from aengine.engine.runner import ModelRunner, resolve_device_dtype
from aengine.engine.step import StepInput

log = logging.getLogger("aengine")

# A collective that waits this long means a rank hangs; a dead rank is noticed at once (gloo
# raises on the closed connection, and rank 0 watches its children).
TP_TIMEOUT = timedelta(minutes=10)
# The metadata group waits for the next step, so an idle server must not time it out.
IDLE_TIMEOUT = timedelta(days=365)
HEADER = 4096  # bytes of the first metadata broadcast; a larger step needs a second one


class RankDied(RuntimeError):
    pass


def check_tp(cfg: EngineConfig, hf_config: Any) -> int:
    """Clear errors before any process starts; returns the ranks per node."""
    tp, nn = cfg.tp, cfg.nnodes
    if tp < 1 or nn < 1 or tp % nn:
        raise ValueError(f"--tp {tp} must be a positive multiple of --nnodes {nn}")
    if not 0 <= cfg.node_rank < nn:
        raise ValueError(f"--node-rank {cfg.node_rank} is outside [0, {nn})")
    if nn > 1 and not cfg.dist_init_addr:
        raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"--tp {tp} does not divide the model's {heads} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(f"--tp {tp} and the model's {kv} KV heads do not divide one another")
    if hf_config.intermediate_size % tp:
        raise ValueError(f"--tp {tp} does not divide the MLP size {hf_config.intermediate_size}")
    local = tp // nn
    device, _ = resolve_device_dtype(cfg.replace(device=cfg.device.split(":")[0]))
    if device.type == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(f"--tp {tp} over {nn} node(s) needs {local} GPUs per node; "
                         f"this node has {torch.cuda.device_count()}")
    return local


def _init_method(cfg: EngineConfig) -> str:
    if cfg.dist_init_addr:
        return f"tcp://{cfg.dist_init_addr}"
    with socket.socket() as s:  # single node: any free loopback port
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _use_loopback(init_method: str) -> None:
    # gloo picks its interface from the host name, which in containers often resolves to an
    # address that is not reachable; on one machine loopback always is.
    host = init_method.removeprefix("tcp://").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "[::1]"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


class Rank:
    """This process's place in the TP world: process groups, and a model runner sharded for it."""

    def __init__(self, cfg: EngineConfig, hf_config: Any, path: Path, rank: int, local_rank: int,
                 init_method: str, procs: list[Any] | tuple = ()) -> None:
        device, _ = resolve_device_dtype(cfg.replace(device=cfg.device.split(":")[0]))
        if device.type == "cuda":  # one GPU per rank of this node: cuda:{local_rank}
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            cfg = cfg.replace(device=str(device))
        _use_loopback(init_method)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _rendezvous(init_method, rank, cfg.tp, procs)
        dist.init_process_group(backend, store=store, rank=rank, world_size=cfg.tp,
                                timeout=TP_TIMEOUT, device_id=device if device.type == "cuda" else None)
        # metadata on its own gloo group: NCCL carries only tensors, and the wait may be long
        self.meta = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        set_tp(rank, cfg.tp, None)
        self.rank = rank
        self.runner = ModelRunner(cfg, hf_config, path)
        # the scheduler sizes requests from rank 0's pool; every rank must hold that many pages
        n = torch.tensor([self.runner.num_pages, self.runner.max_model_len], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.meta)
        self.runner.num_pages, self.runner.max_model_len = int(n[0]), int(n[1])

    def send(self, inp: StepInput | None) -> None:
        """Rank 0: one broadcast for a usual step (length + bytes in a fixed buffer), two for a big one."""
        data = b"" if inp is None else msgspec.msgpack.encode(inp)
        buf = torch.zeros(HEADER, dtype=torch.uint8)
        buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        head = data[: HEADER - 8]
        if head:
            buf[8 : 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.meta)
        if len(data) > HEADER - 8:
            dist.broadcast(torch.frombuffer(bytearray(data[HEADER - 8 :]), dtype=torch.uint8), 0, group=self.meta)

    def recv(self) -> StepInput | None:
        buf = torch.empty(HEADER, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.meta)
        n = int(buf[:8].view(torch.int64)[0])
        if n == 0:
            return None
        data = buf[8 : 8 + n].numpy().tobytes()
        if n > HEADER - 8:
            rest = torch.empty(n - (HEADER - 8), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.meta)
            data += rest.numpy().tobytes()
        return msgspec.msgpack.decode(data, type=StepInput)

    def loop(self) -> None:
        """Ranks > 0: run each step rank 0 sends, until it sends the shutdown message."""
        while (inp := self.recv()) is not None:
            self.runner.step(inp)
        end_groups(self.runner, abort=False)  # the process exits next (_rank_main)


def end_groups(runner: ModelRunner, sync: bool = True, abort: bool = True, wait_s: float = 10.0) -> None:
    """Leave the process groups. gloo's destroy never waits. For NCCL the CUDA graphs go first (an
    abort with graphs alive never returned, on H100s); the abort then runs in a daemon thread that
    is left behind if NCCL blocks anyway. A rank about to exit skips the abort (abort=False):
    process exit releases NCCL without waiting on peers. No sync after a fault: kernels waiting on
    a dead peer would never finish."""
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    if sync:
        torch.cuda.synchronize()
        if runner.graphs is not None:
            runner.graphs.release()
    if not abort:
        return
    t = threading.Thread(target=dist.distributed_c10d._abort_process_group, daemon=True, name="aengine-nccl-end")
    t.start()
    t.join(wait_s)
    if t.is_alive():
        log.warning("NCCL did not tear down its communicators in %.0f s; leaving them to process exit", wait_s)


def _rendezvous(init_method: str, rank: int, world: int, procs: list[Any] | tuple) -> dist.TCPStore:
    """The store every rank joins. Rank 0 waits for all of them while watching the ranks it spawned,
    so one that dies before joining (an import error, a script without a __main__ guard) is an
    error at once instead of a wait for the whole timeout."""
    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    store = dist.TCPStore(host.strip("[]"), int(port), world, is_master=rank == 0, timeout=TP_TIMEOUT,
                          wait_for_workers=False)
    store.set(f"aengine/joined/{rank}", "1")
    if rank == 0:
        keys = [f"aengine/joined/{r}" for r in range(world)]
        deadline = time.monotonic() + TP_TIMEOUT.total_seconds()
        while not store.check(keys):
            if dead := [p for p in procs if not p.is_alive()]:
                raise RankDied(f"tensor-parallel rank process {dead[0].name} exited with code {dead[0].exitcode} "
                               "before joining (its error is in the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not all join within {TP_TIMEOUT}")
            time.sleep(0.1)
    return store


def _watch_parent() -> None:
    """A spawned rank dies with its parent, even when a collective would hang (NCCL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="aengine-parent-watch").start()


def _rank_main(cfg: EngineConfig, hf_config: Any, path: Path, rank: int, local_rank: int,
               init_method: str) -> None:
    """Entry point of a spawned rank."""
    # Ctrl-C reaches the whole process group; rank 0 drains on it and then stops the ranks itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent()
    if torch.cuda.device_count() == 0:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (cfg.tp // cfg.nnodes)))
    try:
        Rank(cfg, hf_config, path, rank, local_rank, init_method).loop()
    except Exception as e:  # a peer died or rank 0 went away: exit, never linger
        log.error("TP rank %d: %s", rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        os._exit(1)
    os._exit(0)  # no interpreter teardown: NCCL's destructors could wait on peers


def _spawn(cfg: EngineConfig, hf_config: Any, path: Path, local: int, init_method: str) -> list[Any]:
    ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and with the loop's threads
    procs = []
    for lr in range(1, local):
        rank = cfg.node_rank * local + lr
        p = ctx.Process(target=_rank_main, args=(cfg, hf_config, path, rank, lr, init_method),
                        name=f"aengine-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _stop(procs: list[Any], timeout: float = 10.0) -> None:
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


class TPExecutor(Executor):
    """Rank 0's executor: each step goes to the other ranks first. A thread watches the local rank
    processes, and the death of one fails the step in flight even where its collective would wait
    forever (NCCL), so the scheduler's fault path runs instead of a hang."""

    def __init__(self, rank: Rank, procs: list[Any]) -> None:
        super().__init__(rank.runner, broadcast=rank.send)
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

    def launch(self, inp: StepInput) -> Pending:
        if self.error is not None:
            raise RankDied(self.error)
        return super().launch(inp)

    async def result(self, p: Pending) -> list[int]:
        try:
            return await self._result(p)
        except RankDied:
            self.faulted = True
            raise
        except Exception as e:  # the step raised: a collective saw a dead peer (gloo), or rank 0 itself failed
            self.faulted = True
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RankDied(self.error or f"the tensor-parallel step failed (rank 0 or a peer): {first}") from e

    async def _result(self, p: Pending) -> list[int]:
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
        if faulted:
            for p in self.procs:
                p.kill()
        _stop(self.procs)
        try:
            end_groups(self.runner, sync=not faulted)
        except Exception as e:
            log.warning("leaving the process groups failed: %s", e)
        set_tp(0, 1, None)  # this process may build a single-rank engine next


def start_tp(cfg: EngineConfig, hf_config: Any, path: Path) -> tuple[ModelRunner, Executor]:
    """Rank 0 (node 0's server process): spawn this node's other ranks, join the process
    group, and build the rank-0 runner. Other nodes run `run_worker_node`."""
    if cfg.node_rank != 0:
        raise ValueError("only node 0 serves; run the other nodes with run_worker_node")
    local = check_tp(cfg, hf_config)
    init_method = _init_method(cfg)
    _use_loopback(init_method)  # before spawning: children inherit the environment
    procs = _spawn(cfg, hf_config, path, local, init_method)
    try:
        rank = Rank(cfg, hf_config, path, 0, 0, init_method, procs)
    except BaseException:
        for p in procs:
            p.kill()
        _stop(procs)
        set_tp(0, 1, None)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return rank.runner, TPExecutor(rank, procs)


def run_worker_node(cfg: EngineConfig) -> int:
    """Nodes 1..nnodes-1: run this node's ranks until node 0 shuts down; returns an exit code."""
    from aengine.engine.async_engine import load_hf_config
    from aengine.weights import resolve_model

    path = resolve_model(cfg.model)
    hf_config = load_hf_config(path)
    local = check_tp(cfg, hf_config)
    init_method = _init_method(cfg)
    _use_loopback(init_method)
    procs = _spawn(cfg, hf_config, path, local, init_method)
    code = 0
    try:
        Rank(cfg, hf_config, path, cfg.node_rank * local, 0, init_method).loop()
    except Exception as e:
        log.error("TP rank %d: %s", cfg.node_rank * local, str(e).splitlines()[0] if str(e) else e)
        code = 1
        for p in procs:
            p.kill()
    _stop(procs)
    return 1 if code or any(p.exitcode for p in procs) else 0

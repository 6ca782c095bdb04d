"""One tensor-parallel rank: rendezvous, groups, a step's wire format, ranks > 0's loop, leaving NCCL (docs/tp.md)."""

import logging
import os
import signal
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
from aengine.runtime.executor import StepFault
from aengine.runtime.runner import ModelRunner, resolve_device_dtype
from aengine.runtime.step import StepInput

log = logging.getLogger("aengine")

# A collective this slow means a rank hangs; a dead rank is noticed at once (gloo raises, rank 0 watches its children)
TP_TIMEOUT = timedelta(minutes=10)
# The metadata group waits for the next step, so an idle server must not time it out.
IDLE_TIMEOUT = timedelta(days=365)
HEADER = 4096  # bytes of the first metadata broadcast; a larger step needs a second one


class RankDied(StepFault):
    """A tensor-parallel rank process exited, or a step's collective saw a peer go away."""


def use_loopback(init_method: str) -> None:
    # gloo picks its interface by the host name, often unreachable in containers; on one machine loopback always works
    if init_method.removeprefix("tcp://").rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
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
        use_loopback(init_method)
        store = _rendezvous(init_method, rank, cfg.tp, procs)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=cfg.tp,
                                timeout=TP_TIMEOUT, device_id=device if device.type == "cuda" else None)
        # metadata on its own gloo group: NCCL carries only tensors, and the wait may be long
        self.meta = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        set_tp(rank, cfg.tp, None)
        self.runner = ModelRunner(cfg, hf_config, path, agree=self._fewest_pages)

    def _fewest_pages(self, n: int) -> int:
        """The scheduler sizes requests from one pool: every rank holds the smallest one's pages."""
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.meta)
        return int(t[0])

    def send(self, inp: StepInput | None) -> None:
        """Rank 0: one broadcast for a usual step (length + bytes in a fixed buffer), two for a big one."""
        data = b"" if inp is None else msgspec.msgpack.encode(inp)
        framed = bytearray(len(data).to_bytes(8, "little") + data).ljust(HEADER, b"\0")
        buf = torch.frombuffer(framed, dtype=torch.uint8)
        dist.broadcast(buf[:HEADER], 0, group=self.meta)
        if len(data) > HEADER - 8:
            dist.broadcast(buf[HEADER:], 0, group=self.meta)

    def recv(self) -> StepInput | None:
        buf = torch.empty(HEADER, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.meta)
        n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
        data = buf[8 : 8 + n].numpy().tobytes()
        if n > HEADER - 8:
            rest = torch.empty(n - (HEADER - 8), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.meta)
            data += rest.numpy().tobytes()
        return msgspec.msgpack.decode(data, type=StepInput) if n else None

    def loop(self) -> None:
        """Ranks > 0: run each step rank 0 sends, until it sends the shutdown message."""
        while (inp := self.recv()) is not None:
            self.runner.step(inp)
        end_groups(self.runner, abort=False)  # the process exits next (_rank_main)


def end_groups(runner: ModelRunner, sync: bool = True, abort: bool = True, wait_s: float = 10.0) -> None:
    """Leave the process groups (gloo's destroy never waits). NCCL: CUDA graphs first, then an abort in
    a daemon thread; none when about to exit (abort=False), no sync after a fault (sync=False): docs/tp.md."""
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
    """The store every rank joins. Rank 0 waits for all while watching the ranks it spawned: one that dies
    before joining (an import error, no __main__ guard) is an error at once, not a wait for the timeout."""
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


def rank_main(cfg: EngineConfig, hf_config: Any, path: Path, rank: int, local_rank: int, init_method: str) -> None:
    """Entry point of a spawned rank."""
    # Ctrl-C reaches the whole process group; rank 0 drains on it and then stops the ranks itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:  # a spawned rank dies with its parent, even when a collective would hang (NCCL)
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="aengine-parent-watch").start()
    if torch.cuda.device_count() == 0:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (cfg.tp // cfg.nnodes)))
    try:
        Rank(cfg, hf_config, path, rank, local_rank, init_method).loop()
    except Exception as e:  # a peer died or rank 0 went away: exit, never linger
        log.error("TP rank %d: %s", rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        os._exit(1)
    os._exit(0)  # no interpreter teardown: NCCL's destructors could wait on peers



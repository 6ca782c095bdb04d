"""W5, engine overhead: the CPU a decode step costs outside the model forward, on any machine.

The real AsyncEngine, Scheduler, radix cache, page allocator and Detokenizer (with the embedded
model's tokenizer) run as in production; only the model runner is replaced by a stub whose step
returns random token ids (never EOS) at once, or after --stub-ms of idle waiting. The figure is the
loop thread's CPU time (time.thread_time, so the stub's wait is not counted) between consecutive
decode launches at a steady batch size: schedule + page allocation + build the step + process the
previous step's ids (append, stop checks, detokenize, emit). docs/benchmarks.md's target: <= 2 ms at batch 256.

Separately, the cost of one WebSocket delta frame: the server's real Session (emit -> msgspec
encode -> outbox -> writer task -> aiohttp framing -> socket write) on a loopback connection,
read by a client on another thread, so only the server thread's CPU is counted. Target: <= 10 us.

  python benchmarks/overhead.py                       # batch 1 8 32 64 128 256
  python benchmarks/overhead.py --batch-sizes 1,256 --steps 200 --json out.jsonl
  python benchmarks/overhead.py --profile prof.txt    # cProfile of the batch-256 run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from aengine.config import EngineConfig  # noqa: E402
from aengine.engine import AsyncEngine  # noqa: E402
from aengine.runtime.step import StepInput  # noqa: E402
from aengine.types import RequestDelta, SamplingParams  # noqa: E402
from benchmarks.common import emit_json, machine  # noqa: E402


class StubExecutor:
    """Stands in for Executor: same launch/result/shutdown interface, no model. Records, per launch,
    (decode?, batch size, wall time, loop-thread CPU time)."""

    def __init__(self, runner: object, step_ms: float) -> None:
        self.runner = runner
        self.pool = np.zeros(0, dtype=np.int64)  # token ids to "sample", set once the tokenizer is known
        self.pos = 0
        self.step_s = step_ms / 1e3
        self.log: list[tuple[bool, int, float, float]] = []

    def launch(self, inp: StepInput, masked: bool = False) -> tuple[list[int], float]:
        now = time.perf_counter()
        self.log.append((inp.decode, len(inp.slots), now, time.thread_time()))
        n = len(inp.sample_rows)
        if self.pos + n > len(self.pool):
            self.pos = 0
        ids = self.pool[self.pos : self.pos + n].tolist()  # the real executor also ends in .tolist()
        self.pos += n
        return ids, now + self.step_s

    async def result(self, p: tuple[list[int], float]) -> list[int]:
        ids, ready = p
        wait = ready - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        return ids

    def shutdown(self) -> None:
        pass


class StubEngine(AsyncEngine):
    """The real AsyncEngine (config, tokenizer, validation, Req and Detokenizer per request, the
    scheduler coroutine) with the model runner replaced: nothing is loaded or computed."""

    def __init__(self, cfg: EngineConfig, num_pages: int, step_ms: float, seed: int = 0) -> None:
        page_size = cfg.page_size or 1  # 1: the torch and flashinfer backends' page, the GPU default
        max_pos = 8192  # the embedded model's context; a --model's own is read below
        runner = SimpleNamespace(page_size=page_size, num_pages=num_pages,
                                 max_model_len=min(max_pos, (num_pages - 1) * page_size))
        super().__init__(cfg, executor=StubExecutor(runner, step_ms))
        runner.max_model_len = min(self.hf_config.max_position_embeddings, (num_pages - 1) * page_size)
        self.max_model_len = runner.max_model_len
        # Ordinary text tokens: random ids below the tokenizer's special tokens, EOS excluded, so
        # the detokenizer does real work and no request stops early.
        vocab = min(self.hf_config.vocab_size, len(self.tokenizer.hf))
        special = set(self.tokenizer.hf.all_special_ids) | self.tokenizer.eos_ids
        pool = np.random.default_rng(seed).integers(0, vocab, size=1 << 16)
        self.executor.pool = pool[~np.isin(pool, list(special))]


def steady_steps(log: list[tuple[bool, int, float, float]], bs: int, skip: int) -> tuple[list[float], list[float]]:
    """CPU and wall seconds between consecutive decode launches at batch bs (each interval is one
    turn of the scheduler loop), less the first `skip` (warm-up)."""
    cpu, wall = [], []
    prev = None
    for decode, n, w, c in log:
        if decode and n == bs:
            if prev is not None:
                cpu.append(c - prev[1])
                wall.append(w - prev[0])
            prev = (w, c)
        else:
            prev = None
    return cpu[skip:], wall[skip:]


async def run_batch(engine: AsyncEngine, bs: int, prompt_len: int, steps: int, rng: np.random.Generator) -> None:
    done = asyncio.Event()
    left = [bs]

    # What a front end must at least do per token: look at it. Nothing is kept, as in the server
    # (kept deltas would grow the heap and bill the garbage collector to the scheduler). The
    # server's per-frame cost is measured on its own (frame_cost), as docs/benchmarks.md budgets it apart.
    def emit(d: RequestDelta) -> None:
        seen[0] += len(d.token_ids)
        if d.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    seen = [0]
    vocab = engine.hf_config.vocab_size
    for i in range(bs):
        ids = rng.integers(0, min(vocab, 10000), size=prompt_len).tolist()
        engine.submit(f"b{bs}-{i}", ids, SamplingParams(max_tokens=steps, temperature=0.6, ignore_eos=True), emit)
    await done.wait()


async def run_intake(engine: AsyncEngine, groups: int, prefix_len: int, question_len: int) -> dict:
    """W3's shape: `groups` shared prefixes, 8 requests each with its own question, all submitted at
    once; the loop thread's CPU from submitting them to their last token (radix matching, admission,
    step building: what a big shared-prefix burst costs before the GPU can even start)."""
    rng = np.random.default_rng(1)
    prompts = [p + rng.integers(0, 10000, size=question_len).tolist()
               for p in (rng.integers(0, 10000, size=prefix_len).tolist() for _ in range(groups)) for _ in range(8)]
    done, left = asyncio.Event(), [len(prompts)]

    def emit(d: RequestDelta) -> None:
        if d.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    c0, w0 = time.thread_time(), time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(f"w3-{i}", ids, SamplingParams(max_tokens=2, temperature=0.6, ignore_eos=True), emit)
    await done.wait()
    return {"requests": len(prompts), "prompt_tokens": prefix_len + question_len,
            "cpu_ms": (time.thread_time() - c0) * 1e3, "wall_ms": (time.perf_counter() - w0) * 1e3}


def measure(args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    max_bs = max(args.batch_sizes)
    tokens = max(max_bs * (args.prompt_len + args.steps + 2), args.intake_groups * 8 * 2200)
    cfg = EngineConfig(model=args.model, load_format="dummy" if args.model else "auto", tokenizer=args.tokenizer,
                       page_size=args.page_size, max_running_requests=max_bs, cache=args.cache,
                       disable_overlap=args.disable_overlap, device="cpu")
    engine = StubEngine(cfg, num_pages=tokens // (args.page_size or 1) + 2, step_ms=args.stub_ms)
    ex: StubExecutor = engine.executor  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    loop = new_loop()
    rows = []
    try:
        loop.run_until_complete(engine.start())
        for bs in args.batch_sizes:
            ex.log.clear()
            prof = None
            if args.profile and bs == max_bs:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            t0 = time.perf_counter()
            loop.run_until_complete(run_batch(engine, bs, args.prompt_len, args.steps, rng))
            elapsed = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
                write_profile(prof, args.profile)
            cpu, wall = steady_steps(ex.log, bs, skip=min(args.warmup, args.steps // 4))
            if not cpu:
                raise RuntimeError(f"no steady decode steps at batch {bs}; raise --steps")
            med = statistics.median(cpu)
            rows.append({"batch": bs, "steps": len(cpu), "cpu_ms_per_step": med * 1e3,
                         "cpu_ms_per_step_mean": statistics.fmean(cpu) * 1e3,
                         "cpu_ms_per_step_p90": sorted(cpu)[int(0.9 * (len(cpu) - 1))] * 1e3,
                         "wall_ms_per_step": statistics.median(wall) * 1e3,
                         "cpu_us_per_token": med / bs * 1e6, "run_s": elapsed})
            engine.clear_cache()  # each batch size starts from the same empty cache
        intake = None
        if args.intake_groups:
            intake = loop.run_until_complete(run_intake(engine, args.intake_groups, 2048, 64))
        loop.run_until_complete(engine.shutdown())
    finally:
        loop.close()
    return rows, intake


def write_profile(prof: object, dest: str) -> None:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)  # type: ignore[arg-type]
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(25)
    Path(dest).write_text(buf.getvalue())


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# ---- WebSocket delta frames ----------------------------------------------------------------------

def frame_cost(frames: int, streams: int) -> dict:
    """Server-thread CPU per delta frame through the real Session, `streams` deltas per step on one
    connection (1: a lone stream, one writer wake-up per frame; more: one wake-up per batch)."""
    from aiohttp import web
    from websockets.sync.client import connect

    from aengine.config import ServerConfig
    from aengine.serve.metrics import Metrics
    from aengine.serve.session import Session, Stream

    steps = max(1, frames // streams)
    total = steps * streams
    out: dict = {}
    ready = threading.Event()
    port_box: list[int] = []

    def client() -> None:
        ready.wait()
        with connect(f"ws://127.0.0.1:{port_box[0]}", compression=None, max_size=None) as ws:
            for _ in range(total):
                ws.recv()

    async def main() -> None:
        finished = asyncio.Event()

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False, writer_limit=8 * 1024 * 1024)
            await ws.prepare(request)
            # the real Session with just enough of a Server behind it: config and metrics
            server = SimpleNamespace(engine=None, metrics=Metrics(), cfg=ServerConfig())
            sess = Session(server, ws, request.transport, 0)  # type: ignore[arg-type]
            try:
                sts = [Stream(f"r{i}", f"0:r{i}", True, time.monotonic()) for i in range(streams)]
                c0, w0 = time.thread_time(), time.perf_counter()
                for s in range(steps):
                    for st in sts:
                        sess._emit(st, RequestDelta([1000 + s % 5000], " token"))
                    await asyncio.sleep(0)  # the scheduler yields between steps; the writer runs then
                await sess.flush(60.0)
                out["cpu_s"], out["wall_s"] = time.thread_time() - c0, time.perf_counter() - w0
                async for _ in ws:  # until the client closes
                    pass
            except BaseException as e:
                out["error"] = e
                raise
            finally:
                sess.close()
                finished.set()
            return ws

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port_box.append(runner.addresses[0][1])
        t = threading.Thread(target=client, daemon=True)
        t.start()
        ready.set()
        await finished.wait()
        if "error" not in out:
            await asyncio.get_running_loop().run_in_executor(None, t.join)
        await runner.cleanup()

    new_loop().run_until_complete(main())
    if "error" in out:
        raise RuntimeError("the frame benchmark failed") from out["error"]
    # msgspec encoding alone, for scale
    from aengine.serve.protocol import Delta, encode

    d = Delta("r1", " token", [1234])
    n = 20000
    c0 = time.thread_time()
    for _ in range(n):
        encode(d)
    enc = (time.thread_time() - c0) / n
    return {"streams_per_connection": streams, "frames": total, "cpu_us_per_frame": out["cpu_s"] / total * 1e6,
            "wall_us_per_frame": out["wall_s"] / total * 1e6, "encode_us_per_frame": enc * 1e6}


def build_step_cost(batch: int, calls: int = 200) -> float:
    """Microseconds of scheduler/batch.build_step alone for `batch` decode rows (best of 5 x calls): the
    part of the loop's step CPU that grows with the batch on every step, without the loop's noise."""
    from aengine.scheduler.batch import build_step
    from aengine.scheduler.request import Req
    from aengine.types import EngineStats

    reqs = [Req(str(i), list(range(100)), SamplingParams(temperature=0.6, max_tokens=2000), None, None, 2000)
            for i in range(batch)]
    for r in reqs:
        r.fill_ids, r.kv_len, r.pages, r.synced_pages, r.slot = list(r.prompt_ids), 100, list(range(2000)), 2000, 1
    best, stats = float("inf"), EngineStats()
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            build_step([(r, 1) for r in reqs], True, 0, stats, {2})
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="config dir for the shapes (default: the embedded model)")
    ap.add_argument("--tokenizer", default=None, help="default: the model's, else the embedded one")
    ap.add_argument("--batch-sizes", default="1,8,32,64,128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=128, help="decode steps per batch size (all requests alike)")
    ap.add_argument("--warmup", type=int, default=8, help="steady steps dropped at the start of each batch")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--stub-ms", type=float, default=0.0, help="idle time of each stub step (not counted)")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--cache", default="radix", choices=["radix", "none"])
    ap.add_argument("--disable-overlap", action="store_true")
    ap.add_argument("--frames", type=int, default=20000, help="delta frames per WebSocket figure (0: skip)")
    ap.add_argument("--frame-streams", default="1,64", type=lambda s: [int(x) for x in s.split(",")],
                    help="streams per connection for the frame figures")
    ap.add_argument("--intake-groups", type=int, default=8,
                    help="W3-shaped burst: groups of 8 requests sharing a 2,048-token prefix (0: skip)")
    ap.add_argument("--profile", default=None, help="write a cProfile report of the largest batch here")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write the figures as JSON (stdout: no path)")
    args = ap.parse_args(argv)

    rows, intake = measure(args)
    print(f"{'batch':>5} {'CPU ms/step':>12} {'mean':>8} {'p90':>8} {'us/token':>9}   (target <= 2 ms at 256)")
    for r in rows:
        print(f"{r['batch']:>5} {r['cpu_ms_per_step']:>12.3f} {r['cpu_ms_per_step_mean']:>8.3f} "
              f"{r['cpu_ms_per_step_p90']:>8.3f} {r['cpu_us_per_token']:>9.2f}")
    build_us = build_step_cost(max(args.batch_sizes))
    print(f"build_step alone, {max(args.batch_sizes)} decode rows: {build_us:.0f} us (best of 5 x 200 calls)")
    frames = [frame_cost(args.frames, s) for s in args.frame_streams] if args.frames else []
    for f in frames:
        print(f"delta frame, {f['streams_per_connection']} stream(s)/connection: {f['cpu_us_per_frame']:.2f} us CPU "
              f"(encode alone {f['encode_us_per_frame']:.2f} us; target <= 10 us)")
    if intake:
        print(f"W3-shaped burst, {intake['requests']} requests of {intake['prompt_tokens']} tokens: "
              f"{intake['cpu_ms']:.1f} ms loop CPU to the last token")
    res = {"workload": "w5", "w3_intake": intake,
           "cache": args.cache, "overlap": not args.disable_overlap, "page_size": args.page_size,
           "stub_ms": args.stub_ms, "prompt_len": args.prompt_len, "steps": args.steps,
           "steps_table": rows, "frames": frames, "build_step_us": build_us, **machine()}
    emit_json(res, args.json)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

"""Online load over real WebSocket connections (W3, W4): an async load generator built on the client
library (clients/client.py), streaming every request.

Arrivals: Poisson at --request-rate (requests/s; several comma-separated rates make several runs;
"inf" sends everything at once), optionally capped at --concurrency requests in flight.
Workloads:
  random        W1-like: prompts of random ids as input_ids, random max_tokens, ignore_eos (docs/benchmarks.md)
  shared-prefix W3: --groups groups, each a --prefix-len-token shared prefix + distinct --question-len
                question, --output-len tokens each
  chat          multi-turn chat: each conversation runs --turns turns as `messages`, each turn resending
                the whole history (the previous answers included)
Reports request and token throughput, TTFT, inter-token latency (ITL), time per output token (TPOT)
and end-to-end latency at p50/p90/p99, and errors by code.

--api openai drives OpenAI's HTTP API instead (aengine's /v1, or vLLM's, SGLang's, any other's:
the same client and workload for each): the chat workload POSTs /v1/chat/completions, the others
/v1/completions with token-id prompts (the only way to fix a prompt's length in tokens), streamed,
with include_usage; ignore_eos is the vLLM/SGLang extension. ITL is then between SSE chunks.

  python benchmarks/load.py --url ws://127.0.0.1:8765 --request-rate 4,8,16,inf --plot load.png
  python benchmarks/load.py --spawn "--model benchmarks/configs/qwen3-0.6b --load-format dummy" \
      --concurrency 64 --json out.jsonl
  python benchmarks/load.py --spawn "" --workload chat --num-prompts 4 --turns 3   # embedded model
  python benchmarks/load.py --api openai --url http://127.0.0.1:8000 --workload chat   # e.g. vLLM
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import random
import shlex
import sys
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from benchmarks.common import emit_json, machine, pair, percentiles, spawn_server, w1_requests  # noqa: E402
from clients.client import Client, ServerError  # noqa: E402

WORDS = ("the a of to and in is it that for on with as was at by be this from or an are not have one all "
         "river mountain engine cache token stream latency page prefix batch model kernel socket answer "
         "question history system user assistant green quick slow bright quiet ancient modern").split()


@dataclass
class Job:
    """One conversation: a single request, or (chat) several turns sent one after another."""

    input_ids: list[list[int]] | None = None  # per turn (random, shared-prefix)
    user_turns: list[str] | None = None  # chat
    max_tokens: list[int] = field(default_factory=list)  # per turn


@dataclass
class Record:
    """What the client saw of one request."""

    t_send: float
    t_first: float = 0.0
    t_done: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between consecutive token-carrying deltas
    gap_ends: list[float] = field(default_factory=list)  # when each gap ended
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


# ---- workloads ---------------------------------------------------------------------------------

def salted(jobs: list[Job], k: int) -> list[Job]:
    """The jobs of the k-th run (several rates): the first token of every prompt (chat: the first
    user turn) changes with k, so a run finds nothing in the radix cache from the runs before it,
    while prompts that share a prefix within the run still share it."""
    if k == 0:
        return jobs
    out = []
    for j in jobs:
        if j.input_ids is not None:
            ids = [[(p[0] + 7919 * k) % 10000, *p[1:]] for p in j.input_ids]
            out.append(Job(input_ids=ids, max_tokens=j.max_tokens))
        else:
            assert j.user_turns is not None
            out.append(Job(user_turns=[f"(run {k}) {j.user_turns[0]}", *j.user_turns[1:]], max_tokens=j.max_tokens))
    return out


def make_jobs(args: argparse.Namespace) -> list[Job]:
    rng = random.Random(args.seed)
    if args.workload == "random":
        prompts, max_tokens = w1_requests(args.num_prompts, args.input_len, args.output_len, args.seed)
        return [Job(input_ids=[p], max_tokens=[m]) for p, m in zip(prompts, max_tokens)]
    if args.workload == "shared-prefix":
        jobs = []
        per_group = max(1, args.num_prompts // args.groups)
        for _ in range(args.groups):
            prefix = [rng.randint(0, 10000) for _ in range(args.prefix_len)]
            for _ in range(per_group):
                q = [rng.randint(0, 10000) for _ in range(args.question_len)]
                jobs.append(Job(input_ids=[prefix + q], max_tokens=[args.output_len[1]]))
        rng.shuffle(jobs)  # groups interleave, as independent users would
        return jobs
    jobs = []
    for _ in range(args.num_prompts):
        turns = [" ".join(rng.choices(WORDS, k=rng.randint(*args.input_len))) for _ in range(args.turns)]
        jobs.append(Job(user_turns=turns, max_tokens=[rng.randint(*args.output_len) for _ in range(args.turns)]))
    return jobs


# ---- running -----------------------------------------------------------------------------------

class OpenAIClient:
    """clients.client.Client's interface (generate yields delta and done dicts) over OpenAI's
    streamed HTTP API, so that the rest of this file drives either protocol unchanged."""

    def __init__(self, base: str, api_key: str | None, model: str | None) -> None:
        import aiohttp

        self.base, self.model = base, model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                          connector=aiohttp.TCPConnector(limit=0))

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, model: str | None = None) -> OpenAIClient:
        base = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).split("?")[0].rstrip("/")
        c = cls(base.removesuffix("/v1"), api_key, model)
        if c.model is None:  # the server's one model
            async with c.http.get(f"{c.base}/v1/models") as r:
                c.model = (await r.json())["data"][0]["id"]
        return c

    async def generate(self, *, messages: list[dict[str, str]] | None = None, input_ids: list[int] | None = None,
                       **sampling: Any) -> Any:
        path, body = ("chat/completions", {"messages": messages}) if messages is not None else \
            ("completions", {"prompt": input_ids})
        body |= {"model": self.model, "stream": True, "stream_options": {"include_usage": True}, **sampling}
        usage: dict[str, Any] = {}
        finish = None
        async with self.http.post(f"{self.base}/v1/{path}", json=body) as r:
            if r.status != 200:
                err = (await r.json(content_type=None) or {}).get("error", {})
                raise ServerError(str(err.get("code") or r.status), err.get("message", ""))
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                m = json.loads(line[6:])
                if "error" in m:
                    raise ServerError(str(m["error"].get("code")), m["error"].get("message", ""))
                usage = m.get("usage") or usage
                for ch in m.get("choices", []):
                    text = ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                    if text:  # a chunk stands for one token here; usage has the true count
                        yield {"type": "delta", "text": text, "token_ids": [0]}
                    finish = ch.get("finish_reason") or finish
        yield {"type": "done", "finish_reason": finish, "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}}

    async def complete(self, **kw: Any) -> None:
        async for _ in self.generate(**kw):
            pass

    async def close(self) -> None:
        await self.http.close()


async def one_request(c: Client, records: list[Record], sampling: dict[str, Any], **prompt: Any) -> str:
    """Send one streamed request, record its timings; returns the generated text."""
    rec = Record(time.perf_counter())
    records.append(rec)
    text: list[str] = []
    last = 0.0
    try:
        async for m in c.generate(**prompt, **sampling):
            now = time.perf_counter()
            if m["type"] == "delta":
                text.append(m["text"])
                if m["token_ids"]:
                    rec.output_tokens += len(m["token_ids"])
                    if rec.t_first:
                        rec.gaps.append(now - last)
                        rec.gap_ends.append(now)
                    else:
                        rec.t_first = now
                    last = now
            else:  # done
                rec.t_done = now
                usage = m.get("usage", {})
                rec.prompt_tokens = usage.get("prompt_tokens", 0)
                rec.cached_tokens = usage.get("cached_tokens", 0)
                rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
                if m["finish_reason"] == "cancelled":
                    rec.error = "cancelled"
    except ServerError as e:
        rec.error = e.code
    except (ConnectionError, OSError):
        rec.error = "connection"
    if rec.error:
        rec.t_done = time.perf_counter()
    return "".join(text)


async def run_job(job: Job, c: Client, records: list[Record], args: argparse.Namespace) -> None:
    sampling: dict[str, Any] = {"temperature": args.temperature, "ignore_eos": not args.no_ignore_eos}
    if job.input_ids is not None:
        for ids, m in zip(job.input_ids, job.max_tokens):
            await one_request(c, records, {**sampling, "max_tokens": m}, input_ids=ids)
        return
    history: list[dict[str, str]] = []
    assert job.user_turns is not None
    for turn, m in zip(job.user_turns, job.max_tokens):
        history.append({"role": "user", "content": turn})
        n_before = len(records)
        answer = await one_request(c, records, {**sampling, "max_tokens": m}, messages=list(history))
        if records[n_before].error:
            return  # the conversation cannot go on without its answer
        history.append({"role": "assistant", "content": answer})


async def connect(url: str, n: int, args: argparse.Namespace) -> list[Any]:
    if args.api == "openai":  # one HTTP connection pool; --connections does not apply
        return [await OpenAIClient.connect(url, args.api_key, args.model)]
    return [await Client.connect(url, api_key=args.api_key) for _ in range(n)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times of n jobs, seconds after the start: Poisson at rate (all at 0 for inf)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += 0.0 if rate == math.inf else rng.expovariate(rate)
    return out


async def send_all(clients: list[Any], jobs: list[Job], at: list[float], t0: float, records: list[Record],
                   args: argparse.Namespace) -> None:
    """Start each job at t0 + its send time, on the clients in turn; return when all are done."""
    sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    conn, tasks = itertools.cycle(clients), []

    async def guarded(job: Job, c: Any) -> None:
        if sem is None:
            await run_job(job, c, records, args)
            return
        async with sem:
            await run_job(job, c, records, args)

    for job, t in zip(jobs, at):
        if (wait := t0 + t - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(guarded(job, next(conn))))
    if args.progress:
        await progress(tasks, len(jobs))
    await asyncio.gather(*tasks)


def worker(url: str, jobs: list[Job], at: list[float], n_conn: int, args: argparse.Namespace, barrier: Any,
           out: Any) -> None:
    """One client process of --procs: its own connections and event loop. All start sending when every one
    has connected (the barrier); perf_counter is CLOCK_MONOTONIC, one clock for every process."""
    async def go() -> list[Record]:
        clients, records = await connect(url, n_conn, args), []
        try:
            barrier.wait()
            await send_all(clients, jobs, at, time.perf_counter(), records, args)
        finally:
            for c in clients:
                await c.close()
        return records
    out.put([vars(r) for r in _runner()(go())])  # plain dicts: the class lives in __mp_main__ over there


async def run_rate(url: str, jobs: list[Job], rate: float, args: argparse.Namespace) -> dict:
    clients = await connect(url, args.connections if args.procs == 1 else 1, args)
    try:
        for _ in range(args.warmup):  # first-use compiles and allocator growth stay out of the timing
            await clients[0].complete(input_ids=[1, 2, 3, 4, 5, 6, 7, 8], max_tokens=4, ignore_eos=True)
        http = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).split("?")[0].rstrip("/")
        http = http.removesuffix("/v1")
        before = scrape(http)
        at = arrivals(len(jobs), rate, args.seed)
        if args.procs == 1:
            records: list[Record] = []
            t0 = time.perf_counter()
            await send_all(clients, jobs, at, t0, records, args)
        else:  # each process takes every procs-th job at its own send time, over its share of the connections
            n, ctx, loop = args.procs, multiprocessing.get_context("spawn"), asyncio.get_running_loop()
            barrier, out = ctx.Barrier(n + 1), ctx.Queue()
            procs = [ctx.Process(target=worker, args=(url, jobs[i::n], at[i::n], max(1, args.connections // n), args,
                                                      barrier, out)) for i in range(n)]
            for p in procs:
                p.start()
            await loop.run_in_executor(None, barrier.wait)
            t0 = time.perf_counter()
            records = [Record(**d) for _ in procs for d in await loop.run_in_executor(None, out.get)]
            for p in procs:
                p.join()
        duration = time.perf_counter() - t0
        after = scrape(http)
    finally:
        for c in clients:
            await c.close()
    return summarize(records, duration, rate, args, before, after)


async def progress(tasks: list[asyncio.Task], total: int) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc="requests", file=sys.stderr) as bar:
        done = 0
        while done < total:
            await asyncio.sleep(0.5)
            n = sum(t.done() for t in tasks)
            bar.update(n - done)
            done = n


def scrape(http: str) -> dict[str, float]:
    """The server's /metrics counters, when it answers (prefill and cache-hit tokens for W3)."""
    try:
        with urllib.request.urlopen(http + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def summarize(records: list[Record], duration: float, rate: float, args: argparse.Namespace,
              before: dict[str, float], after: dict[str, float]) -> dict:
    ok = [r for r in records if r.error is None]
    ms = 1e3
    ttft = [(r.t_first - r.t_send) * ms for r in ok if r.t_first]
    itl = [g * ms for r in ok for g in r.gaps]
    tpot = [(r.t_done - r.t_first) / (r.output_tokens - 1) * ms for r in ok if r.t_first and r.output_tokens > 1]
    e2e = [(r.t_done - r.t_send) * ms for r in ok]
    out_tok = sum(r.output_tokens for r in ok)
    prompt_tok = sum(r.prompt_tokens for r in ok)
    res: dict[str, Any] = {
        "request_rate": "inf" if rate == math.inf else rate, "concurrency": args.concurrency or None,
        "requests": len(records), "completed": len(ok), "errors": dict(Counter(r.error for r in records if r.error)),
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_tok_per_s": out_tok / duration,
        "total_tok_per_s": (out_tok + prompt_tok) / duration, "output_tokens": out_tok, "prompt_tokens": prompt_tok,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "tpot_ms": percentiles(tpot),
        "e2e_ms": percentiles(e2e),
        # raw series for the CDF plot; dropped from the JSON unless --raw
        "_series": {"ttft_ms": ttft, "itl_ms": itl, "e2e_ms": e2e},
    }
    # the ITL tail, located: gaps over 2x the median, and how many ended while some request still
    # waited for its first token (prefill steps of arriving prompts between decode steps)
    if itl:
        line, admitted = 2 * res["itl_ms"]["p50"], max(r.t_first for r in ok)
        tail = [e for r in ok for g, e in zip(r.gaps, r.gap_ends) if g * ms > line]
        res["itl_tail"] = {"over_2x_p50": len(tail), "fraction": len(tail) / len(itl),
                           "before_last_first_token": sum(e <= admitted for e in tail)}
    for key, metric in (("server_prefill_tokens", "aengine_prefill_tokens_total"),
                        ("server_cache_hit_tokens", "aengine_cache_hit_tokens_total"),
                        ("server_preemptions", "aengine_preemptions_total"),
                        ("server_full_gcs", "aengine_gc_full_collection_seconds_count"),
                        ("server_full_gc_s", "aengine_gc_full_collection_seconds_sum")):
        if metric in after and metric in before:
            res[key] = after[metric] - before[metric]
    return res


def fmt(res: dict) -> str:
    p = lambda k: "/".join(f"{res[k][q]:.1f}" for q in ("p50", "p90", "p99"))
    errs = ", ".join(f"{k}={v}" for k, v in res["errors"].items()) or "none"
    lines = [f"rate {res['request_rate']} req/s, concurrency {res['concurrency'] or '-'}: "
             f"{res['completed']}/{res['requests']} requests in {res['duration_s']:.2f} s",
             f"  throughput: {res['request_throughput']:.2f} req/s, {res['output_tok_per_s']:,.0f} output tok/s, "
             f"{res['total_tok_per_s']:,.0f} total tok/s",
             f"  ms p50/p90/p99: TTFT {p('ttft_ms')} | ITL {p('itl_ms')} | TPOT {p('tpot_ms')} | E2E {p('e2e_ms')}",
             f"  errors: {errs}"]
    if "server_prefill_tokens" in res:
        lines.append(f"  server: {res['server_prefill_tokens']:.0f} prefill tokens computed, "
                     f"{res['server_cache_hit_tokens']:.0f} from cache, {res['server_preemptions']:.0f} preemptions"
                     + (f", {res['server_full_gcs']:.0f} full GCs ({res['server_full_gc_s'] * 1e3:.0f} ms)"
                        if "server_full_gcs" in res else ""))
    if "itl_tail" in res:
        t = res["itl_tail"]
        lines.append(f"  ITL tail: {t['over_2x_p50']} gaps over 2x p50 ({t['fraction']:.1%} of all), "
                     f"{t['before_last_first_token']} of them before the last request's first token")
    return "\n".join(lines)


# ---- plot --------------------------------------------------------------------------------------

def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    several = len(runs) > 1
    fig, axes = plt.subplots(2 if several else 1, 3, figsize=(15, 8 if several else 4.2), squeeze=False)
    for ax, key, name in zip(axes[0], ("ttft_ms", "itl_ms", "e2e_ms"),
                             ("time to first token", "inter-token latency", "end-to-end latency")):
        for r in runs:
            xs = sorted(r["_series"][key])
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{r['request_rate']} req/s")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests" if key != "itl_ms" else "fraction of tokens",
               title=f"CDF: {name}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if several:
        finite = [r for r in runs if r["request_rate"] != "inf"]
        xs = [r["request_rate"] for r in finite]
        inf_x = (max(xs) * 1.5) if xs else 1.0  # "inf" is drawn to the right of the largest rate
        xs = [r["request_rate"] if r["request_rate"] != "inf" else inf_x for r in runs]
        a = axes[1]
        a[0].plot(xs, [r["output_tok_per_s"] for r in runs], "o-")
        a[0].set(xlabel="request rate (req/s)", ylabel="output tok/s", title="throughput")
        for key, ax in (("ttft_ms", a[1]), ("itl_ms", a[2])):
            for q in ("p50", "p90", "p99"):
                ax.plot(xs, [r[key][q] for r in runs], "o-", label=q)
            ax.set(xlabel="request rate (req/s)", ylabel="ms", title=key.removesuffix("_ms").upper() + " vs rate")
            ax.legend(fontsize=8)
        for ax in a:
            ax.grid(True, alpha=0.3)
            if any(r["request_rate"] == "inf" for r in runs):
                ax.axvline(inf_x, color="grey", lw=0.5, ls=":")
                ax.annotate("all at once", (inf_x, 0), xycoords=("data", "axes fraction"), fontsize=7,
                            ha="right", va="bottom", rotation=90)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------

def parse_rates(s: str) -> list[float]:
    return [math.inf if x.strip() in ("inf", "") else float(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, ws://host:port")
    where.add_argument("--spawn", metavar="ARGS", help='start `python -m aengine ARGS` for the run ("" = embedded)')
    ap.add_argument("--server-log", default=None, help="with --spawn: keep the server's log here")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--api", default="aengine", choices=["aengine", "openai"],
                    help="aengine: WebSocket protocol v1; openai: OpenAI's HTTP API (/v1/...) of any server")
    ap.add_argument("--model", default=None, help="--api openai: the model name to send (default: the server's)")
    ap.add_argument("--workload", default="random", choices=["random", "shared-prefix", "chat"])
    ap.add_argument("--num-prompts", type=int, default=256, help="requests (chat: conversations)")
    ap.add_argument("--input-len", type=pair, default=(100, 1024),
                    help="random: prompt tokens lo,hi; chat: words per user turn")
    ap.add_argument("--output-len", type=pair, default=(100, 1024), help="max_tokens lo,hi (shared-prefix: hi)")
    ap.add_argument("--groups", type=int, default=8, help="shared-prefix: groups")
    ap.add_argument("--prefix-len", type=int, default=2048, help="shared-prefix: shared tokens per group")
    ap.add_argument("--question-len", type=int, default=64, help="shared-prefix: distinct tokens per request")
    ap.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    ap.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                    help="Poisson arrivals per second, comma-separated for several runs; inf: all at once")
    ap.add_argument("--concurrency", type=int, default=0, help="most requests in flight (0: no cap)")
    ap.add_argument("--connections", type=int, default=8, help="WebSocket connections, requests spread over them")
    ap.add_argument("--procs", type=int, default=1, help="client processes, the connections and jobs split among "
                    "them: one Python process decoding every frame of a saturated server may fall behind it")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="short requests sent before each timed run")
    ap.add_argument("--progress", action="store_true", help="a progress bar on stderr")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write the figures as JSON (stdout: no path)")
    ap.add_argument("--raw", action="store_true", help="keep the per-request series in the JSON")
    ap.add_argument("--plot", default=None, help="write latency CDFs (and, for several rates, curves) to this PNG")
    ap.add_argument("--label", default="", help="a name for this run, kept in the JSON and the plot title")
    args = ap.parse_args(argv)
    if args.workload == "shared-prefix" and args.output_len == (100, 1024):
        args.output_len = (128, 128)  # W3's default
    if args.workload == "shared-prefix" and args.num_prompts == 256:
        args.num_prompts = 64
    if args.workload == "chat" and args.input_len == (100, 1024):
        args.input_len = (8, 64)

    jobs = make_jobs(args)
    runs = []
    with ExitStack() as stack:
        url = args.url
        if args.spawn is not None:
            url = stack.enter_context(spawn_server(shlex.split(args.spawn), log_path=args.server_log)).url
        loop_run = _runner()
        for k, rate in enumerate(args.request_rate):
            res = loop_run(run_rate(url, salted(jobs, k), rate, args))
            print(fmt(res), flush=True)
            runs.append(res)
    info = {"workload": args.workload, "label": args.label, "server": args.spawn if args.spawn is not None else url,
            "num_prompts": args.num_prompts, "connections": args.connections, **machine()}
    if args.plot:
        title = (f"aengine load.py {args.workload} {args.label} — {len(jobs)} jobs, "
                 f"{args.connections} connections; {info['cpu'] if 'card' not in info else info['card']}, "
                 f"{info['date']}, {info['commit']}")
        plot(runs, args.plot, title)
        print(f"plot written to {args.plot}")
    for r in runs:
        series = r.pop("_series")
        if args.raw:
            r["series"] = series
        emit_json({**info, **r}, args.json)
    return runs


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


if __name__ == "__main__":
    main(sys.argv[1:])

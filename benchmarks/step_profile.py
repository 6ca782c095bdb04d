"""Where W1's time goes per step: GPU time by kernel class for steady decode steps and for prefill steps,
host time per step and GPU idle gaps between steps (aengine); a class breakdown for Mini-SGLang.
aengine: llm.engine.executor.launch is wrapped (no engine change); one W1 run records every step, the
profiler covering decode steps K..K+M-1 only (--window K,M; timings leave those out); then a prefill-only
run (W1 prompts, max_tokens=1, cache cleared) runs wholly under the profiler. Mini-SGLang (--engine
minisgl, with run_peer.sh's PYTHONPATH; always W1/4): whole generates are profiled, per-step figures
come from step counts taken from the attention kernels.

  python benchmarks/step_profile.py --model benchmarks/configs/qwen3-0.6b --load-format dummy --quarter
  python benchmarks/step_profile.py --engine minisgl --model /tmp/q06
  # CPU smoke test (no CUDA: no events or gaps; CPU ops by self time instead of kernels)
  python benchmarks/step_profile.py --model benchmarks/configs/tiny-llama --load-format dummy --num-prompts 8 \
      --input-len 8,32 --output-len 8,16 --window 2,4
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import emit_json, machine, pair, percentiles, step_kind, w1_requests  # noqa: E402

# First match wins: specific names first (prof.py's "flash" put flashinfer's norm kernels under
# attention). aten:: op names are matched too, for the CPU smoke test.
CLASSES = [
    ("attention", r"batchdecode|batchprefill|singleprefill|singledecode|mergestate|fmha|flash_fwd|flash::|attention"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|splitkreduce|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("norm", r"rmsnorm|layernorm|norm::|_norm\b"),
    ("rope", r"rope|rotary"),
    ("act", r"silu|gelu|act_and_mul"),
    ("sampling", r"sampl|topk|top_k|softmax|argmax|multinomial|exponential|aten::sort\b|cumsum"),
    ("kv_store", r"index_put|scatter|store|appendpagedkv"),
    ("copy", r"memcpy|memset|copy_|direct_copy|catarraybatchedcopy|aten::(to|_to_copy|clone)\b"),
    ("elementwise", r"(?<!index_)elementwise_kernel|aten::(add|sub|mul|div|where|neg|rsqrt|pow|mean|exp)_?\b"),
]
ORDER = [c for c, _ in CLASSES] + ["lm_head", "other"]
LM_HEAD_NEXT = re.compile(r"sampl|argmax|topk|top_k|exponential|multinomial")  # sampling proper, not softmax
Agg = dict[str, list[Any]]  # class -> [microseconds, kernels, Counter(short name -> microseconds)]


def aggregate(prof: Any) -> Agg:
    """Device kernels (memcpy/memset included) by class; without any, CPU ops by self time (nested aten
    ops counted once). The LM head is a GEMM by name, so it is told apart by its place on the stream:
    the last GEMM before a sampling kernel (softmax excluded: attention has softmaxes of its own)."""
    from torch.autograd import DeviceType

    evs = [e for e in prof.events() if not getattr(e, "is_user_annotation", False)]
    dev = [e for e in evs if e.device_type != DeviceType.CPU]
    rows = sorted((e.time_range.start, e.name, e.time_range.elapsed_us() if dev else e.self_cpu_time_total)
                  for e in (dev or evs))
    seen: list[list[Any]] = []
    last_gemm = None
    for _, name, us in rows:
        seen.append([next((c for c, pat in CLASSES if re.search(pat, name.lower())), "other"), name, us])
        if seen[-1][0] == "gemm":
            last_gemm = len(seen) - 1
        elif last_gemm is not None and LM_HEAD_NEXT.search(name.lower()):
            seen[last_gemm][0], last_gemm = "lm_head", None
    agg: Agg = {}
    for cls, name, us in seen:
        a = agg.setdefault(cls, [0.0, 0, Counter()])
        a[0], a[1] = a[0] + us, a[1] + 1
        a[2][re.sub(r"^void |at::native::|\(anonymous namespace\)::|flashinfer::", "", name)[:90]] += us
    return agg


def busy_span(prof: Any) -> tuple[float, float]:
    """µs from the first device activity's start to the last one's end, and µs in which some ran (their union):
    the rest is the time between kernels (launch latency in a graph, and any idle wait for the host)."""
    from torch.autograd import DeviceType

    iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type != DeviceType.CPU)
    busy, end = 0.0, float("-inf")
    for a, b in iv:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return (iv[-1][1] - iv[0][0] if iv else 0.0), busy


def minus(a: Agg, b: Agg) -> Agg:
    z = [0.0, 0, Counter()]
    return {c: [max(0.0, v[0] - b.get(c, z)[0]), max(0, v[1] - b.get(c, z)[1]), v[2] - b.get(c, z)[2]]
            for c, v in a.items()}


def class_table(cols: list[tuple[str, Agg, float]]) -> dict[str, Any]:
    """ms and kernels per step by class, a column pair per (title, aggregate, steps); then top-3 names."""
    print(f"{'class':<12}" + "".join(f"{t[:24]:>26}" for t, _, _ in cols) + "\n" + " " * 12
          + f"{'ms/step':>14}{'kernels':>12}" * len(cols))
    out: dict[str, Any] = {t: {} for t, _, _ in cols}
    for cls in ORDER + ["total"]:
        line = f"{cls:<12}"
        for t, agg, n in cols:
            n = n or float("nan")  # no such steps: NaN, visible, rather than a figure divided by zero
            us, k = [sum(v[i] for v in agg.values()) for i in (0, 1)] if cls == "total" else agg.get(cls, [0, 0])[:2]
            top = [[nm, round(x / 1e3 / n, 4)] for nm, x in agg[cls][2].most_common(3)] if cls in agg else []
            out[t][cls] = {"ms": us / 1e3 / n, "kernels": k / n, **({"top": top} if top else {})}
            line += f"{us / 1e3 / n:>14.3f}{k / n:>12.1f}"
        print(line)
    for cls in ORDER:
        for t, _, _ in cols:
            if out[t][cls].get("top"):
                print(f"  {cls} [{t}]: " + "; ".join(f"{nm} {ms:.3f}" for nm, ms in out[t][cls]["top"]))
    return out


def profiler(cuda: bool) -> Any:  # CPU: steps run in a worker thread, which a default profiler misses
    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if cuda else profile(
        activities=[ProfilerActivity.CPU], experimental_config=torch._C._profiler._ExperimentalConfig(
            profile_all_threads=True))


@dataclass
class Step:
    kind: str
    bs: int
    tokens: int
    t0: float  # perf_counter at the launch call
    launch_ms: float
    profiled: bool  # launched while the profiler ran
    tainted: bool  # profiled, or paying for starting / stopping it: left out of the timings
    ev: tuple[Any, Any] | None  # CUDA events recorded just before and just after launch()


class Recorder:
    """Shadows executor.launch with an instance attribute (the scheduler calls self.ex.launch(inp) each
    step), records each step, and starts / stops the profiler at the decode window's edges."""

    def __init__(self, ex: Any, cuda: bool, window: tuple[int, int], host: tuple[int, int] = (-1, 0),
                 host_prefill: bool = False) -> None:
        self.orig, self.cuda, (self.k, self.m), (self.hk, self.hm) = ex.launch, cuda, window, host
        self.host: cProfile.Profile | None = None  # the loop thread's functions over decode steps hk..hk+hm-1
        # launch() alone of every prefill step: where a prefill step's host time goes
        self.pre_host = cProfile.Profile() if host_prefill else None
        self.steps: list[Step] = []
        self.decodes, self.prof, self.window = 0, None, None
        ex.launch = self.launch

    def launch(self, inp: Any, *more: Any) -> Any:
        kind = step_kind(inp)
        edge = False
        if kind == "decode" and self.k >= 0:
            if self.decodes == self.k:
                if self.cuda:  # earlier steps' kernels stay out of the window
                    torch.cuda.synchronize()
                self.prof, edge = profiler(self.cuda), True
                self.prof.start()
            elif self.decodes == self.k + self.m:
                edge = self.stop()
            if self.decodes == self.hk:
                self.host = cProfile.Profile()
                self.host.enable()
            elif self.decodes == self.hk + self.hm and self.host:
                self.host.disable()
            self.decodes += 1
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
        t0 = time.perf_counter()
        if ev:  # the runner launches on the current stream
            ev[0].record(torch.cuda.current_stream())
        if self.pre_host is not None and kind != "decode":
            pending = self.pre_host.runcall(self.orig, inp, *more)
        else:
            pending = self.orig(inp, *more)
        if ev:
            ev[1].record(torch.cuda.current_stream())
        on = self.prof is not None
        self.steps.append(Step(kind, len(inp.slots), sum(inp.extend_lens), t0, (time.perf_counter() - t0) * 1e3,
                               on, edge or on, ev))
        return pending

    def stop(self) -> bool:
        if self.prof is None:
            return False
        self.prof.stop()  # synchronizes the device: the window's kernels are all in
        self.window, self.prof = self.prof, None
        return True


def step_stats(steps: list[Step]) -> dict[str, Any]:
    """Per kind: host ms of launch() and of the loop iteration (launch to next launch, waits included),
    GPU span between the two events, and the idle gap before the step: the stream reaches the 'before'
    event only once the host has enqueued it, so time after the previous 'after' event is GPU idle."""
    nan = float("nan")
    if steps and steps[-1].ev:
        torch.cuda.synchronize()
    loop = [(b.t0 - a.t0) * 1e3 for a, b in zip(steps, steps[1:])] + [nan]
    gpu = [s.ev[0].elapsed_time(s.ev[1]) if s.ev else nan for s in steps]
    gap = [nan] + [max(0.0, a.ev[1].elapsed_time(b.ev[0])) if b.ev else nan for a, b in zip(steps, steps[1:])]
    out: dict[str, Any] = {}
    print(f"{'kind':<8}{'steps':>6}{'bs':>7}{'tok/step':>9}{'launch ms p50/p90':>19}{'loop ms p50/p90':>19}"
          f"{'GPU ms p50':>11}{'gap ms p50/total':>19}")
    for kind in ("decode", "prefill", "mixed"):
        idx = [i for i, s in enumerate(steps) if s.kind == kind]
        ok = [i for i in idx if not steps[i].tainted]
        pick = lambda xs, ok=ok: [xs[i] for i in ok if xs[i] == xs[i]]  # NaN: not measured
        s = out[kind] = {"steps": len(idx), "timed_steps": len(ok),
                         "bs_mean": sum(steps[i].bs for i in idx) / max(len(idx), 1),
                         "tokens_mean": sum(steps[i].tokens for i in idx) / max(len(idx), 1),
                         "launch_ms": percentiles([steps[i].launch_ms for i in ok], (50, 90)),
                         "loop_ms": percentiles(pick(loop), (50, 90)), "gpu_ms": percentiles(pick(gpu), (50, 90)),
                         "gap_ms": {**percentiles(pick(gap), (50, 90)), "total": sum(pick(gap))}}
        if idx:
            print(f"{kind:<8}{len(idx):>6}{s['bs_mean']:>7.1f}{s['tokens_mean']:>9.1f}{s['launch_ms']['p50']:>10.3f}/"
                  f"{s['launch_ms']['p90']:<8.3f}{s['loop_ms']['p50']:>10.3f}/{s['loop_ms']['p90']:<8.3f}"
                  f"{s['gpu_ms']['p50']:>11.3f}{s['gap_ms']['p50']:>10.3f}/{s['gap_ms']['total']:<8.1f}")
    if not steps or not steps[0].ev:
        print("no CUDA: GPU span and idle gaps are not measured; the classes below are CPU ops by self time")
    out["decode_outliers"] = outliers(steps, loop, gpu, gap)
    return out


def outliers(steps: list[Step], loop: list[float], gpu: list[float], gap: list[float]) -> dict[str, Any]:
    """Decode steps whose loop time (launch to next launch) is over 2x the decode median: W4's ITL tail in pure
    decode, seen from inside. Each with its CUDA graph bucket and whether it was that bucket's first replay
    (a first replay may pay for uploading the graph)."""
    from aengine.runtime.cuda_graph import buckets

    sizes, seen, first = buckets(256), set(), []
    for s in steps:
        b = next((n for n in sizes if n >= s.bs), None) if s.kind == "decode" else None
        first.append(b is not None and b not in seen)
        seen.add(b)
    idx = [i for i, s in enumerate(steps) if s.kind == "decode" and loop[i] == loop[i]
           and not s.tainted and not steps[i + 1].tainted]  # (the next launch may start or stop the profiler)
    med = sorted(loop[i] for i in idx)[len(idx) // 2] if idx else float("nan")
    slow = [i for i in idx if loop[i] > 2 * med]
    firsts = [i for i in idx if first[i]]
    print(f"decode steps over 2x the median loop time ({med:.2f} ms): {len(slow)} of {len(idx)}, "
          f"{sum(first[i] for i in slow)} of them a graph bucket's first replay ({len(firsts)} first replays in all)")
    for i in sorted(slow, key=lambda i: -loop[i])[:12]:
        nxt = steps[i + 1].kind if i + 1 < len(steps) else "-"
        print(f"  step {i:5d} bs {steps[i].bs:4d} loop {loop[i]:7.2f} GPU {gpu[i]:7.2f} gap before {gap[i]:6.2f} ms; "
              f"first replay {first[i]}; next {nxt}")
    return {"median_loop_ms": med, "over_2x": len(slow), "first_replays_over_2x": sum(first[i] for i in slow),
            "first_replay_gpu_ms": [gpu[i] for i in firsts]}


def print_cprofile(prof: cProfile.Profile, title: str, steps: int, cols: tuple[str, str], top: int) -> None:
    """The top functions of a cProfile in ms per step, sorted by the first of cols ("self" or "cum")."""
    print(f"\n{title}, cProfile, ms per step:")
    stats = pstats.Stats(prof).stats
    rows = sorted(((*({"self": v[2], "cum": v[3]}[c] for c in cols), f"{Path(k[0]).name}:{k[1]}({k[2]})")
                   for k, v in stats.items()), reverse=True)
    for a, b, name in rows[:top]:
        print(f"  {cols[0]} {a * 1e3 / steps:7.3f}  {cols[1]} {b * 1e3 / steps:7.3f}  {name}")


def time_masks(g: Any) -> list[tuple[float, float]]:
    """Wraps Grammars.advance_and_fill: per job, (ms from submit to done, ms the loop waited in result())."""
    out: list[tuple[float, float]] = []
    orig = g.advance_and_fill

    def wrapped(*a: Any) -> Any:
        t0, fut = time.perf_counter(), orig(*a)
        done = [0.0]
        fut.add_done_callback(lambda _: done.__setitem__(0, time.perf_counter()))
        res = fut.result

        def result() -> Any:
            t1 = time.perf_counter()
            r = res()
            out.append(((done[0] - t0) * 1e3, (time.perf_counter() - t1) * 1e3))
            return r
        fut.result = result
        return fut
    g.advance_and_fill = wrapped
    return out


def run_aengine(args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    from aengine import LLM, SamplingParams
    from benchmarks.offline import W1_SCHEMA

    sp = lambda m, schema=None: SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True, json_schema=schema)
    chosen = set(random.Random(1).sample(range(len(prompts)), round(args.constrained_frac * len(prompts))))
    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, attn=args.attn,
              page_size=args.page_size, disable_overlap=args.disable_overlap,
              max_prefill_tokens=args.max_prefill_tokens, kv_cache_dtype=args.kv_cache_dtype,
              piecewise_cuda_graph_max_tokens=args.piecewise_cuda_graph_max_tokens)
    ex = llm.engine.executor
    cuda = bool(getattr(ex, "cuda", torch.cuda.is_available()))
    try:
        llm.generate([p[:64] for p in prompts[:4]], [sp(8, W1_SCHEMA if chosen and not i else None)
                                                     for i in range(min(4, len(prompts)))])  # as offline.py
        llm.clear_cache()
        rec = Recorder(ex, cuda, args.window, args.host_window, args.host_prefill)
        masks = time_masks(llm.engine.grammars) if chosen else None
        t = time.perf_counter()
        outs = llm.generate(prompts, [sp(m, W1_SCHEMA if i in chosen else None) for i, m in enumerate(max_tokens)])
        wall = time.perf_counter() - t
        rec.stop()  # the run ended inside the window
        steps, window = rec.steps, rec.window
        llm.clear_cache()  # the prefill-only run prefills every prompt again, wholly under the profiler
        rec.k, rec.steps = -1, []
        with profiler(cuda) as pre:
            llm.generate(prompts, [sp(1)] * len(prompts))
        pre_steps = rec.steps
    finally:
        llm.close()
    n_out = sum(len(o.token_ids) for o in outs)
    print(f"W1{'/4' if args.quarter else ''}: {len(prompts)} prompts, {n_out:,} output tokens in {wall:.2f} s = "
          f"{n_out / wall:,.0f} tok/s (wall includes the profiled window; clean figures: offline.py)")
    st = step_stats(steps)
    if masks:  # --constrained-frac: the grammar worker's jobs, and the loop's waits for them
        job, wait = (percentiles([x[k] for x in masks], (50, 90)) for k in (0, 1))
        print(f"grammar jobs (wait for the step's ids, consume, fill): {len(masks)},"
              f" ms p50/p90 {job['p50']:.3f}/{job['p90']:.3f}; the loop "
              f"waited for them p50/p90 {wait['p50']:.3f}/{wait['p90']:.3f} ms, {sum(x[1] for x in masks):.0f} ms"
              " in all")
        st["grammar_job_ms"], st["grammar_wait_ms"] = job, wait
    if rec.host is not None:  # cProfile's own cost inflates these: read them as shares, not times
        print_cprofile(rec.host, f"the loop thread over decode steps {args.host_window[0]}.. "
                       f"({args.host_window[1]} steps)", args.host_window[1], ("self", "cum"), 25)
    n_pf = sum(s.kind != "decode" for s in steps)
    if rec.pre_host is not None and n_pf:
        print_cprofile(rec.pre_host, f"launch() of the main run's {n_pf} prefill steps", n_pf, ("cum", "self"), 30)
    win = [s for s in steps if s.profiled]
    dec = [s for s in win if s.kind == "decode"]
    n_pre = sum(s.kind != "decode" for s in pre_steps)
    wjs = {"start": args.window[0], "decode_steps": len(dec), "other_steps": len(win) - len(dec),
           "bs_mean": sum(s.bs for s in dec) / max(len(dec), 1)}
    pjs = {"steps": n_pre, "tokens_per_step": sum(s.tokens for s in pre_steps) / max(n_pre, 1)}
    print((f"decode window: decode steps {args.window[0]}..{args.window[0] + len(dec) - 1} ({len(dec)} decode + "
           f"{wjs['other_steps']} other steps, whose kernels count too; mean batch {wjs['bs_mean']:.1f}); " if dec
           else f"decode window: not reached ({st['decode']['steps']} decode steps in all); ")
          + f"prefill-only run: {n_pre} steps, {pjs['tokens_per_step']:,.0f} tokens/step")
    if cuda and dec:
        span, busy = busy_span(window)
        wjs |= {"span_ms": span / 1e3 / len(dec), "busy_ms": busy / 1e3 / len(dec)}
        print(f"decode window on the GPU: {wjs['span_ms']:.3f} ms/step first kernel to last, {wjs['busy_ms']:.3f} "
              f"with a kernel running: {1 - busy / max(span, 1e-9):.1%} between kernels")
    classes = class_table([("decode step (window)", aggregate(window) if window else {}, len(dec)),
                           ("prefill step", aggregate(pre), n_pre)])
    return {"engine": "aengine", "seconds": wall, "output_tokens": n_out, "tok_per_s": n_out / wall,
            "steps": st, "window": wjs, "prefill_run": pjs, "by_class": classes, "cuda_events": cuda}


def run_minisgl(args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    try:
        from minisgl.core import SamplingParams
        from minisgl.llm import LLM

        from benchmarks.peers.mini_sglang import peer_commit
    except ImportError as e:
        print(f"step_profile.py: Mini-SGLang is not importable ({e}); run the kit's run_peer.sh and use its PYTHONPATH")
        sys.exit(2)
    llm = LLM(args.model, max_seq_len_override=4096, max_extend_tokens=16384, cuda_graph_max_bs=256, page_size=256,
              use_dummy_weight=True, attention_backend="fi" if args.attn == "auto" else args.attn)
    layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    sp = lambda m, t=0.6: SamplingParams(temperature=t, ignore_eos=True, max_tokens=m)
    llm.generate(["Benchmark: "], sp(8, 0.1))  # warm-up, as the kit's prof.py
    # its radix cache outlives generate() and the offline API cannot clear it: each later run gets
    # fresh ids of the same lengths, so that it prefills as much as the first
    shift = lambda k: [[(t + k) % 10001 for t in p] for p in prompts]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, [sp(m) for m in max_tokens])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profiler(True) as whole:
        llm.generate(shift(1), [sp(m) for m in max_tokens])
    with profiler(True) as pre:
        llm.generate(shift(2), [sp(1)] * len(prompts))
    launches = lambda prof, pat: sum(e.device_type != torch.autograd.DeviceType.CPU and bool(re.search(
        pat, e.name.lower())) for e in prof.events())
    n_dec = launches(whole, r"batchdecode|singledecode") / layers
    n_pre = launches(pre, r"batchprefill|singleprefill") / layers
    n_out = sum(max_tokens)
    print(f"Mini-SGLang W1/4: {len(prompts)} prompts, {n_out:,} output tokens in {wall:.2f} s = {n_out / wall:,.0f} "
          f"tok/s (an unprofiled run). Its steps cannot be wrapped: steps = attention kernel launches / "
          f"num_hidden_layers ({layers}): {n_dec:.0f} decode steps in W1/4, {n_pre:.0f} in the prefill-only run. "
          "No host time per step or GPU gaps. Decode per step: the whole W1/4 run, and less the prefill-only run"
          + ("\nno decode attention kernels: flashinfer decodes with prefill kernels at GQA >= 4" if not n_dec else ""))
    agg_w, agg_p = aggregate(whole), aggregate(pre)
    classes = class_table([("W1/4 all / decode steps", agg_w, n_dec),
                           ("(W1/4-prefill)/decode", minus(agg_w, agg_p), n_dec), ("prefill step", agg_p, n_pre)])
    return {"engine": "mini-sglang", "seconds": wall, "output_tokens": n_out, "tok_per_s": n_out / wall,
            "decode_steps": n_dec, "prefill_steps": n_pre, "num_hidden_layers": layers, "by_class": classes,
            "peer_commit": peer_commit()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="aengine", choices=["aengine", "minisgl"])
    ap.add_argument("--model", "--config", dest="model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--attn", default="auto", help="aengine: torch | fi | fa | prefill,decode; minisgl auto = fi")
    ap.add_argument("--page-size", type=int, default=0)
    ap.add_argument("--disable-overlap", action="store_true")
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--piecewise-cuda-graph-max-tokens", type=int, default=2048, help="aengine; 0: prefill eager")
    ap.add_argument("--kv-cache-dtype", default="auto", help="aengine: auto | fp8_e4m3")
    ap.add_argument("--constrained-frac", type=float, default=0.0, help="aengine: as offline.py's (W1_SCHEMA)")
    ap.add_argument("--quarter", action="store_true", help="every W1 max_tokens cut to a quarter (minisgl: always)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=pair, default=(100, 1024))
    ap.add_argument("--output-len", type=pair, default=(100, 1024))
    ap.add_argument("--window", type=pair, default=(200, 50), help="K,M: profile decode steps K..K+M-1")
    ap.add_argument("--host-window", type=pair, default=(-1, 0),
                    help="K,M: cProfile the loop thread over decode steps K..K+M-1 (a breakdown of host time)")
    ap.add_argument("--host-prefill", action="store_true", help="cProfile launch() of every prefill step")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="append one JSON line (stdout: no path)")
    args = ap.parse_args(argv)
    args.quarter = args.quarter or args.engine == "minisgl"
    prompts, max_tokens = w1_requests(args.num_prompts, args.input_len, args.output_len)
    if args.quarter:
        max_tokens = [max(8, m // 4) for m in max_tokens]  # as the kit's prof.py
    run = run_aengine if args.engine == "aengine" else run_minisgl
    res = {"workload": "w1-profile", "quarter": args.quarter, "model": args.model, "attn": args.attn,
           "num_prompts": len(prompts), **run(args, prompts, max_tokens), **machine()}
    emit_json(res, args.json)
    if args.engine == "minisgl":  # as the kit's bench_peer.py: its teardown (gloo, graphs) may hang
        sys.stdout.flush()
        os._exit(0)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

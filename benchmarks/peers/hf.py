"""The peer: W1 and W2 through HF transformers on the same machine and the same dummy-weight shapes
(benchmarks/configs/*), for a side-by-side ratio with benchmarks/offline.py (see compare.py).

Modes:
  generate_batch  transformers' continuous batching (attn_implementation "paged|sdpa" and others);
                  it takes one GenerationConfig for all requests, so every W1 request gets
                  max_new_tokens = the W1 mean (523 on the default draw): same prompts, ~ the same
                  total output; the JSON says so ("uniform_max_tokens").
  generate        plain model.generate on left-padded batches of --batch-size prompts, each batch to
                  the W1 mean as well (per-request lengths are not possible in one padded batch).
W2 (batch 1, 128-token prompt, 512 output tokens; TTFT at 1,024) uses plain generate.
EOS never stops a request (min_new_tokens = max_new_tokens).

  python benchmarks/peers/hf.py --workload w1 --model benchmarks/configs/qwen3-0.6b --mode generate_batch
  python benchmarks/peers/hf.py --workload w2 --model benchmarks/configs/llama-3.1-8b --mode generate
  # CPU smoke test
  python benchmarks/peers/hf.py --model benchmarks/configs/tiny-llama --num-prompts 4 --input-len 8,16 \
      --output-len 4,8 --mode both --json -
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a source checkout

import torch  # noqa: E402

from benchmarks.common import emit_json, machine, pair, w1_requests  # noqa: E402


def load(model: str, attn: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights of the config's shape (the same shapes offline.py's --load-format dummy uses)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model)
    cfg = AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))
    torch.manual_seed(0)
    with torch.device(device):
        try:
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except TypeError:  # transformers 4.x names it torch_dtype
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation=attn)
    m.eval()
    # The config's eos/pad ids may be outside a tiny vocab; ignore_eos semantics need no EOS anyway.
    m.generation_config.pad_token_id = 0
    return m


def gen_config(max_new: int, temperature: float) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=temperature > 0,
                            temperature=temperature or None, top_p=1.0, top_k=0, eos_token_id=None,
                            pad_token_id=0)


def run_generate_batch(model: Any, prompts: list[list[int]], max_new: int, temperature: float,
                       progress: bool) -> tuple[int, float, float]:
    """(output tokens, seconds, warm-up seconds). generate_batch sizes its cache and captures its CUDA
    graphs for the very requests it is given, so a short warm-up call would leave a manager sized for
    two prompts; instead one call serves them all, and the timed span runs from the first request
    taken up to the last one finished (each output's `lifespan`), the rest of the call is warm-up."""
    t = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gen_config(max_new, temperature), progress_bar=progress)
    wall = time.perf_counter() - t
    errors = [o.error for o in outs.values() if o.error]
    if errors:
        raise RuntimeError(f"generate_batch failed on {len(errors)} requests: {errors[0]}")
    spans = [getattr(o, "lifespan", (-1, -1)) for o in outs.values()]
    if spans and all(s[0] >= 0 and s[1] >= 0 for s in spans):
        dt = max(s[1] for s in spans) - min(s[0] for s in spans)
    else:  # a transformers without lifespans: the whole call, warm-up included
        dt = wall
    return sum(len(o.generated_tokens) for o in outs.values()), dt, wall - dt


@torch.inference_mode()
def run_generate(model: Any, prompts: list[list[int]], max_new: int, temperature: float, batch: int,
                 device: torch.device) -> tuple[int, float]:
    """Left-padded batches through plain generate; counts the tokens generated after each prompt."""
    cfg = gen_config(max_new, temperature)
    n_out, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        n_out += (out.shape[1] - width) * len(chunk)
    sync(device)
    return n_out, time.perf_counter() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def w1(model_by_attn: dict[str, Any], args: argparse.Namespace, device: torch.device) -> list[dict]:
    prompts, max_tokens = w1_requests(args.num_prompts, args.input_len, args.output_len)
    mean = round(statistics.fmean(max_tokens))
    rows = []
    for attn, model in model_by_attn.items():
        if args.mode in ("generate_batch", "both"):
            n, dt, warm = run_generate_batch(model, prompts, mean, args.temperature, not args.no_progress)
            rows.append({"mode": "generate_batch", "attn": attn, "output_tokens": n, "seconds": dt,
                         "tok_per_s": n / dt, "warmup_s": warm, "prompts": len(prompts)})
        if args.mode in ("generate", "both"):
            sub = prompts[: args.generate_prompts or len(prompts)]
            run_generate(model, [sub[0][:8]], 2, args.temperature, 1, device)  # warm-up
            n, dt = run_generate(model, sub, mean, args.temperature, args.batch_size, device)
            rows.append({"mode": "generate", "attn": attn, "output_tokens": n, "seconds": dt, "tok_per_s": n / dt,
                         "prompts": len(sub), "batch_size": args.batch_size})
    for r in rows:
        r["uniform_max_tokens"] = mean
    return rows


def w2(model_by_attn: dict[str, Any], args: argparse.Namespace, device: torch.device) -> list[dict]:
    rng = random.Random(0)
    short = [rng.randint(0, 10000) for _ in range(args.w2_prompt_len)]
    long = [rng.randint(0, 10000) for _ in range(args.w2_ttft_len)]
    rows = []
    for attn, model in model_by_attn.items():
        # Plain generate only: continuous batching has nothing to batch at one stream, and each
        # generate_batch call would pay its warm-up inside the time.
        for mode in ["generate"]:
            def timed(ids: list[int], n: int, mode: str = mode, model: Any = model) -> float:
                if mode == "generate":
                    return run_generate(model, [ids], n, args.temperature, 1, device)[1]
                return run_generate_batch(model, [ids], n, args.temperature, False)[1]

            timed(short[:8], 2)  # warm-up
            full = statistics.median(timed(short, args.w2_output_len) for _ in range(args.repeats))
            first = statistics.median(timed(short, 1) for _ in range(args.repeats))
            ttft = statistics.median(timed(long, 1) for _ in range(args.repeats))
            n = args.w2_output_len
            rows.append({"mode": mode, "attn": attn, "output_tokens": n, "seconds": full, "tok_per_s": n / full,
                         # the rate between the first and the last token, as offline.py's decode_tok_per_s
                         "decode_tok_per_s": (n - 1) / max(full - first, 1e-9), "ttft_ms": ttft * 1e3,
                         "ttft_prompt_tokens": args.w2_ttft_len, "repeats": args.repeats})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--config", dest="model", default="benchmarks/configs/qwen3-0.6b",
                    help="a config dir (random weights of its shape)")
    ap.add_argument("--workload", default="w1", choices=["w1", "w2"])
    ap.add_argument("--mode", default="both", choices=["generate_batch", "generate", "both"])
    ap.add_argument("--attn", default="paged|sdpa",
                    help="attn_implementation(s), comma-separated, e.g. paged|sdpa,paged|flash_attention_4")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=pair, default=(100, 1024))
    ap.add_argument("--output-len", type=pair, default=(100, 1024))
    ap.add_argument("--generate-prompts", type=int, default=0,
                    help="W1 plain generate: only the first N prompts (0: all); its tok/s is still comparable")
    ap.add_argument("--batch-size", type=int, default=64, help="W1 plain generate: prompts per padded batch")
    ap.add_argument("--w2-prompt-len", type=int, default=128)
    ap.add_argument("--w2-output-len", type=int, default=512)
    ap.add_argument("--w2-ttft-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write the figures as JSON (stdout: no path)")
    args = ap.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    import transformers

    rows = []
    for attn in [a for a in args.attn.split(",") if a]:  # one model at a time: the 8B shape is 16 GB
        t = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "paged|" is deprecated in newer releases
                model = load(args.model, attn, device, dtype)
            print(f"loaded {args.model} with attn {attn} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            rows += (w1 if args.workload == "w1" else w2)({attn: model}, args, device)
            del model
        except Exception as e:  # an attention name this transformers lacks: report it, go on
            rows.append({"mode": args.mode, "attn": attn, "error": f"{type(e).__name__}: {e}"[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = {"engine": "hf", "transformers": transformers.__version__, "torch": torch.__version__,
            "workload": args.workload, "model": args.model, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), **machine()}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
    for r in rows:
        r = {**info, **r}
        if "error" in r:
            print(f"hf {r['mode']} [{r['attn']}] {args.workload}: FAILED {r['error']}")
        else:
            print(f"hf {r['mode']} [{r['attn']}] {args.workload}: {r['output_tokens']} output tokens in "
                  f"{r['seconds']:.2f} s = {r['tok_per_s']:,.1f} tok/s"
                  + (f"; decode {r['decode_tok_per_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms"
                     if args.workload == "w2" else ""))
        emit_json(r, args.json)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

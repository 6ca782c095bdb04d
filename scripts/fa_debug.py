"""Check flash-attn inside the engine (it settled the fa "wrong logits" question, docs/gpu.md, "Comparing
bf16 runs: near ties": every call was right): serve the GPU test's prompts
with FlashAttention at each page size given, check every FA call against a plain fp32 reference
on the same pool and page table, and on the first few mismatches re-run FA with one argument
changed at a time, so the output says which input the kernel gets wrong.

  python3 scripts/fa_debug.py --pages 128,64,16 [--out DIR]   (flash-attn-4 installed; one GPU)"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from aengine.attention.fa_backend import FlashAttnBackend  # noqa: E402


def reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pt: torch.Tensor, seq_lens: list[int],
              qo: list[int]) -> torch.Tensor:
    ps, outs = kc.shape[1], []
    for i, n in enumerate(seq_lens):
        pages = pt[i, : (n + ps - 1) // ps].long()
        k = kc[pages].flatten(0, 1)[:n].float()
        v = vc[pages].flatten(0, 1)[:n].float()
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        qi = q[qo[i] : qo[i + 1]].float()
        s = torch.einsum("qhd,khd->hqk", qi, k) / qi.shape[-1] ** 0.5
        pos = torch.arange(n, device=q.device)
        s = s.masked_fill(~(pos[None, :] <= pos[n - len(qi) :, None])[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
    return torch.cat(outs)


def row_errors(out: torch.Tensor, ref: torch.Tensor, qo: list[int]) -> list[float]:
    out = out.view_as(ref)
    return [round(((out[s:e].double() - ref[s:e].double()).norm() / ref[s:e].double().norm()).item(), 4)
            for s, e in zip(qo, qo[1:])]


class Spy:
    """Wraps FlashAttnBackend.forward; counts FA calls and mismatching ones, probes the first few."""

    def __init__(self, out_dir: Path, probes: int = 2) -> None:
        self.calls = self.bad = 0
        self.out_dir, self.probes = out_dir, probes
        self.orig = FlashAttnBackend.forward

    def __call__(self, be: FlashAttnBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layer: int) -> torch.Tensor:
        out = self.orig(be, q, k, v, layer)
        fb, qc = be.fb, q.contiguous()
        kc, vc = be.pool.k[layer], be.pool.v[layer]
        qo, lens = fb.qo_indptr.tolist(), fb.seq_lens.tolist()
        ref = reference(qc, kc, vc, be.pt, lens, qo)
        errs = row_errors(out, ref, qo)
        self.calls += 1
        if max(errs) <= 1e-2:
            return out
        self.bad += 1
        print(f"MISMATCH layer {layer} decode={fb.decode} seq_lens={lens} ext={fb.extend_lens_cpu} "
              f"max_q={be.max_q} max_k={be.max_k} pt[:, :3]={be.pt[:, :3].tolist()} errs={errs}", flush=True)
        if self.bad <= self.probes:
            self.probe(be, qc, kc, vc, ref, qo, lens)
        return out

    def probe(self, be: FlashAttnBackend, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
              ref: torch.Tensor, qo: list[int], lens: list[int]) -> None:
        fb = be.fb
        base: dict[str, Any] = dict(cu_seqlens_q=fb.qo_indptr, seqused_k=fb.seq_lens, max_seqlen_q=be.max_q,
                                    max_seqlen_k=be.max_k, page_table=be.pt, causal=True)

        def run(name: str, q: torch.Tensor = qc, k: torch.Tensor = kc, v: torch.Tensor = vc, **kw: Any) -> None:
            try:
                o = be.attn(q, k, v, **{**base, **kw})
                print(f"  {name:>22}: {row_errors(o[0] if isinstance(o, tuple) else o, ref, qo)}", flush=True)
            except Exception as e:
                print(f"  {name:>22}: raised {type(e).__name__}: {str(e)[:200]}", flush=True)

        run("again")
        run("page table cloned", page_table=be.pt.clone())
        run("page table 2 cols", page_table=be.pt[:, :2].contiguous())
        run("max_seqlen_k None", max_seqlen_k=None)
        run("max_seqlen_k 1024", max_seqlen_k=1024)
        run("K/V cloned", k=kc.clone(), v=vc.clone())
        run("tail rows zeroed", k=zero_tails(kc, be.pt, lens), v=zero_tails(vc, be.pt, lens))
        run("pack_gqa False", pack_gqa=False)
        run("num_splits 0 (auto)", num_splits=0)
        run("causal False", causal=False)
        if fb.decode:  # the same rows in the opposite batch order: is it the row or its place?
            o = be.attn(qc.flip(0), kc, vc, **{**base, "seqused_k": fb.seq_lens.flip(0).contiguous(),
                                               "page_table": be.pt.flip(0).contiguous()})
            o = (o[0] if isinstance(o, tuple) else o).flip(0)
            print(f"  {'batch order reversed':>22}: {row_errors(o, ref, qo)}", flush=True)
        for i, (s, e) in enumerate(zip(qo, qo[1:])):
            one = reference(qc[s:e], kc, vc, be.pt[i : i + 1], lens[i : i + 1], [0, e - s])
            o = be.attn(qc[s:e], kc, vc, cu_seqlens_q=torch.tensor([0, e - s], dtype=torch.int32, device=qc.device),
                        seqused_k=fb.seq_lens[i : i + 1].clone(), max_seqlen_q=e - s, max_seqlen_k=lens[i],
                        page_table=be.pt[i : i + 1].clone(), causal=True)
            o = o[0] if isinstance(o, tuple) else o
            print(f"  {'row ' + str(i) + ' alone':>22}: {row_errors(o, one, [0, e - s])}", flush=True)
        path = self.out_dir / f"fa_case{self.bad}.pt"
        torch.save(dict(q=qc.cpu(), k=kc.cpu(), v=vc.cpu(), page_table=be.pt.cpu(), seq_lens=fb.seq_lens.cpu(),
                        cu_seqlens_q=fb.qo_indptr.cpu(), max_q=be.max_q, max_k=be.max_k), path)
        print(f"  saved {path}", flush=True)


def zero_tails(x: torch.Tensor, pt: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """A copy with every row past each sequence's length in its last page zeroed."""
    x, ps = x.clone(), x.shape[1]
    for i, n in enumerate(lens):
        if n % ps:
            x[pt[i, (n - 1) // ps].long(), n % ps :] = 0
    return x


def tiny_qwen3() -> str:
    """The GPU test's model: 3 layers, 4 query / 2 KV heads of 128, word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    d = tempfile.mkdtemp()
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=1024,
                      initializer_range=0.1, eos_token_id=1, bos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.float32).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", unk_token="t0").save_pretrained(d)
    return d


def main() -> None:
    from aengine import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default="128,64,16")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rng = random.Random(0)  # the GPU test's prompts: two share a 100-token prefix
    prefix = [rng.randrange(2, 512) for _ in range(100)]
    prompts = [prefix + [rng.randrange(2, 512) for _ in range(30)], prefix + [rng.randrange(2, 512) for _ in range(57)],
               [rng.randrange(2, 512) for _ in range(150)]]
    path = tiny_qwen3()
    for ps in map(int, args.pages.split(",")):
        spy = Spy(Path(args.out))
        FlashAttnBackend.forward = lambda be, q, k, v, layer, spy=spy: spy(be, q, k, v, layer)
        llm = LLM(path, dtype="bf16", attn="fa", page_size=ps, max_prefill_tokens=64, disable_overlap=True,
                  cuda_graph_max_bs=0, num_pages=4096)
        try:
            llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        finally:
            llm.close()
            FlashAttnBackend.forward = spy.orig
        print(f"page {ps}: {spy.bad} of {spy.calls} FA calls off by more than 1e-2", flush=True)


if __name__ == "__main__":
    main()
